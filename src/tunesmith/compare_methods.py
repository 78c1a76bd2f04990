"""`tunesmith compare-methods`: the same task trained with each method, side by side.

Every method gets the same config, data and step budget; only `method` and the learning rate change:
`--lr method=value` when given, else with `--lr-trials K` the best of K rates spread evenly (log scale)
over the method's recommended range (`MethodSpec.lr_range`), else the method's default
(`MethodSpec.default_lr`). A trial is chosen on the config's eval split, as the PEFT papers pick their
learning rate on the GLUE dev sets; every trial's figures are kept in results.json (`lr_trials`).
Each run is an ordinary run directory under OUTPUT/<method>/, so any of them can be inspected,
evaluated or resumed like a `tunesmith train` run. The figures come from each run's summary.json
(trainable parameters, peak memory, tokens/s, the task metric before and after) and, when the config
has an `eval:` section, from its eval/results.json (learning on target tasks, forgetting on retain tasks).

By default each method trains in its own process: peak memory on CPU is the process's peak resident
set size, which only ever grows, so methods run one after another in one process would inherit the
peak of the ones before them.

Outputs: OUTPUT/results.json (one row per method), OUTPUT/report.html (table and plot), and the table
on the terminal.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tunesmith.config import RunConfig, build_config, dump_config
from tunesmith.errors import ConfigError
from tunesmith.methods import METHODS
from tunesmith.report import Report

DEFAULT_METHODS = "full,lora,adapter,prefix,prompt,ia3"


# --- one config per method ----------------------------------------------------------------------------------


def parse_methods(methods: str) -> list[str]:
    """'full,lora' -> ['full', 'lora'], each a registered method (ConfigError naming --methods otherwise)."""
    names = [name.strip() for name in methods.split(",") if name.strip()]
    if not names:
        raise ConfigError("--methods: give at least one method, e.g. --methods full,lora")
    if len(set(names)) != len(names):
        raise ConfigError(f"--methods: {methods!r} names a method twice")
    for name in names:
        METHODS.get(name, "--methods")
    return names


def parse_learning_rates(pairs: list[str], methods: list[str]) -> dict[str, float]:
    """['lora=2e-4'] -> {'lora': 2e-4}, for methods being compared."""
    rates = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--lr {pair!r}: expected METHOD=VALUE, e.g. --lr lora=2e-4")
        if name not in methods:
            raise ConfigError(f"--lr {pair!r}: {name!r} is not one of --methods ({', '.join(methods)})")
        try:
            rates[name] = float(value)
        except ValueError:
            raise ConfigError(f"--lr {pair!r}: {value!r} is not a number") from None
        if rates[name] <= 0:
            raise ConfigError(f"--lr {pair!r}: the learning rate must be positive")
    return rates


def trial_learning_rates(method: str, trials: int) -> list[float]:
    """`trials` learning rates evenly spaced in log scale across the method's recommended range, ends
    included; the method's default alone when `trials` is 1 or it has no range."""
    spec = METHODS.get(method)
    if trials == 1 or spec.lr_range is None:
        return [spec.default_lr]
    low, high = spec.lr_range
    return [float(f"{low * (high / low) ** (index / (trials - 1)):.3g}") for index in range(trials)]


def better(metric: str, value: float, than: float) -> bool:
    lower_is_better = "loss" in metric or "perplexity" in metric
    return value < than if lower_is_better else value > than


def method_config(
    config: RunConfig, method: str, output: Path, steps: int | None, lr: float | None, run_name: str | None = None
) -> RunConfig:
    """`config` with `method` (its own settings if the config already uses it, else the defaults), its
    learning rate, the shared step budget, and OUTPUT/<run_name or method> as the run directory."""
    raw = config.model_dump(mode="json")
    if raw["method"]["name"] != method:
        raw["method"] = {"name": method}
    # The config's train.lr was set (or defaulted) for its own method; each method gets its own.
    raw["train"]["lr"] = lr
    if steps is not None:
        raw["train"]["max_steps"] = steps
    raw["output_dir"] = str(output / (run_name or method))
    return build_config(raw)


# --- running ---------------------------------------------------------------------------------------------------


def train_in_subprocess(config: RunConfig, config_path: Path, log_path: Path) -> int:
    """`tunesmith train CONFIG --overwrite` in a fresh process; its output goes to `log_path`."""
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(dump_config(config), encoding="utf-8")
    with open(log_path, "w", encoding="utf-8") as log:
        return subprocess.call(
            [sys.executable, "-m", "tunesmith.cli", "train", str(config_path), "--overwrite"],
            stdout=log, stderr=subprocess.STDOUT,
        )


def train_in_process(config: RunConfig, log_path: Path) -> int:
    import torch

    from tunesmith.pipeline import run

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            return run(config, overwrite=True, console=Console(file=log, width=120)).exit_code
        except Exception:  # one method failing (say, unsupported by the model) must not end the comparison
            log.write(traceback.format_exc())
            return 1


def task_metric(config: RunConfig, summary: dict, metric: str | None) -> str:
    """The metric compared: --metric, else the early-stopping metric, else accuracy, else eval_loss."""
    if metric:
        return metric
    if config.train.early_stopping is not None:
        return config.train.early_stopping.metric
    evaluated = summary.get("eval") or summary.get("eval_before") or {}
    return "accuracy" if "accuracy" in evaluated else "eval_loss"


def figures(method: str, config: RunConfig, run_dir: Path, metric: str | None, peak_memory_valid: bool) -> dict:
    """One row of the comparison, from the run's summary.json and eval/results.json."""
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    name = task_metric(config, summary, metric)
    row: dict[str, Any] = {
        "method": method,
        "lr": config.train.lr,
        "steps": summary["steps"],
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
        "trainable_percent": 100 * summary["trainable_params"] / max(summary["total_params"], 1),
        "peak_memory_mb": summary["peak_memory_mb"] if peak_memory_valid else None,
        "tokens_per_s": summary["tokens_per_s"],
        "train_seconds": summary["train_seconds"],
        "metric": name,
        "metric_before": (summary.get("eval_before") or {}).get(name),
        "metric_after": (summary.get("eval") or {}).get(name),
        "learning": None,
        "forgetting": None,
        "run_dir": str(run_dir),
        "status": "ok",
    }
    eval_results = run_dir / "eval" / "results.json"
    if eval_results.is_file():
        comparisons = json.loads(eval_results.read_text(encoding="utf-8")).get("comparisons") or []
        if comparisons:
            for key in ("learning", "forgetting"):
                value = comparisons[0].get(key)
                row[key] = value["value"] if isinstance(value, dict) else None
    return row


def compare_methods(
    config: RunConfig,
    methods: list[str],
    output: Path,
    steps: int | None = None,
    learning_rates: dict[str, float] | None = None,
    metric: str | None = None,
    isolate: bool = True,
    console: Console | None = None,
    lr_trials: int = 1,
) -> list[dict]:
    """Train `config` once per method under `output/<method>/`; write results.json and report.html.

    isolate: each method in its own process (honest peak memory on CPU). In one process (faster, for
    tests) CUDA peak memory is reset between methods; on CPU it cannot be, and is left out.
    """
    import torch

    console = console or Console(stderr=True)
    learning_rates = learning_rates or {}
    runs = []  # (method, run name, config) for every trial of every method
    for name in methods:
        rates = [learning_rates[name]] if name in learning_rates else trial_learning_rates(name, lr_trials)
        for rate in rates:
            run_name = name if len(rates) == 1 else f"{name}/lr-{rate:g}"
            runs.append((name, run_name, method_config(config, name, output, steps, rate, run_name)))
    output.mkdir(parents=True, exist_ok=True)
    (output / "logs").mkdir(exist_ok=True)
    peak_memory_valid = isolate or torch.cuda.is_available()
    trials: dict[str, list[dict]] = {name: [] for name in methods}
    for index, (name, run_name, method_cfg) in enumerate(runs, start=1):
        console.print(f"[bold]{index}/{len(runs)} {name}[/] (lr {method_cfg.train.lr:g}) -> {method_cfg.output_dir}")
        log_path = output / "logs" / f"{run_name.replace('/', '-')}.log"
        started = time.perf_counter()
        if isolate:
            config_path = output / "configs" / f"{run_name.replace('/', '-')}.yaml"
            exit_code = train_in_subprocess(method_cfg, config_path, log_path)
        else:
            exit_code = train_in_process(method_cfg, log_path)
        if exit_code == 0 and (method_cfg.output_dir / "summary.json").is_file():
            trials[name].append(figures(name, method_cfg, method_cfg.output_dir, metric, peak_memory_valid))
        else:
            tail = log_path.read_text(encoding="utf-8").strip().splitlines()[-1:] if log_path.is_file() else []
            console.print(f"[red]{name} failed[/] (exit {exit_code}): {' '.join(tail)} (log: {log_path})")
            trials[name].append({"method": name, "lr": method_cfg.train.lr, "status": f"failed (exit {exit_code})",
                                 "log": str(log_path)})
        console.print(f"  done in {time.perf_counter() - started:.0f} s")
    rows = [best_trial(trials[name]) for name in methods]
    (output / "results.json").write_text(json.dumps({"methods": rows}, indent=2), encoding="utf-8")
    write_report(rows, output / "report.html", config)
    return rows


def best_trial(trials: list[dict]) -> dict:
    """The trial with the best task metric after training (the first that ran, if none has one), with
    every trial's learning rate and metric under `lr_trials`."""
    done = [row for row in trials if row["status"] == "ok"]
    scored = [row for row in done if row["metric_after"] is not None]
    best = (done or trials)[0]
    for row in scored:
        if best.get("metric_after") is None or better(row["metric"], row["metric_after"], best["metric_after"]):
            best = row
    if len(trials) > 1:
        best = {**best, "lr_trials": [
            {"lr": row["lr"], "metric_after": row.get("metric_after"), "status": row["status"]} for row in trials]}
    return best


# --- table and report --------------------------------------------------------------------------------------------

COLUMNS = (
    ("method", "method"), ("lr", "lr"), ("trainable_params", "trainable"), ("trainable_percent", "trainable %"),
    ("peak_memory_mb", "peak MB"), ("tokens_per_s", "tokens/s"), ("metric_before", "before"),
    ("metric_after", "after"), ("learning", "learning"), ("forgetting", "forgetting"), ("status", "status"),
)


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def results_table(rows: list[dict]) -> Table:
    metric = next((row["metric"] for row in rows if "metric" in row), "metric")
    table = Table(title=f"methods compared ({metric} before / after)")
    for key, label in COLUMNS:
        table.add_column(label, justify="left" if key in ("method", "status") else "right")
    for row in rows:
        table.add_row(*(_shown(row.get(key)) for key, _ in COLUMNS))
    return table


def comparison_figure(rows: list[dict]):
    """Left: task metric after training against trainable parameters (log scale). Right: throughput and
    peak memory per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [row for row in rows if row["status"] == "ok"]
    figure, (quality, cost) = plt.subplots(1, 2, figsize=(11, 4))
    for row in done:
        if row["metric_after"] is not None:
            quality.scatter(row["trainable_params"], row["metric_after"])
            quality.annotate(row["method"], (row["trainable_params"], row["metric_after"]),
                             textcoords="offset points", xytext=(4, 4))
    quality.set_xscale("log")
    quality.set_xlabel("trainable parameters")
    quality.set_ylabel(f"{done[0]['metric']} after training" if done else "metric")
    names = [row["method"] for row in done]
    positions = range(len(done))
    cost.bar([p - 0.2 for p in positions], [row["tokens_per_s"] for row in done], width=0.4, label="tokens/s")
    cost.set_ylabel("tokens/s")
    memory = cost.twinx()
    memory.bar([p + 0.2 for p in positions], [row["peak_memory_mb"] or 0 for row in done], width=0.4,
               color="tab:orange", label="peak MB")
    memory.set_ylabel("peak memory (MB)")
    cost.set_xticks(list(positions), names)
    figure.legend(loc="lower right", ncol=2, bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    return figure


def write_report(rows: list[dict], path: Path, config: RunConfig) -> Path:
    report = Report("tunesmith: methods compared")
    report.text(f"model {config.model.name}, task {config.task}, data {config.data.described}; "
                f"the same data and step budget for every method.")
    failed = [row["method"] for row in rows if row["status"] != "ok"]
    if failed:
        report.warning(f"failed: {', '.join(failed)} (see OUTPUT/logs/)")
    report.heading("Results")
    report.table([[row.get(key) for key, _ in COLUMNS] for row in rows], [label for _, label in COLUMNS])
    if any(row["status"] == "ok" for row in rows):
        report.heading("Quality against cost")
        report.figure(comparison_figure(rows), "task metric against trainable parameters; throughput and memory")
    return report.write(path)


# --- command ---------------------------------------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    @app.command("compare-methods")
    def compare_methods_command(
        config: Annotated[Path, typer.Argument(help="Run config (YAML); its method section is replaced per method.")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the runs, results.json, report.")],
        methods: Annotated[str, typer.Option(help="Comma-separated methods to compare.")] = DEFAULT_METHODS,
        steps: Annotated[int | None, typer.Option(min=1, help="Optimiser steps per method (default: the config's).")]
        = None,
        lr: Annotated[list[str] | None, typer.Option(
            "--lr", help="A method's learning rate, e.g. --lr lora=2e-4 (repeatable); default: the method's own.")]
        = None,
        lr_trials: Annotated[int, typer.Option(
            min=1, help="Try K learning rates across each method's recommended range; keep the best on eval.")] = 1,
        metric: Annotated[str | None, typer.Option(
            help="Metric compared (default: early_stopping.metric, else accuracy, else eval_loss).")] = None,
        isolate: Annotated[bool, typer.Option(help="Train each method in its own process (honest peak memory).")]
        = True,
        overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a config key (repeatable).")]
        = None,
    ) -> None:
        """Train the same task with each method; table and plot of parameters, memory, speed, quality, forgetting."""
        from tunesmith.config import load_config

        run_config = load_config(config, overrides)
        names = parse_methods(methods)
        rates = parse_learning_rates(lr or [], names)
        rows = compare_methods(run_config, names, output, steps, rates, metric, isolate,
                               console=Console(stderr=True), lr_trials=lr_trials)
        Console().print(results_table(rows))
        Console().print(f"results: {output / 'results.json'}, report: {output / 'report.html'}")
        if any(row["status"] != "ok" for row in rows):
            raise typer.Exit(1)
