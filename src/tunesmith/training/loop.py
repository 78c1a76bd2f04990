"""The one training loop, shared by every method and objective.

It owns devices and precision (accelerate), the data order, gradient accumulation with loss
normalised by the total number of loss tokens in each optimiser step, clipping, the schedule,
evaluation, early stopping, the best-checkpoint export, checkpoints and resume, signals and
logging. A method decides what trains; an objective decides what the loss is; nothing else
about training lives outside this file and its helpers in this package.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, is_initialized
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tunesmith.config import ModelConfig, RunConfig, dump_config
from tunesmith.continual import prepare_continual
from tunesmith.data import write_rejects
from tunesmith.data.cache import prepare_data_cached
from tunesmith.data.collate import batch_order, collate_packed, eval_batches, pack_examples, task_batch_order
from tunesmith.errors import ConfigError, DataError
from tunesmith.methods import METHODS, count_parameters
from tunesmith.methods.base import MethodSpec
from tunesmith.models import load_model, load_tokenizer, resolve_dtype
from tunesmith.objectives import OBJECTIVES
from tunesmith.objectives.base import LossOutput, ObjectiveSpec, add_sums, evaluation_totals
from tunesmith.objectives.causal_lm import compiled_loss_chunks
from tunesmith.plan import device_memory_note, mixed_precision_of
from tunesmith.training.checkpoint import (
    complete_checkpoints,
    load_best,
    load_checkpoint,
    save_best,
    save_checkpoint,
)
from tunesmith.training.compile import CUDA_GRAPH_MODES, check_compile_mode, check_compiler, compile_layers
from tunesmith.training.deepspeed_config import check_global_batch, zero_plan
from tunesmith.training.distributed import ProcessGroup
from tunesmith.training.keyed_dropout import dropout_seed, keyed_dropout_in, part_seeds
from tunesmith.training.memory import LIMIT_SHARE, FreedMemory, freed_memory
from tunesmith.training.metrics import MetricsLog, peak_memory_mb
from tunesmith.training.optim import build_optimizer, build_scheduler
from tunesmith.training.packed_attention import step_attention
from tunesmith.training.parallel_rows import (
    RowThreads,
    active_dropout,
    balanced_parts,
    parallel_rows_choice,
    swapped_weights,
)
from tunesmith.training.recompute import enable_recompute
from tunesmith.training.reference import ReferenceModel, add_reference_outputs, training_batch
from tunesmith.training.rms_norm import use_fast_rms_norm
from tunesmith.training.sharded_export import save_sharded_model, streamable
from tunesmith.training.sharding import (
    adapter_parameters,
    clip_gradients,
    gather_for_export,
    keeps_float32_modules,
    load_as_stored,
    place_unsharded,
    reduce_gradients,
    shard_layers,
    sharding_choice,
)
from tunesmith.training.weight_casts import cached_weight_casts, casts_kept, use_kept_casts

EXIT_INTERRUPTED = 130
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict[str, Any]
    exit_code: int


class StopSignal:
    """Turns SIGINT / SIGTERM into a flag the loop checks after each optimiser step."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def node_processes() -> int:
    """This node's processes of the run (torchrun and accelerate launch set LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def prepare_run_dir(config: RunConfig, resume: bool, overwrite: bool, group: ProcessGroup) -> Path:
    """Check the run directory before any expensive work starts (every process), then create it (main)."""
    run_dir = config.output_dir
    has_content = run_dir.exists() and any(run_dir.iterdir())
    if resume:
        if not complete_checkpoints(run_dir / "checkpoints"):
            raise ConfigError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
    elif has_content and not overwrite:
        raise ConfigError(
            f"output_dir: {run_dir} already holds files; pass --resume to continue that run, "
            "--overwrite to replace it, or choose another output_dir"
        )
    group.barrier()
    if group.is_main:
        if has_content and not resume:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    group.barrier()
    return run_dir


def epoch_order(
    lengths: list[int], tasks: list[str] | None, config: RunConfig, group: ProcessGroup, epoch: int
) -> list[list[int]]:
    """The global micro-batches of one epoch; with a data mixture (`tasks` given) each holds one task."""
    global_size = config.train.batch_size * group.world
    if tasks is None:
        return batch_order(lengths, global_size, config.train.seed, epoch, config.data.group_by_length)
    return task_batch_order(lengths, tasks, global_size, config.train.seed, epoch, config.data.group_by_length)


@dataclass(frozen=True)
class Share:
    """This process's items of one global micro-batch. A global batch smaller than the number of processes
    leaves some processes nothing: they run a `stand_in` (the batch's first item) whose loss is weighted 0, so
    every process runs the same forwards and collectives and the weights move as one process's would."""

    indices: list[int]
    stand_in: bool = False


def micro_batch_stream(
    lengths: list[int], config: RunConfig, start: int, group: ProcessGroup, tasks: list[str] | None = None
) -> Iterator[Share]:
    """This process's share of each global micro-batch, epoch after epoch, from global micro-batch `start`.

    A global micro-batch holds batch_size x processes items and each process takes its share, so
    the order of global batches does not depend on how many processes there are, and every global batch is
    trained on (an epoch's tail, a mixture task's last batch), however few items it holds.
    """
    per_epoch = len(epoch_order(lengths, tasks, config, group, 0))
    epoch, offset = divmod(start, per_epoch)
    while True:
        order = epoch_order(lengths, tasks, config, group, epoch)
        for global_batch in order[offset:]:
            mine = group.shard(global_batch)
            yield Share(mine) if mine else Share(global_batch[:1], stand_in=True)
        epoch, offset = epoch + 1, 0


def check_resume_batch(state: dict, batch_size: int, processes: int) -> None:
    """Resuming on another number of processes continues the same data order as long as the global
    micro-batch (train.batch_size x processes) is the one the checkpoint was written with."""
    saved = state.get("global_batch")
    if saved is None or saved == batch_size * processes:
        return
    hint = (f"set train.batch_size to {saved // processes} for {processes} process(es)" if saved % processes == 0
            else f"launch a number of processes that divides {saved}")
    raise ConfigError(
        f"train.batch_size: the checkpoint was written with a global micro-batch of {saved}; {batch_size} x "
        f"{processes} process(es) gives {batch_size * processes}; {hint} to resume it"
    )


def training_items(examples: list[dict], config: RunConfig) -> tuple[list, list[str] | None]:
    """What one micro-batch index points at (an example, or a packed row of examples), and each
    item's task for a data mixture (None without one). Packing never puts two tasks in one row."""
    by_task: dict[str | None, list[dict]] = {}
    for example in examples:
        by_task.setdefault(example.get("task"), []).append(example)
    items: list = []
    tasks: list[str] = []
    for task, task_examples in by_task.items():
        rows = pack_examples(task_examples, config.data.max_length) if config.data.packing else task_examples
        items += rows
        tasks += [task] * len(rows)
    return items, (tasks if config.data.mixture is not None else None)


def item_length(item: dict | list[dict]) -> int:
    rows = item if isinstance(item, list) else [item]
    return sum(len(example["input_ids"]) for example in rows)


def per_task_losses(
    task_losses: dict[str, tuple[torch.Tensor, int]], task_names: list[str], group: ProcessGroup
) -> dict[str, float]:
    """`<task>/loss`: each mixture task's mean loss over its loss tokens in this step, across processes
    (absent for a task with no micro-batch in the step)."""
    if not task_names:
        return {}
    sums = [float(task_losses[name][0]) if name in task_losses else 0.0 for name in task_names]
    counts = [task_losses[name][1] if name in task_losses else 0 for name in task_names]
    totals = group.sum(sums + counts)
    return {
        f"{name}/loss": total / count
        for name, total, count in zip(task_names, totals[: len(task_names)], totals[len(task_names):], strict=True)
        if count > 0
    }


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def evaluate(
    model, objective: ObjectiveSpec, settings, examples: list[dict], pad_id: int, batch_size: int, device,
    reference: ReferenceModel | None = None, task_names: list[str] = (), group: ProcessGroup | None = None,
    sharded: bool = False,
) -> dict:
    """The objective's metrics on `examples`, and for a data mixture each task's as `<task>/<metric>`.

    Each record is evaluated once: a mixture's records in batches of one task, whose totals (the objective's
    `eval_sums`) make each task's metrics and, added up, the whole set's. With several processes (`group`) each
    evaluates every world-th batch and the totals are added across them, so every process gets the same metrics;
    in a `sharded` run, whose forwards are collective, a process with a batch fewer runs one more and drops it."""
    rank, world = (group.rank, group.world) if group is not None else (0, 1)
    by_task: dict[str | None, list[dict]] = {}
    for example in examples:
        by_task.setdefault(example.get("task") if task_names else None, []).append(example)
    was_training = model.training
    model.eval()
    totals = {}
    for task, records in by_task.items():
        batches = list(eval_batches([len(record["input_ids"]) for record in records], batch_size))
        mine = batches[rank::world]
        collated = evaluation_batches(model, objective, settings, records, mine, pad_id, device, reference)
        totals[task] = evaluation_totals(objective, model, collated, settings)
        if sharded and len(mine) < len(batches[::world]):
            spare = evaluation_batches(model, objective, settings, records, batches[:1], pad_id, device, reference)
            evaluation_totals(objective, model, spare, settings)
    model.train(was_training)
    if world > 1:
        on_host = {task: {name: value.item() if isinstance(value, torch.Tensor) else value
                          for name, value in task_totals.items()} for task, task_totals in totals.items()}
        every_process = group.gather(on_host)
        totals = {task: functools.reduce(add_sums, [part[task] for part in every_process], {}) for task in totals}
    metrics = objective.eval_metrics(functools.reduce(add_sums, totals.values(), {}))
    for name in task_names:
        if name in totals:
            metrics.update({f"{name}/{key}": value for key, value in objective.eval_metrics(totals[name]).items()})
    return metrics


def evaluation_batches(
    model, objective: ObjectiveSpec, settings, examples: list[dict], batches: list[list[int]], pad_id: int, device,
    reference: ReferenceModel | None = None,
) -> Iterator[dict]:
    """`examples` collated by `batches` (lists of indices), on the device, with the reference's outputs added."""
    for indices in batches:
        batch = to_device(objective.collate([examples[index] for index in indices], pad_id), device)
        yield add_reference_outputs(objective, reference, model, batch, settings)


def accumulate_gradients(
    model, objective: ObjectiveSpec, settings, micro_batches: list[list[dict]], accelerator,
    reference: ReferenceModel | None = None, step_loss_tokens: float | None = None,
    before_backward: Callable[[bool], None] | None = None, cuda_graphs: bool = False,
    rows: RowThreads | None = None, trainable: Sequence[torch.nn.Parameter] = (), keyed_dropout: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, int]]]:
    """Backward over one optimiser step's micro-batches, each given as its parts (collated groups of its
    records: one part, or with `rows` one per thread); returns the step's loss and metrics (detached), and for
    a data mixture each task's summed loss and loss-token count (micro-batches hold one task).

    Each part's summed loss is divided by the loss-token count of the WHOLE step (across
    all processes when `step_loss_tokens` is given), so the accumulated gradient is the gradient
    of the mean over every loss token of the step, whatever the split into micro-batches, parts and
    processes: batch 8 x accumulation 1 == batch 2 x accumulation 4 == 2 processes x batch 4.
    A part marked `stand_in` (a process's empty share: `Share`) runs its forward and backward with the loss
    weighted 0 and counts nowhere.
    `before_backward(last)` runs before each backward (last: the step's final one).
    `cuda_graphs`: the layers were compiled in a CUDA-graph mode (`train.compile_mode`).
    `rows`: run each micro-batch's parts in parallel threads (training/parallel_rows.py), with the gradients of
    `trainable` added in part order.
    `keyed_dropout`: each part's forward and backward run under a seed of its own, drawn in part order, for the
    model's keyed dropout masks (training/keyed_dropout.py).
    """
    if step_loss_tokens is None:
        step_loss_tokens = sum(part["num_loss_tokens"] for parts in micro_batches for part in parts
                               if "stand_in" not in part)
    step_loss_tokens = max(step_loss_tokens, 1)
    step_loss = torch.zeros((), device=accelerator.device)
    step_metrics: dict[str, torch.Tensor] = {}
    task_losses: dict[str, tuple[torch.Tensor, int]] = {}

    def part_loss(part: dict) -> tuple[torch.Tensor, tuple[LossOutput, str | None] | None]:
        part = dict(part)
        stand_in = part.pop("stand_in", False)
        # The reference's outputs and a rollout's samples under the training's autocast too: the same precision
        # as the policy's loss (the log-ratios start at zero), and on a GPU bf16 matmuls rather than float32.
        with accelerator.autocast():
            batch = training_batch(objective, reference, model, to_device(part, accelerator.device), settings)
            output = objective.loss(model, batch, settings)
        if stand_in:  # a process's empty share (`Share`): the same forward and backward collectives, no gradient
            return output.loss_sum * 0.0, None
        return output.loss_sum / step_loss_tokens, (output, batch.get("task"))

    for index, parts in enumerate(micro_batches):
        seeds = part_seeds(len(parts)) if keyed_dropout else [None] * len(parts)
        if rows is not None:
            results = rows.backward(part_loss, parts, trainable, seeds)
        else:
            results = []
            for part_index, (part, seed) in enumerate(zip(parts, seeds, strict=True)):
                if cuda_graphs:
                    # CUDA graphs reuse their output memory from one replay to the next: each micro-batch starts a
                    # new round of replays. Only then: the first call imports the compiler's backend (3 s on CPU).
                    torch.compiler.cudagraph_mark_step_begin()
                with dropout_seed(seed):  # a recomputed layer's backward draws the forward's masks again
                    loss, extra = part_loss(part)
                    if before_backward is not None:
                        before_backward(index == len(micro_batches) - 1 and part_index == len(parts) - 1)
                    accelerator.backward(loss)
                results.append((loss.detach(), extra))
        for loss, counted in results:
            if counted is None:
                continue
            output, task = counted
            step_loss += loss
            # Objectives report summed metrics (reward accuracy, margins, KL); like the loss, they are
            # divided by the step's unit count, so they are means over the whole step.
            for name, value in output.metrics.items():
                step_metrics[name] = step_metrics.get(name, 0) + value.detach() / step_loss_tokens
            if task is not None:
                task_sum, task_count = task_losses.get(task, (0.0, 0))
                task_losses[task] = (task_sum + output.loss_sum.detach(), task_count + output.num_loss_tokens)
    return step_loss, step_metrics, task_losses


def load_run_model(
    config: RunConfig, method: MethodSpec, objective: ObjectiveSpec, label_names: list[str] | None, sharded: bool
) -> tuple[torch.nn.Module, ModelConfig | None, torch.dtype | None]:
    """The run's starting model; the model section that loads it again as stored, where a sharded run loaded
    it so (`load_as_stored`), else None; and the dtype its parameters are still to be converted to as its
    layers are sharded (None: already in `model.dtype`)."""
    stored = load_as_stored(config, method, objective) if sharded else None
    if stored is not None:
        as_stored = config.model.model_copy(update={"dtype": str(stored).removeprefix("torch.")})
        model = load_model(as_stored, config.task, label_names)
        target = resolve_dtype(config.model)
        if not keeps_float32_modules(model, target):
            return model, as_stored, (target if target != stored else None)
        del model  # transformers would keep some modules in float32: load converted, as every run does
    keep_adapters = config.continual is not None and config.continual.adapter_per_task
    return load_model(config.model, config.task, label_names, keep_adapters=keep_adapters), None, None


def starting_reference(
    objective: ObjectiveSpec, model, config: RunConfig, load_copy: Callable[[], torch.nn.Module] | None = None
) -> ReferenceModel | None:
    """The reference of an objective that has one, taken from the model as it starts (before any step
    or resume changes it), or loaded by `load_copy` where that gives the same weights; None when it has none."""
    if not objective.has_reference:
        if config.train.cache_reference:
            raise ConfigError(f"train.cache_reference: task {config.task} has no reference model to cache")
        return None
    if config.train.cache_reference:
        if objective.cache_reference is None:
            raise ConfigError(f"train.cache_reference: task {config.task} computes its reference per batch "
                              "(on samples drawn during training); it cannot be cached")
        if config.data.packing:
            raise ConfigError("data.packing: train.cache_reference stores reference outputs per record, and packed "
                              "rows are collated without them; set data.packing: false")
    return ReferenceModel(model if objective.reference_is_starting_model else None, load_copy)


def cache_reference_outputs(
    objective: ObjectiveSpec, reference: ReferenceModel | None, model, examples: list[dict], config: RunConfig
) -> ReferenceModel | None:
    """With `train.cache_reference`, store the reference's outputs on the examples in one pass and drop the
    reference (no frozen copy is held and no reference forward runs per step); else keep it. The pass runs
    the reference the loop holds: the frozen copy or the model with its adapters off. An objective's own
    model (distill's teacher) the hook loads itself: whole, or in a sharded run through the function the
    loop gives it, which loads it sharded like the student. Returning None frees what the pass held."""
    if reference is None or not config.train.cache_reference:
        return reference
    if reference.on_demand is not None:
        objective.cache_reference(reference.on_demand, examples, config.objective)
        return None
    with reference.active(model) as reference_model:
        objective.cache_reference(reference_model, examples, config.objective)
    return None


def mixed_precision(config: RunConfig) -> str:
    """train.mixed_precision resolved for this machine and the run's weights (plan.mixed_precision_of)."""
    on_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return mixed_precision_of(config.train.mixed_precision, on_gpu, config.model.dtype)


def run_accelerator(precision: str) -> Accelerator:
    """The run's Accelerator. accelerate keeps one state per process and refuses a precision other than its first
    run's: a single process that trains again with another one (a notebook, an in-process search) starts afresh;
    processes of a launched group keep theirs."""
    if is_initialized() and AcceleratorState().mixed_precision != precision and not torch.distributed.is_initialized():
        AcceleratorState._reset_state()
    # cpu=True on CPU-only machines: without it accelerate ignores a torchrun / accelerate launch world.
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())


def train(
    config: RunConfig,
    resume: bool = False,
    overwrite: bool = False,
    should_stop: Callable[[int], bool] | None = None,
    console: Console | None = None,
) -> TrainResult:
    """Run one fine-tuning job described by `config`; `should_stop(step)` lets tests simulate a kill."""
    train_config = config.train
    accelerator = run_accelerator(mixed_precision(config))
    # For the whole run, from loading to export: on a CPU the policy for freed buffers (kept for reuse, or given
    # back: train.release_memory; training/memory.py); under autocast, frozen float32 weights cast once, not in
    # every forward of the evaluations, the reference pass and the steps (training/weight_casts.py).
    reshard_after_forward = sharding_choice(train_config, accelerator.num_processes)
    sharded = reshard_after_forward is not None
    keep_casts = casts_kept(sharded, train_config.gradient_checkpointing, train_config.compile)
    on_cpu = accelerator.device.type == "cpu"
    processes_on_node = node_processes()
    with (freed_memory(train_config.release_memory, processes_on_node) if on_cpu else
          nullcontext(FreedMemory(applied=False)) as memory,
          cached_weight_casts() if keep_casts else nullcontext()):
        return _train(config, accelerator, reshard_after_forward, resume, overwrite, should_stop, console, memory)


def _train(
    config: RunConfig,
    accelerator: Accelerator,
    reshard_after_forward: bool | None,
    resume: bool,
    overwrite: bool,
    should_stop: Callable[[int], bool] | None,
    console: Console | None,
    memory: FreedMemory,
) -> TrainResult:
    objective = OBJECTIVES.get(config.task, "task")
    method = METHODS.get(config.method.name, "method.name")
    train_config = config.train
    group = ProcessGroup(accelerator)
    console = console or Console(stderr=True, quiet=not group.is_main)
    if train_config.compile:
        check_compiler(accelerator.device)
        check_compile_mode(train_config.compile_mode, group.world)
    deepspeed = zero_plan(train_config.model_dump())
    if deepspeed is not None:
        check_global_batch(deepspeed, train_config.batch_size, train_config.grad_accum, group.world)
        console.print(deepspeed.describe())
    sharded = reshard_after_forward is not None

    # --- setup: everything that can fail on bad input happens before the first step ---
    run_dir = prepare_run_dir(config, resume, overwrite, group)
    if group.is_main:  # will it fit? (tunesmith plan's estimate against the device's free memory)
        note = device_memory_note(config, accelerator.device, group.world, node_processes())
        if note is not None:
            console.print(note, markup=False, soft_wrap=True)
    torch.manual_seed(train_config.seed)
    tokenizer = load_tokenizer(config.model)
    data = prepare_data_cached(config, tokenizer)
    if group.is_main:
        write_rejects(data.rejects, run_dir / "rejects.jsonl")
    if not data.train:
        rejected = len(data.rejects)
        raise DataError(f"{config.data.described}: no usable training record ({rejected} rejected, see rejects.jsonl)")
    if data.label_names is not None and group.is_main:
        (run_dir / "labels.json").write_text(json.dumps(data.label_names), encoding="utf-8")
    if config.data.packing and not objective.supports_packing:
        raise ConfigError(f"data.packing: task {config.task} does not support packing")

    model, as_stored, convert_to = load_run_model(config, method, objective, data.label_names, sharded)
    model = method.apply(model, config.method, config.task)
    use_kept_casts(model)  # under autocast, frozen linears' casts made once a run (training/weight_casts.py)
    if objective.prepare_model is not None:
        objective.prepare_model(model, config.objective)
    # Not accelerator.prepare(model): that would wrap it in DDP (see training/distributed.py). A sharded run
    # sets up on the host: FSDP moves each decoder layer to the device as it shards it, so no device ever
    # holds the whole model (a 70B model would not fit one).
    setup_device = torch.device("cpu") if sharded else accelerator.device
    model = model.to(setup_device)
    # Continual learning: kept adapters, replayed old examples and the regulariser's anchor, taken
    # from the starting weights (also on resume, before the checkpoint is loaded).
    continual = prepare_continual(config, model, tokenizer, data.train, objective, setup_device)
    trainable_params, total_params = count_parameters(model)
    console.print(
        f"[bold]{config.method.name}[/]: training {trainable_params:,} of {total_params:,} parameters "
        f"({100 * trainable_params / total_params:.2f}%) on {len(data.train):,} records"
    )
    if train_config.gradient_checkpointing:
        enable_recompute(model, train_config.checkpoint_layers)
    pad_id = tokenizer.pad_token_id

    items, tasks = training_items(data.train + continual.replay_examples, config)
    task_names = [component.name for component in config.data.mixture] if config.data.mixture else []
    if config.data.packing:
        # Compiled layers get rows of one length for the whole run: a row length that changed from batch
        # to batch would make the compiler trace them again mid-run (packed rows are nearly full anyway).
        row_length = config.data.max_length if train_config.compile else None
        collate = functools.partial(collate_packed, length=row_length)
    else:
        collate = objective.collate
    lengths = [item_length(item) for item in items]
    per_epoch = math.ceil(len(epoch_order(lengths, tasks, config, group, 0)) / train_config.grad_accum)
    total_steps = train_config.max_steps or max(1, math.ceil(train_config.epochs * per_epoch))

    # A sharded run that loaded the files as they are loads its frozen reference copy from them again: their
    # pages are shared, where a copy of the model would be each process's own until sharding.
    load_copy = None if as_stored is None else functools.partial(load_model, as_stored, config.task, data.label_names)
    reference = starting_reference(objective, model, config, load_copy)
    if sharded:  # after the reference copy and before the optimizer, which must hold the sharded parameters
        gather_dtype = HALF_DTYPES.get(accelerator.mixed_precision) if train_config.half_precision_gather else None
        shard_layers(model, reshard_after_forward, train_config.cpu_offload, gather_dtype, convert_to)
        place_unsharded(model, accelerator.device, convert_to)

        def shard_frozen(frozen: torch.nn.Module, dtype: torch.dtype | None = None) -> None:  # forward only
            shard_layers(frozen, True, train_config.cpu_offload, gather_dtype, dtype)
            place_unsharded(frozen, accelerator.device, dtype)

        if reference is not None and reference.frozen_copy is not None:  # a copy of the model as loaded
            shard_frozen(reference.frozen_copy, convert_to)
        owns_reference = reference is not None and reference.absent and objective.shard_reference is not None
        if owns_reference and train_config.cache_reference:  # loaded by the one pass, if it must run
            reference.hold_on_demand(functools.partial(objective.shard_reference, config.objective, shard_frozen))
        elif owns_reference:
            reference.hold(objective.shard_reference(config.objective, shard_frozen))  # distill's teacher
        continual.after_sharding(model)
        reduced = "every micro-batch" if train_config.reduce_each_micro_batch else "once a step"
        console.print(f"fsdp: decoder layers sharded across {group.world} processes "
                      f"(reshard after forward: {reshard_after_forward}, cpu offload: {train_config.cpu_offload}, "
                      f"gradients reduced {reduced}"
                      f"{f', float32 layers gathered in {gather_dtype}' if gather_dtype else ''})")
        if as_stored is not None:
            converted = f", converted to {convert_to} layer by layer as they were sharded" if convert_to else ""
            copied = "; the frozen reference loaded from the files too" if reference and reference.frozen_copy else ""
            console.print(f"fsdp: weights loaded as stored ({as_stored.dtype}){converted}{copied}")
    elif train_config.sharding == "fsdp":
        console.print("train.sharding: fsdp on one process: nothing to shard across; training unsharded")
    if train_config.cpu_offload and not sharded:
        console.print("train.cpu_offload: only sharded layers are offloaded; this run is not sharded")
    with accelerator.autocast():  # the precision the reference's outputs would have per step
        reference = cache_reference_outputs(objective, reference, model, data.train + data.eval, config)
    before_backward = None
    cuda_graphs = train_config.compile and train_config.compile_mode in CUDA_GRAPH_MODES
    # The masked-rows attention kernel helps on the CPU only; compiled layers keep SDPA, which they trace.
    masked_rows = accelerator.device.type == "cpu" and not train_config.compile
    if sharded and not train_config.reduce_each_micro_batch:  # reduce-scatter in the step's last backward only
        before_backward = functools.partial(reduce_gradients, model)
    optimizer = accelerator.prepare_optimizer(build_optimizer(model, train_config, method, config.method))
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    choose_row_threads = functools.partial(
        parallel_rows_choice, train_config.parallel_rows, device=accelerator.device, processes=group.world,
        mixed_precision=accelerator.mixed_precision, rows_independent=objective.rows_independent,
        reference_per_batch=reference is not None, batch_size=train_config.batch_size, dropout=active_dropout(model),
        trainable_share=trainable_params / total_params, swapped=swapped_weights(model),
    )
    row_threads = choose_row_threads(compiled=train_config.compile)
    # LoRA's dropout masks from a seed per part on a CPU: the same every run, whichever thread draws them.
    keyed_dropout = accelerator.device.type == "cpu" and not train_config.compile and keyed_dropout_in(model)
    if row_threads > 1:
        console.print(f"parallel rows: each micro-batch's rows split over {row_threads} threads (train.parallel_rows)")
    elif train_config.compile and choose_row_threads(compiled=False) > 1:
        console.print("[yellow]note:[/] train.compile runs each micro-batch's rows in one thread (compiled code is not "
                      "thread-safe); on a CPU the eager step with its rows in threads is faster (bench/README.md)")
    scheduler = build_scheduler(optimizer, train_config, total_steps)
    device = accelerator.device
    eval_batch_size = train_config.eval_batch_size or train_config.batch_size
    checkpoints_dir = run_dir / "checkpoints"
    watched = train_config.early_stopping.metric if train_config.early_stopping else "eval_loss"
    lower_is_better = train_config.early_stopping.lower_is_better if train_config.early_stopping else True

    state: dict[str, Any] = {
        "step": 0,
        "micro_batches": 0,
        "train_tokens": 0,
        "train_positions": 0,  # tokens + padding the model processed
        "train_seconds": 0.0,
        "best": None,  # {"step", "metrics"} of the best evaluation so far
        "evals_without_improvement": 0,
        "eval_before": None,
        "last_eval": None,
        # The data position counts global micro-batches of this size, whatever the process count.
        "global_batch": train_config.batch_size * group.world,
    }

    def evaluate_eval_set() -> dict:
        """The metrics on the eval set, under the training's autocast (as the training computes the loss; on a GPU
        bf16 matmuls rather than float32 for float32 weights)."""
        with accelerator.autocast():
            return evaluate(model, objective, config.objective, data.eval, pad_id, eval_batch_size, device, reference,
                            task_names, group, sharded)

    if resume:
        newest = complete_checkpoints(checkpoints_dir)[-1]
        try:
            state = load_checkpoint(newest, model, optimizer, scheduler)
        except (ValueError, KeyError) as error:
            raise ConfigError(f"--resume: {newest} does not fit this config ({error})") from None
        check_resume_batch(state, train_config.batch_size, group.world)
        console.print(f"resumed from {newest.name} (step {state['step']})")
    elif train_config.eval_before and data.eval:
        state["eval_before"] = evaluate_eval_set()
        console.print(f"before training: {format_metrics(state['eval_before'])}")

    log = MetricsLog(run_dir, train_config.report_to, append=resume) if group.is_main else None
    stream = micro_batch_stream(lengths, config, state["micro_batches"], group, tasks)
    save_every = train_config.save_every or train_config.eval_every
    exit_code = 0
    stopped_early = False
    memory_noted = False  # the note that kept freed buffers reached their limit, printed once

    def checkpoint() -> None:
        # Written by the main process (the RNG saved is its own); sharded weights and moments are written
        # by every process, each its own shards.
        if group.is_main or sharded:
            save_checkpoint(checkpoints_dir, state["step"], model, optimizer, scheduler, state,
                            train_config.keep_checkpoints, group)
        group.barrier()

    def evaluate_and_track() -> bool:
        """Evaluate, keep the best weights, and say whether early stopping should end the run."""
        metrics = evaluate_eval_set()
        state["last_eval"] = {"step": state["step"], "metrics": metrics}
        if log is not None:
            log.write({"step": state["step"], **metrics})
        console.print(f"step {state['step']}: {format_metrics(metrics)}")
        if watched not in metrics:
            raise ConfigError(f"train.early_stopping.metric: {watched!r} is not one of {sorted(metrics)}")
        best = state["best"]
        min_delta = train_config.early_stopping.min_delta if train_config.early_stopping else 0.0
        improvement = (
            math.inf if best is None
            else (best["metrics"][watched] - metrics[watched]) * (1 if lower_is_better else -1)
        )
        if improvement > min_delta:
            state["best"] = {"step": state["step"], "metrics": metrics}
            state["evals_without_improvement"] = 0
            if group.is_main or sharded:
                save_best(checkpoints_dir, model, state["best"], group)
            group.barrier()
        else:
            state["evals_without_improvement"] += 1
        patience = train_config.early_stopping.patience if train_config.early_stopping else None
        return patience is not None and state["evals_without_improvement"] >= patience

    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console,
    )
    # Last, so the reference copy and continual anchors hold plain modules; after fully_shard (FSDP's hooks
    # stay outside the compiled graphs: training/compile.py). Eager layers get the RMSNorm with its own
    # backward; compiled ones fuse their norms themselves.
    if train_config.compile:
        compile_layers(model, train_config.compile_mode)
    else:
        use_fast_rms_norm(model)
    model.train()
    with (StopSignal() as stop_signal, progress, compiled_loss_chunks() if train_config.compile else nullcontext(),
          RowThreads(row_threads, torch.get_num_threads()) if row_threads > 1 else nullcontext() as rows):
        bar = progress.add_task("train", total=total_steps, completed=state["step"], loss="-", lr="-", tps="-")
        while state["step"] < total_steps:
            started = time.perf_counter()
            # One optimiser step: collate its micro-batches first, so the loss can be divided by
            # the total number of loss tokens of the whole step (not a mean of micro-batch means).
            # With parallel rows, each micro-batch is collated as one part per thread (each padded to its own
            # longest row), parts of nearly equal token counts.
            micro_batches = []
            for _ in range(train_config.grad_accum):
                share = next(stream)
                groups = balanced_parts(share.indices, [lengths[index] for index in share.indices], row_threads)
                collated = [collate([items[index] for index in group], pad_id) for group in groups]
                for batch in collated:
                    if tasks is not None:
                        batch["task"] = tasks[share.indices[0]]
                    if share.stand_in:
                        batch["stand_in"] = True
                micro_batches.append(collated)
            parts = [part for collated in micro_batches for part in collated if "stand_in" not in part]
            local_counts = [
                sum(part["num_loss_tokens"] for part in parts),
                sum(part["num_tokens"] for part in parts),
                sum(part["input_ids"].numel() for part in parts),
            ]
            step_loss_tokens, step_tokens, step_positions = group.sum(local_counts)
            # Packed rows: each record attends within itself through causal kernels, no block mask; branched rows
            # (pairs, rl groups) under their causal mask through the masked-rows kernel on the CPU in half precision.
            with step_attention(model, packed=config.data.packing, masked=masked_rows), group.own_random_draws():
                step_loss, step_metrics, task_losses = accumulate_gradients(
                    model, objective, config.objective, micro_batches, accelerator, reference, step_loss_tokens,
                    before_backward, cuda_graphs, rows, trainable, keyed_dropout,
                )
            penalty = continual.penalty(model)
            if penalty is not None:
                # Once per step, on top of the step's mean loss; each process adds its share, so the
                # gradients summed across processes hold the penalty once.
                accelerator.backward(penalty)
                step_metrics["continual_penalty"] = penalty.detach()
            group.sum_gradients(trainable)
            if train_config.max_grad_norm is not None and sharded:
                clip_gradients(trainable, train_config.max_grad_norm)
            elif train_config.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), train_config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            state["step"] += 1
            state["micro_batches"] += train_config.grad_accum
            state["train_tokens"] += int(step_tokens)
            state["train_positions"] += int(step_positions)
            elapsed = time.perf_counter() - started
            state["train_seconds"] += elapsed
            if state["step"] % train_config.log_every == 0 or state["step"] == total_steps:
                names = sorted(step_metrics)
                loss_value, *metric_values = group.sum([step_loss.item(), *(step_metrics[n].item() for n in names)])
                learning_rate = scheduler.get_last_lr()[0]
                task_values = per_task_losses(task_losses, task_names, group)
                if log is not None:
                    log.write({
                        "step": state["step"], "loss": loss_value, "lr": learning_rate,
                        "loss_tokens": int(step_loss_tokens), "tokens": int(step_tokens),
                        "tokens_per_s": step_tokens / elapsed, **dict(zip(names, metric_values, strict=True)),
                        **task_values,
                    })
                progress.update(
                    bar, loss=f"{loss_value:.4f}", lr=f"{learning_rate:.2e}", tps=f"{step_tokens / elapsed:.0f}"
                )
            progress.update(bar, completed=state["step"])
            if memory.released_at_mb is not None and not memory_noted:
                memory_noted = True
                console.print(
                    f"[yellow]note:[/] resident memory reached {memory.released_at_mb:,.0f} MB, the limit for freed "
                    f"buffers kept for reuse ({memory.limit_mb:,.0f} MB: {LIMIT_SHARE:.0%} of what was available); "
                    "they go back to the system from now on, for fewer tokens/s (train.release_memory: true does "
                    "so from the start)"
                )

            at_end = state["step"] == total_steps
            if data.eval and (at_end or (train_config.eval_every and state["step"] % train_config.eval_every == 0)):
                stopped_early = evaluate_and_track() and not at_end
            asked_to_stop = stop_signal.received is not None or (should_stop is not None and should_stop(state["step"]))
            interrupted = group.sum([float(asked_to_stop)])[0] > 0  # every process stops at the same step
            if interrupted or stopped_early or (save_every and state["step"] % save_every == 0 and not at_end):
                checkpoint()
            if interrupted:
                console.print(f"interrupted: checkpoint saved at step {state['step']}; continue with --resume")
                exit_code = EXIT_INTERRUPTED
                break
            if stopped_early:
                console.print(f"early stopping: {watched} did not improve for "
                              f"{state['evals_without_improvement']} evaluations")
                break
    if log is not None:
        log.close()

    summary = {
        "steps": state["step"],
        "total_steps": total_steps,
        "train_tokens": state["train_tokens"],
        "train_seconds": round(state["train_seconds"], 3),
        "tokens_per_s": state["train_tokens"] / max(state["train_seconds"], 1e-9),
        "padding_fraction": 1 - state["train_tokens"] / max(state.get("train_positions", 0), 1),
        "trainable_params": trainable_params,
        "total_params": total_params,
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "eval_before": state["eval_before"],
        "eval": state["last_eval"]["metrics"] if state["last_eval"] else None,
        "best": state["best"]["metrics"] if state["best"] else None,
        "best_step": state["best"]["step"] if state["best"] else None,
        "stopped_early": stopped_early,
        "interrupted": exit_code == EXIT_INTERRUPTED,
        "data": data.stats,
        "method": config.method.name,
        "task": config.task,
        "processes": group.world,
        "sharding": "fsdp" if sharded else "none",
        "cpu_offload": sharded and train_config.cpu_offload,
        "row_threads": row_threads,
        "released_memory_at_mb": memory.released_at_mb,  # CPU: where kept freed buffers reached their limit
    }
    if exit_code == 0 and (group.is_main or sharded):
        exported = load_best(checkpoints_dir, model) if state["best"] else None
        summary["exported_step"] = exported["step"] if exported else state["step"]
        if sharded:
            export_sharded(model, method, tokenizer, run_dir, group.is_main, train_config.export_shard_size)
        else:
            export_weights(model, method, tokenizer, run_dir, train_config.export_shard_size)
    if group.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    group.barrier()
    return TrainResult(run_dir=run_dir, summary=summary, exit_code=exit_code)


def export_weights(model, method, tokenizer, run_dir: Path, max_shard_size: str) -> Path:
    """Write the trained weights as the run's result: adapter/ (peft methods) or model/, with the tokenizer."""
    export_dir = run_dir / ("adapter" if method.saves == "adapter" else "model")
    if method.save is not None:  # a method whose saved form differs from save_pretrained's
        method.save(model, export_dir)
    else:
        model.save_pretrained(export_dir, max_shard_size=max_shard_size)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(export_dir)
    return export_dir


def export_sharded(model, method, tokenizer, run_dir: Path, is_main: bool, max_shard_size: str) -> None:
    """export_weights for a model with FSDP-sharded layers; every process joins. A whole model is written one
    file at a time (training/sharded_export.py); an adapter, or a model only save_pretrained can write, is
    gathered to the main process first (an adapter export gathers the adapters only)."""
    if method.saves == "model" and method.save is None and streamable(model):
        save_sharded_model(model, run_dir / "model", is_main, max_shard_size)
        if is_main:
            tokenizer.save_pretrained(run_dir / "model")
        return
    gather_for_export(model, is_main, adapter_parameters(model) if method.saves == "adapter" else None)
    if is_main:
        export_weights(model, method, tokenizer, run_dir, max_shard_size)


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(
        f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}" for key, value in metrics.items()
    )
