"""`tunesmith train` as the whole loop: curate (optional) -> train -> evaluate (optional).

Each stage writes a folder the next one reads: the curated records are written beside the run
directory (`<output_dir>.curated/`, with their report), training reads its kept.jsonl, and the
evaluation of the result goes to `<output_dir>/eval/`.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

from rich.console import Console

from tunesmith.config import RunConfig
from tunesmith.filelock import file_lock
from tunesmith.training import TrainResult, train
from tunesmith.training.launch import launch_id, launch_rank


def curated_dir(config: RunConfig) -> Path:
    return config.output_dir.with_name(config.output_dir.name + ".curated")


def with_train_file(config: RunConfig, path: Path) -> RunConfig:
    return config.model_copy(update={"data": config.data.model_copy(update={"train": path})})


def run(
    config: RunConfig, resume: bool = False, overwrite: bool = False, console: Console | None = None
) -> TrainResult:
    main = launch_rank() == 0  # with several processes, the first one reports and evaluates the result
    console = console or Console(stderr=True, quiet=not main)
    if config.curate is not None and not resume:
        config = with_train_file(config, curate_once(config, console) / "kept.jsonl")
    elif config.curate is not None:  # resume trains on what the first run curated
        config = with_train_file(config, curated_dir(config) / "kept.jsonl")

    trained = train(config, resume=resume, overwrite=overwrite, console=console)
    if config.eval is not None and trained.exit_code == 0 and main:
        from tunesmith.evaluate import evaluate

        evaluate([str(trained.run_dir)], config.eval, trained.run_dir / "eval", baseline="base")
        console.print(f"evaluation: {trained.run_dir / 'eval' / 'report.html'}")
    return trained


def curate_once(config: RunConfig, console: Console) -> Path:
    """Curate the run's data into `curated_dir`. In a launch of several processes the first to take the
    folder's lock curates and leaves a marker naming the launch, the curate settings and the input files (names,
    sizes, times); the others find it and read what it wrote (each wrote the same files at once). A later launch
    with the same rendezvous address and unchanged inputs and settings reads it too: the same records."""
    from tunesmith.curate import curate

    output_dir = curated_dir(config)
    launch = launch_id()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(output_dir.with_name(output_dir.name + ".lock")) if launch is not None else nullcontext():
        marker = output_dir / "launch.json"
        key = json.dumps({"launch": launch, "curate": config.curate.model_dump(mode="json"),
                          "inputs": file_fingerprints(config.data.train)}, sort_keys=True)
        if launch is not None and marker.exists() and marker.read_text(encoding="utf-8") == key:
            console.print(f"curated by another process of this launch: {output_dir / 'report.html'}")
            return output_dir
        marker.unlink(missing_ok=True)
        result = curate(config.curate, [config.data.train], output_dir)
        console.print(f"curated {result.records_in:,} records: kept {result.kept:,}, rejected {result.rejected:,} "
                      f"(report: {result.output_dir / 'report.html'})")
        if launch is not None:
            marker.write_text(key, encoding="utf-8")
    return output_dir


def file_fingerprints(path: Path) -> list[list]:
    """[name, size, modification time] of the file, or of every file under the folder."""
    files = sorted(item for item in path.rglob("*") if item.is_file()) if path.is_dir() else [path]
    return [[str(item.resolve()), item.stat().st_size, item.stat().st_mtime_ns] for item in files]
