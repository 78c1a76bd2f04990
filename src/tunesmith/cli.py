"""The `tunesmith` command: parse arguments, load config, call the stage, print. No logic here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table

from tunesmith.errors import UserError

app = typer.Typer(
    help="Fine-tune a pretrained language model on your data, evaluate it, ship it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Look at data the way the model will see it.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)

@app.callback()
def _quiet_libraries() -> None:
    """Keep the terminal for tunesmith's own progress: library progress bars and info logs off."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


ConfigPath = Annotated[Path, typer.Argument(help="Run config (YAML).")]
Overrides = Annotated[
    list[str] | None, typer.Option("--set", help="Override a key: --set train.lr=1e-4 (repeatable).")
]
RunDir = Annotated[Path, typer.Argument(help="A run directory written by `tunesmith train`.")]


@app.command()
def train(
    config: ConfigPath,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in output_dir.")] = False,
) -> None:
    """Fine-tune: config -> run directory (model or adapter, metrics, summary)."""
    from tunesmith.config import load_config
    from tunesmith.pipeline import run
    from tunesmith.training.launch import inside_launch, launch_rank, launch_with_accelerate

    run_config = load_config(config, overrides)
    accelerate_config = run_config.train.accelerate_config
    if accelerate_config is not None and not inside_launch():
        arguments = [str(config), *(part for pair in overrides or [] for part in ("--set", pair))]
        arguments += ["--resume"] * resume + ["--overwrite"] * overwrite
        raise typer.Exit(launch_with_accelerate(accelerate_config, arguments))
    result = run(run_config, resume=resume, overwrite=overwrite)
    if launch_rank() != 0:  # every process of a launched run has the same summary: the first one prints it
        raise typer.Exit(result.exit_code)
    summary = result.summary
    table = Table(title=f"run {result.run_dir}")
    table.add_column("metric")
    for column in ("before", "after", "best"):
        table.add_column(column, justify="right")
    before, after, best = summary["eval_before"] or {}, summary["eval"] or {}, summary["best"] or {}
    for key in dict.fromkeys([*before, *after]):
        table.add_row(key, *(_fmt(part.get(key)) for part in (before, after, best)))
    console.print(table)
    console.print(
        f"{summary['steps']} steps, {summary['train_tokens']:,} tokens in {summary['train_seconds']:.0f} s "
        f"({summary['tokens_per_s']:.0f} tok/s), peak memory {summary['peak_memory_mb']:.0f} MB"
    )
    raise typer.Exit(result.exit_code)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@app.command()
def plan(
    config: ConfigPath,
    overrides: Overrides = None,
    budget_gb: Annotated[
        float | None, typer.Option(help="Memory per device in GiB; default: this GPU's, else system RAM.")
    ] = None,
    gpu: Annotated[bool | None, typer.Option("--gpu/--cpu", help="Plan for a GPU (bf16) or the CPU.")] = None,
    processes: Annotated[int | None, typer.Option(
        min=1, help="Processes (devices) the run will use; default: train.accelerate_config's, else 1. Sharded "
                    "(train.sharding: fsdp), each holds 1/N of the layers.")] = None,
) -> None:
    """Estimate memory per device for a run config, and what to change when it will not fit."""
    import torch

    from tunesmith.config import load_config
    from tunesmith.plan import plan_memory

    run_config = load_config(config, overrides)
    on_gpu = torch.cuda.is_available() if gpu is None else gpu
    if budget_gb is None:
        budget_gb = _device_memory_gib(on_gpu)
    estimate = plan_memory(run_config, budget_gb, on_gpu, processes)
    processes = estimate.processes
    sharding = f", fsdp over {processes}" if estimate.sharded else f", {processes} replicas" if processes > 1 else ""
    table = Table(title=f"memory per device: {run_config.model.name}, {run_config.method.name}{sharding}, "
                        f"batch {run_config.train.batch_size} x {run_config.data.max_length} tokens")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    for name, gib in estimate.parts_gib.items():
        table.add_row(name, f"{gib:.2f}")
    table.add_row("[bold]total[/]", f"[bold]{estimate.total_gib:.2f}[/]")
    console.print(table)
    console.print(f"trainable {estimate.trainable_params:,} of {estimate.total_params:,} parameters; "
                  f"budget {budget_gb:.1f} GiB: {'fits' if estimate.fits else 'does NOT fit'}")
    if not on_gpu:
        from tunesmith.training.memory import resident_mb

        console.print(f"not counted: the process itself (imports), {resident_mb() / 2**10:.2f} GiB resident in this "
                      "one, and as much in a training process")
    loading = estimate.loading
    if loading is not None:
        how = " (loaded as stored, each layer converted as it is sharded)" if loading.as_stored else ""
        console.print(f"host memory while loading: {loading.private_gib:.2f} GiB per process{how}, and the weight "
                      f"files' {loading.shared_gib:.2f} GiB of pages, shared by a node's processes")
    for line in estimate.advice:
        console.print(f"  change {line}")
    raise typer.Exit(0 if estimate.fits else 1)


def _device_memory_gib(on_gpu: bool) -> float:
    import os

    import torch

    if on_gpu and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


@app.command()
def models() -> None:
    """List the built-in models and whether they are installed."""
    from tunesmith.models import list_builtins

    table = Table(title="built-in models")
    for column in ("name", "installed", "package", "description"):
        table.add_column(column)
    for entry in list_builtins():
        table.add_row(entry["name"], "yes" if entry["installed"] else "no", entry["package"], entry["description"])
    console.print(table)


@data_app.command("inspect")
def data_inspect(
    path: Annotated[Path, typer.Argument(help="A data file or folder.")],
    model: Annotated[str, typer.Option(help="Model whose tokenizer and template apply.")] = "smollm2-135m-instruct",
    task: Annotated[str, typer.Option(help="sft, pretrain or classify.")] = "sft",
    overrides: Overrides = None,
) -> None:
    """Detected format, record count, token lengths, and the first record with trained tokens marked."""
    from tunesmith.config import build_config, merge, parse_overrides
    from tunesmith.data import inspect_data
    from tunesmith.models import load_tokenizer

    run_config = build_config(
        merge({"model": {"name": model}, "data": {"train": str(path)}, "task": task}, parse_overrides(overrides or []))
    )
    tokenizer = load_tokenizer(run_config.model)
    report = inspect_data(run_config.data.train, tokenizer, run_config.data, run_config.task)
    if report:
        console.print(report, markup=False, highlight=False)


@app.command()
def generate(
    run: RunDir,
    prompt: Annotated[list[str], typer.Option(help="A prompt (repeatable).")],
    base: Annotated[bool, typer.Option(help="Also answer with the untuned base model, side by side.")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
) -> None:
    """Answer prompts with a trained run, using its saved chat template."""
    from tunesmith.inference import compare
    from tunesmith.inference import generate as generate_text
    from tunesmith.models import load_run

    model, tokenizer = load_run(run)
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature}
    if not base:
        for answer in generate_text(model, tokenizer, prompt, **settings):
            console.print(answer)
        return
    # An adapter run answers as the base with its adapters disabled; a full run loads the base.
    base_model, base_tokenizer = (None, None) if hasattr(model, "disable_adapter") else load_run(run, base=True)
    table = Table(show_lines=True)
    for column in ("prompt", "base", "tuned"):
        table.add_column(column, ratio=1)
    for answer in compare(model, tokenizer, prompt, base_model, base_tokenizer, **settings):
        table.add_row(answer.prompt, answer.base, answer.tuned)
    console.print(table)


@app.command()
def chat(
    run: RunDir,
    base: Annotated[bool, typer.Option(help="Chat with the untuned base model instead.")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.7,
) -> None:
    """Chat with a trained run in the terminal, streaming tokens (/exit or Ctrl-D to end)."""
    from tunesmith.inference import chat as chat_loop
    from tunesmith.models import load_run

    model, tokenizer = load_run(run, base=base)
    chat_loop(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature)


@app.command()
def export(
    run: RunDir,
    merge: Annotated[Path, typer.Option("--merge", help="Write a merged full model to this folder.")],
) -> None:
    """Write a run's result as one full model folder that plain transformers loads."""
    from tunesmith.export import export_merged

    written = export_merged(run, merge)
    console.print(f"merged model written to {written}")


def _register_stage_commands() -> None:
    """Stages that live in their own package add their commands here (one `register(app)` each)."""
    import importlib

    for module_name in STAGE_COMMANDS:
        importlib.import_module(module_name).register(app)


STAGE_COMMANDS: tuple[str, ...] = (
    "tunesmith.curate.cli",
    "tunesmith.evaluate.cli",
    "tunesmith.preference_cli",
    "tunesmith.compare_methods",
    "tunesmith.distill_data",
    "tunesmith.training.meta",
)
_register_stage_commands()


# typer >= 0.29 raises the exceptions of its own bundled click, which are not click's classes.
try:
    from typer._click import exceptions as _bundled_click
except ImportError:  # older typer: plain click
    _bundled_click = click.exceptions
EXIT_EXCEPTIONS = (click.exceptions.Exit, typer.Exit)
ABORT_EXCEPTIONS = (click.exceptions.Abort, typer.Abort)
USAGE_EXCEPTIONS = (click.ClickException, _bundled_click.ClickException)


def main() -> None:
    """Entry point: user errors become one line and exit code 2, never a traceback."""
    try:
        # Without standalone mode click returns a command's exit code instead of exiting.
        exit_code = app(standalone_mode=False)
        sys.exit(exit_code if isinstance(exit_code, int) else 0)
    except UserError as error:
        err_console.print(f"[red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except EXIT_EXCEPTIONS as done:
        sys.exit(done.exit_code)
    except ABORT_EXCEPTIONS:
        sys.exit(130)
    except USAGE_EXCEPTIONS as error:
        err_console.print(f"[red]error:[/] {error.format_message()}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
