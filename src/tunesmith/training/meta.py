"""Reptile meta-learning: an initialisation (or adapter init) that adapts to a new task in a few steps.

Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms" (arXiv:1803.02999).
Reptile repeats: sample a task, start from the current weights θ, take k optimiser steps on that
task's loss to reach φ, then move θ towards φ:

    θ <- θ + ε (φ - θ)                          (Algorithm 1, serial)
    θ <- θ + ε (1/n) Σ_i (φ_i - θ)              (Algorithm 2, batched over n tasks)

with the outer step size ε annealed linearly to a final value (0 in the paper). Only the parameters
the method makes trainable take part, so full fine-tuning meta-learns the model's weights and LoRA
meta-learns an adapter initialisation on the frozen base. The loss is the objective's own, normalised
by its loss-token count through the loop's `accumulate_gradients`; the inner optimiser is fresh for
every task, exactly as it is when the result is later adapted to a new task.

Tasks are the datasets of `data.mixture`: every prepared example carries `task`, its dataset's name.
`meta_train` takes the examples grouped by task, so it runs as well on tasks built in memory.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
import typer
from pydantic import Field
from rich.console import Console

from tunesmith.errors import ConfigError, DataError
from tunesmith.registry import closest
from tunesmith.settings import Section

if TYPE_CHECKING:
    from accelerate import Accelerator

    from tunesmith.config import RunConfig
    from tunesmith.objectives.base import ObjectiveSpec

# tunesmith.config imports MetaConfig from here, and the training loop imports tunesmith.config, so
# this module imports the loop's helpers inside the functions that use them, never at the top.


class MetaConfig(Section):
    """The `meta:` section: Reptile meta-training (`tunesmith meta-train`). Defaults are the paper's
    few-shot classification settings (Nichol et al. 2018, appendix A), except the step count."""

    algorithm: Literal["reptile"] = Field("reptile", description="Meta-learning algorithm (first-order: Reptile).")
    meta_steps: int = Field(1000, ge=1, description="Outer (meta) updates; the paper runs 100K on Omniglot.")
    tasks_per_step: int = Field(
        5, ge=1, description="Tasks adapted from the same weights per outer update; their updates are averaged "
        "(batched Reptile, Algorithm 2). Tasks are drawn in proportion to their share of the mixture."
    )
    inner_steps: int = Field(5, ge=1, description="Optimiser steps k on one task before the outer update.")
    inner_batch_size: int = Field(10, ge=1, description="Examples per inner step, drawn from one task.")
    inner_optimizer: Literal["adam", "sgd"] = Field(
        "adam", description="Inner optimiser, fresh for every task: Adam with beta1 = 0 (as in the authors' code) "
        "or plain SGD."
    )
    inner_lr: float = Field(1e-3, gt=0, description="Inner optimiser learning rate.")
    outer_lr: float = Field(1.0, ge=0, le=1, description="Outer step size ε at the first meta step.")
    outer_lr_final: float = Field(0.0, ge=0, le=1, description="ε at the last meta step; annealed linearly.")
    held_out_tasks: list[str] = Field(
        default_factory=list,
        description="Mixture tasks kept out of meta-training: summary.json reports their eval loss after "
        "inner_steps steps on their training data, from the base weights and from the meta-learned ones.",
    )
    seed: int = Field(42, description="Seed for task sampling, batch order and dropout.")


# --- the algorithm ------------------------------------------------------------------------------------------------


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters Reptile meta-learns: those the method made trainable (each shared tensor once)."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def task_batches(
    examples: list[dict], batch_size: int, collate: Callable[[list[dict], int], dict], pad_id: int,
    rng: random.Random,
) -> Iterator[dict]:
    """Endless collated batches of one task: a fresh shuffle each pass, every example once before any twice."""
    while True:
        order = rng.sample(range(len(examples)), len(examples))
        for start in range(0, len(order), batch_size):
            yield collate([examples[index] for index in order[start : start + batch_size]], pad_id)


def build_inner_optimizer(parameters: list[torch.nn.Parameter], meta: MetaConfig) -> torch.optim.Optimizer:
    if meta.inner_optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=meta.inner_lr)
    # beta1 = 0: openai/supervised-reptile builds its inner optimiser as Adam(beta1=0) (models.py).
    return torch.optim.Adam(parameters, lr=meta.inner_lr, betas=(0.0, 0.999))


def adapt(
    model: torch.nn.Module, parameters: list[torch.nn.Parameter], batches: Iterator[dict], meta: MetaConfig,
    objective: ObjectiveSpec, settings: Any, accelerator: Accelerator,
) -> list[float]:
    """Take `meta.inner_steps` steps of a fresh inner optimiser on `batches`, in place; the loss before each step.

    This is Reptile's inner loop and also the few-shot adaptation it is meant to speed up, so the two
    cannot drift apart. Each step's loss is the mean over its loss tokens (the loop's normalisation).
    """
    from tunesmith.training.loop import accumulate_gradients

    optimizer = build_inner_optimizer(parameters, meta)
    losses = []
    for batch in islice(batches, meta.inner_steps):
        step_loss, *_ = accumulate_gradients(model, objective, settings, [[batch]], accelerator)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss.item())
    return losses


def reptile_step(
    model: torch.nn.Module, parameters: list[torch.nn.Parameter], task_streams: list[Iterator[dict]],
    outer_lr: float, meta: MetaConfig, objective: ObjectiveSpec, settings: Any, accelerator: Accelerator,
) -> list[list[float]]:
    """One outer update of batched Reptile (Nichol et al. 2018, Algorithm 2); each task's inner losses.

    Every task adapts from the same θ to its φ_i, then θ <- θ + ε (1/n) Σ_i (φ_i - θ). With one task
    this is the serial Algorithm 1. The mean update is accumulated in float32 so that bfloat16
    weights do not lose the small differences φ_i - θ.
    """
    start = [parameter.detach().clone() for parameter in parameters]  # θ
    mean_update = [torch.zeros_like(parameter, dtype=torch.float32) for parameter in parameters]
    inner_losses = []
    for batches in task_streams:
        inner_losses.append(adapt(model, parameters, batches, meta, objective, settings, accelerator))
        with torch.no_grad():
            for update, parameter, theta in zip(mean_update, parameters, start, strict=True):
                update += (parameter.float() - theta.float()) / len(task_streams)  # (φ_i - θ) / n
                parameter.copy_(theta)
    with torch.no_grad():
        for parameter, theta, update in zip(parameters, start, mean_update, strict=True):
            parameter.copy_(theta.float() + outer_lr * update)
    return inner_losses


def outer_step_size(meta: MetaConfig, step: int) -> float:
    """ε at meta step `step` (0-based): linear from outer_lr to outer_lr_final (the paper anneals ε to 0)."""
    done = step / meta.meta_steps
    return (1 - done) * meta.outer_lr + done * meta.outer_lr_final


def check_objective(objective: ObjectiveSpec) -> None:
    """Reptile needs a loss computed from the trained model and the batch alone."""
    if objective.has_reference or objective.prepare_model is not None:
        raise ConfigError(
            f"task: meta-train supports objectives whose loss needs only the model and the batch (sft, pretrain, "
            f"classify); {objective.name} needs a reference model or its own modules"
        )


def meta_train(
    model: torch.nn.Module, tasks: dict[str, list[dict]], objective: ObjectiveSpec, settings: Any,
    meta: MetaConfig, pad_id: int, accelerator: Accelerator | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Reptile over `tasks` (name -> prepared examples); moves the model's trainable weights in place.

    Each outer step draws `meta.tasks_per_step` tasks (with replacement, each in proportion to its
    number of examples, which for a mixture is its weighted share) and applies `reptile_step`.
    Returns one record per outer step: the step, ε, the tasks drawn, and the inner loss at the first
    and the last inner step (means over the tasks); `on_step(record)` is called after each step.
    """

    from tunesmith.training.loop import run_accelerator

    check_objective(objective)
    empty = sorted(name for name, examples in tasks.items() if not examples)
    if not tasks or empty:
        raise DataError(f"meta-train: every task needs training examples; none for {empty or 'any task'}")
    accelerator = accelerator or run_accelerator("no")
    rng = random.Random(meta.seed)
    torch.manual_seed(meta.seed)
    names = sorted(tasks)
    shares = [len(tasks[name]) for name in names]
    streams = {
        name: task_batches(tasks[name], meta.inner_batch_size, objective.collate, pad_id, rng) for name in names
    }
    parameters = trainable_parameters(model)
    model.train()
    history = []
    for step in range(meta.meta_steps):
        drawn = rng.choices(names, weights=shares, k=meta.tasks_per_step)
        outer_lr = outer_step_size(meta, step)
        inner_losses = reptile_step(
            model, parameters, [streams[name] for name in drawn], outer_lr, meta, objective, settings, accelerator
        )
        record = {
            "step": step + 1,
            "outer_lr": outer_lr,
            "tasks": drawn,
            "inner_loss_first": sum(losses[0] for losses in inner_losses) / len(inner_losses),
            "inner_loss_last": sum(losses[-1] for losses in inner_losses) / len(inner_losses),
        }
        history.append(record)
        if on_step is not None:
            on_step(record)
    return history


def adaptation_loss(
    model: torch.nn.Module, support: list[dict], query: list[dict], meta: MetaConfig, objective: ObjectiveSpec,
    settings: Any, pad_id: int, accelerator: Accelerator,
) -> dict[str, float]:
    """Few-shot adaptation to one task: the objective's eval loss on `query` at the current weights
    ("before") and after `meta.inner_steps` inner steps on `support` ("after"). The weights are restored."""
    from tunesmith.training.loop import evaluate

    parameters = trainable_parameters(model)
    saved = [parameter.detach().clone() for parameter in parameters]
    batch_size = meta.inner_batch_size
    with accelerator.autocast():  # as the inner steps compute their loss
        before = evaluate(model, objective, settings, query, pad_id, batch_size, accelerator.device)["eval_loss"]
    batches = task_batches(support, batch_size, objective.collate, pad_id, random.Random(meta.seed))
    was_training = model.training
    model.train()
    adapt(model, parameters, batches, meta, objective, settings, accelerator)
    model.train(was_training)
    with accelerator.autocast():
        after = evaluate(model, objective, settings, query, pad_id, batch_size, accelerator.device)["eval_loss"]
    with torch.no_grad():
        for parameter, value in zip(parameters, saved, strict=True):
            parameter.copy_(value)
    return {"before": before, "after": after}


# --- from a run config to a run directory ------------------------------------------------------------------------


def examples_by_task(examples: list[dict], where: str) -> dict[str, list[dict]]:
    """Group prepared examples by their `task` (set for every dataset of `data.mixture`)."""
    tasks: dict[str, list[dict]] = {}
    for example in examples:
        if "task" not in example:
            raise ConfigError(f"{where}: meta-train learns across tasks; give them as data.mixture, one dataset each")
        tasks.setdefault(example["task"], []).append(example)
    return tasks


@dataclass
class MetaTasks:
    """The mixture's tasks split for meta-training: tasks to meta-train on, and held-out tasks to measure
    few-shot adaptation on (support = their training examples, query = their eval examples)."""

    train: dict[str, list[dict]]
    held_out: dict[str, tuple[list[dict], list[dict]]]


def split_tasks(train_examples: list[dict], eval_examples: list[dict], meta: MetaConfig) -> MetaTasks:
    """Group the prepared mixture by task and set `meta.held_out_tasks` aside, with one-line errors."""
    train = examples_by_task(train_examples, "data.mixture")
    evaluation = examples_by_task(eval_examples, "data.mixture")
    held_out = {}
    for name in meta.held_out_tasks:
        if name not in train:
            raise ConfigError(f"meta.held_out_tasks: {name!r} is not a data.mixture task{closest(name, train)}; "
                              f"tasks: {', '.join(sorted(train))}")
        if not evaluation.get(name):
            raise ConfigError(f"meta.held_out_tasks: task {name!r} has no eval examples to measure adaptation on; "
                              "give its mixture dataset an `eval` file or set data.eval_split > 0")
        held_out[name] = (train.pop(name), evaluation[name])
    if not train:
        raise ConfigError("meta.held_out_tasks: holds every mixture task; leave at least one to meta-train on")
    return MetaTasks(train=train, held_out=held_out)


@dataclass
class MetaRunResult:
    run_dir: Path
    summary: dict[str, Any]


def held_out_adaptation(
    model: torch.nn.Module, held_out: dict[str, tuple[list[dict], list[dict]]], meta: MetaConfig,
    objective: ObjectiveSpec, settings: Any, pad_id: int, accelerator: Accelerator,
) -> dict[str, dict[str, float]]:
    """`adaptation_loss` of every held-out task (support = its training examples, query = its eval examples)."""
    return {
        name: adaptation_loss(model, support, query, meta, objective, settings, pad_id, accelerator)
        for name, (support, query) in held_out.items()
    }


def meta_train_run(
    config: RunConfig, meta: MetaConfig | None = None, overwrite: bool = False, console: Console | None = None,
) -> MetaRunResult:
    """`tunesmith meta-train`: Reptile over the tasks of `data.mixture`, written to `config.output_dir`.

    The run directory holds what `tunesmith train` writes (config.yaml, adapter/ or model/,
    metrics.jsonl with one line per outer step, summary.json), so the result is the starting point of
    a later fine-tuning run. `meta` defaults to the config's `meta:` section.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from tunesmith.data import write_rejects
    from tunesmith.data.cache import prepare_data_cached
    from tunesmith.methods import METHODS, count_parameters
    from tunesmith.models import load_model, load_tokenizer
    from tunesmith.objectives import OBJECTIVES
    from tunesmith.training.distributed import ProcessGroup
    from tunesmith.training.loop import export_weights, mixed_precision, prepare_run_dir, run_accelerator
    from tunesmith.training.metrics import MetricsLog, peak_memory_mb

    meta = meta if meta is not None else (config.meta or MetaConfig())
    console = console or Console(stderr=True)
    objective = OBJECTIVES.get(config.task, "task")
    method = METHODS.get(config.method.name, "method.name")
    check_objective(objective)
    if config.data.mixture is None:
        raise ConfigError("data.mixture: meta-train learns across tasks; give them as data.mixture, one dataset each")
    accelerator = run_accelerator(mixed_precision(config))
    group = ProcessGroup(accelerator)
    if group.world > 1:
        raise ConfigError("meta-train runs in one process; start it without torchrun or accelerate launch")

    run_dir = prepare_run_dir(config, resume=False, overwrite=overwrite, group=group)
    torch.manual_seed(meta.seed)
    tokenizer = load_tokenizer(config.model)
    data = prepare_data_cached(config, tokenizer)
    write_rejects(data.rejects, run_dir / "rejects.jsonl")
    tasks = split_tasks(data.train, data.eval, meta)
    if data.label_names is not None:
        (run_dir / "labels.json").write_text(json.dumps(data.label_names), encoding="utf-8")

    model = load_model(config.model, config.task, data.label_names)
    model = method.apply(model, config.method, config.task).to(accelerator.device)
    trainable_params, total_params = count_parameters(model)
    pad_id = tokenizer.pad_token_id
    console.print(
        f"[bold]reptile[/] with {config.method.name}: meta-learning {trainable_params:,} of {total_params:,} "
        f"parameters over {len(tasks.train)} tasks ({', '.join(sorted(tasks.train))})"
    )
    adaptation_from_base = held_out_adaptation(
        model, tasks.held_out, meta, objective, config.objective, pad_id, accelerator
    )

    log = MetricsLog(run_dir, config.train.report_to, append=False)
    progress = Progress(
        TextColumn("[bold]meta-train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("inner loss {task.fields[first]} -> {task.fields[last]}"), TextColumn("ε {task.fields[outer]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )
    started = time.perf_counter()
    with progress:
        bar = progress.add_task("meta", total=meta.meta_steps, first="-", last="-", outer="-")

        def record_step(record: dict) -> None:
            log.write(record)
            progress.update(bar, completed=record["step"], first=f"{record['inner_loss_first']:.4f}",
                            last=f"{record['inner_loss_last']:.4f}", outer=f"{record['outer_lr']:.3f}")

        history = meta_train(
            model, tasks.train, objective, config.objective, meta, pad_id, accelerator, on_step=record_step
        )
    log.close()
    seconds = time.perf_counter() - started
    adaptation_from_meta = held_out_adaptation(
        model, tasks.held_out, meta, objective, config.objective, pad_id, accelerator
    )
    export_dir = export_weights(model, method, tokenizer, run_dir, config.train.export_shard_size)

    summary = {
        "algorithm": meta.algorithm,
        "meta_steps": meta.meta_steps,
        "tasks": {name: len(examples) for name, examples in sorted(tasks.train.items())},
        "inner_loss_first": history[-1]["inner_loss_first"],
        "inner_loss_last": history[-1]["inner_loss_last"],
        "held_out": {
            name: {"base": adaptation_from_base[name], "meta": adaptation_from_meta[name]} for name in tasks.held_out
        },
        "adaptation_steps": meta.inner_steps,
        "meta_seconds": round(seconds, 3),
        "trainable_params": trainable_params,
        "total_params": total_params,
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "exported": export_dir.name,
        "data": data.stats,
        "method": config.method.name,
        "task": config.task,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return MetaRunResult(run_dir=run_dir, summary=summary)


# --- command ---------------------------------------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    from rich.table import Table

    @app.command("meta-train")
    def meta_train_command(
        config: Annotated[Path, typer.Argument(help="Run config (YAML) with data.mixture (one dataset per task) "
                                                    "and a meta: section.")],
        overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a config key (repeatable).")]
        = None,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing run in output_dir.")] = False,
    ) -> None:
        """Reptile meta-training over the tasks of data.mixture: an initialisation that adapts in few steps."""
        from tunesmith.config import load_config

        run_config = load_config(config, overrides)
        result = meta_train_run(run_config, overwrite=overwrite, console=Console(stderr=True))
        summary = result.summary
        if summary["held_out"]:
            steps = summary["adaptation_steps"]
            table = Table(title=f"held-out tasks: eval loss after {steps} adaptation steps")
            for column in ("task", "from base", "from meta-init"):
                table.add_column(column, justify="left" if column == "task" else "right")
            for name, losses in summary["held_out"].items():
                table.add_row(name, f"{losses['base']['after']:.4f}", f"{losses['meta']['after']:.4f}")
            Console().print(table)
        Console().print(
            f"{summary['meta_steps']} meta steps over {len(summary['tasks'])} tasks "
            f"in {summary['meta_seconds']:.0f} s; {summary['exported']}/ written to {result.run_dir}"
        )
