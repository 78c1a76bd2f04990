"""The `tunesmith eval` command: arguments in, `evaluate(...)` called, a table printed. No logic here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        targets: Annotated[
            list[str] | None,
            typer.Argument(help="Run dirs, model folders, .gguf files or built-in aliases (several: a learn/forget "
                           "plot)."),
        ] = None,
        suite: Annotated[
            str | None, typer.Option(help="Suite YAML, or a built-in suite name (mmlu, forgetting).")
        ] = None,
        compare: Annotated[
            str | None, typer.Option("--compare", help="Baseline on the same items; `base` = the run's base model.")
        ] = None,
        predictions: Annotated[
            Path | None, typer.Option(help="Score a JSONL of outputs (prediction + reference(s) or label); no model.")
        ] = None,
        output: Annotated[Path, typer.Option(help="Folder for results.json and report.html.")] = Path("eval"),
        reweigh: Annotated[
            Path | None, typer.Option(help="Write Kamiran-Calders sample weights for this training file and exit.")
        ] = None,
        group_field: Annotated[str, typer.Option(help="--reweigh: sensitive-attribute column.")] = "group",
        label_field: Annotated[str, typer.Option(help="--reweigh: label column.")] = "label",
    ) -> None:
        """Evaluate models (or a predictions file) on a suite: task metrics with CIs, comparison, forgetting,
        fairness; writes results.json and report.html."""
        from rich.console import Console
        from rich.table import Table

        console = Console()
        if reweigh is not None:
            from tunesmith.evaluate.fairness import write_reweighing

            written = write_reweighing(reweigh, group_field, label_field, output / "weights.jsonl")
            console.print(f"reweighing weights written to {written}")
            return

        from tunesmith.evaluate import evaluate, load_suite

        results = evaluate(list(targets or []), load_suite(suite) if suite else None, output,
                           baseline=compare, predictions=predictions)
        table = Table(title=f"eval: {results['suite']['name']}")
        for column in ("system", "task", "metric", "value", "95% CI"):
            table.add_column(column, justify="right" if column in ("value", "95% CI") else "left")
        for system in results["systems"]:
            for name, task in system["tasks"].items():
                for metric_name, metric in task["metrics"].items():
                    low, high = metric["ci_low"], metric["ci_high"]
                    table.add_row(system["name"], name, metric_name, _fmt(metric["value"]),
                                  "-" if low is None else f"[{low:.4f}, {high:.4f}]")
        console.print(table)
        for comparison in results["comparisons"]:
            for key in ("learning", "forgetting"):
                if comparison.get(key):
                    value = comparison[key]
                    console.print(f"{comparison['target']} vs {comparison['baseline']}: {key} {value['value']:+.4f} "
                                  f"[{value['ci_low']:.4f}, {value['ci_high']:.4f}]")
        console.print(f"results: {output / 'results.json'}  report: {output / 'report.html'}")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
