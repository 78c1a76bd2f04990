"""The `tunesmith curate` command: arguments in, `curate(...)` called, a summary printed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command(name="curate")(curate_command)


def curate_command(
    inputs: Annotated[list[Path], typer.Argument(help="Data files or folders (jsonl, json, csv, tsv, parquet).")],
    config: Annotated[
        Path, typer.Option("--config", help="Curate config (YAML): steps, or a run config's curate: section.")
    ],
    output: Annotated[Path, typer.Option("--output", help="Folder for kept.jsonl, rejected.jsonl and the reports.")],
    workers: Annotated[int | None, typer.Option(min=1, help="Processes for record-by-record steps.")] = None,
    engine: Annotated[str | None, typer.Option(help="local (default) or ray (Ray Data).")] = None,
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", help="Ray cluster for --engine ray (e.g. ray://head:10001, auto).")
    ] = None,
) -> None:
    """Clean, filter, deduplicate and decontaminate data; every removed record is kept with its reason."""
    from rich.console import Console

    from tunesmith.curate import curate, load_curate_config

    settings = load_curate_config(config, workers=workers, engine=engine, ray_address=ray_address)
    result = curate(settings, inputs, output)
    console = Console()
    for row in result.report["funnel"]:
        added = f"  ({row['added']:,} added)" if row["added"] else ""
        console.print(f"{row['step']:>18}: {row['in']:>9,} in  {row['out']:>9,} out{added}")
    console.print(f"{result.records_in:,} records: {result.kept:,} kept, {result.rejected:,} rejected "
                  f"({result.report['seconds']:.1f} s); report: {output / 'report.html'}")
