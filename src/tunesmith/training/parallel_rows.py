"""A micro-batch's rows in parallel threads on CPU (`train.parallel_rows`).

On a CPU, PyTorch spreads each operation over the cores (OpenMP), but much of a training step is serial:
allocating each tensor, dispatching each op, the autograd engine's bookkeeping. A profile of the CPU
benchmark job (bench/train_throughput.py, SmolLM2-135M LoRA, bfloat16, 2 cores; bench/README.md) found the
second core waiting in OpenMP 25% of the time. Here each thread runs the forward and backward of its own
part of the micro-batch's rows with its share of the op-threads (one each on 2 cores; where there are fewer parts
than op-threads, several each), so one thread's serial work overlaps the other's matmuls: PyTorch releases the
GIL inside its ops and during the backward. Measured on 2 cores only (bench/README.md).

The result equals the sequential step's up to rounding (the same loss terms, each divided by the step's
loss-token count, summed in another order) and is the same from run to run: each part's gradients are
computed apart from the others (`torch.autograd.grad`) and added into `.grad` in part order, never by
two threads at once. The first part, run by the calling thread, accumulates into `.grad` directly, so only the
other parts hold a copy of the trainable parameters' gradients: cheap for adapters, one more copy of the
model's gradients per extra thread for full fine-tuning (which `auto` therefore leaves sequential).

It applies where that reasoning holds (`parallel_rows_choice`): one process on CPU, eager (not compiled), no
fp16 loss scaling, an objective whose loss is a sum over its records that needs nothing but the rows
(`ObjectiveSpec.rows_independent`; a reference model only through outputs stored before training), and no
dropout that draws from the process's one generator (the threads would take their turns at it in a different
order from run to run). LoRA's dropout does not: each part runs under a seed of its own, drawn in part order
(training/keyed_dropout.py). Nor does it apply where a forward swaps a merged weight into a module the threads
share: peft's LoRA on a mixture of experts' 3-D weights (`ParamWrapper`) registers W + BA as a parametrization of
the experts module for each forward, in torch's one process-wide cache, so two threads would read each other's
merged weights and backpropagate through each other's graphs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from tunesmith.errors import ConfigError
from tunesmith.training.keyed_dropout import KeyedDropout, dropout_seed

Item = TypeVar("Item")

# auto runs as many parts as keep the extra gradient copies (one per part but the first) within this share of the
# model's parameter count: 2 parts for up to 10% trainable (LoRA, adapters), none for full fine-tuning.
AUTO_MAX_GRADIENT_COPIES = 0.1


def active_dropout(model: torch.nn.Module) -> str | None:
    """Where the model draws dropout masks from the process's generator in training (a module, LoHa / LoKr's rank
    and module dropout, or a config setting), or None. Keyed dropout (LoRA's) draws from the running part's seed."""
    for name, module in model.named_modules():
        keyed = isinstance(module, KeyedDropout)
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0 and not keyed:
            return f"{name} (p={module.p})"
        for setting in ("rank_dropout", "module_dropout"):  # peft's LyCORIS layers: torch.rand in their forward
            rates = getattr(module, setting, None)
            if isinstance(rates, dict) and any(rate > 0 for rate in rates.values()):
                return f"{name} ({setting}={max(rates.values())})"
    configs = [getattr(module, "config", None) for module in model.modules()]
    for config in filter(None, configs):
        for key, value in vars(config).items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float) and value > 0:
                return f"config {key}={value}"
    return None


def swapped_weights(model: torch.nn.Module) -> str | None:
    """The first module whose forward swaps a merged weight into the module it wraps (peft's `ParamWrapper`: LoRA on
    a parameter, such as a mixture of experts' 3-D weights), or None."""
    from peft.tuners.lora.layer import ParamWrapper

    return next((name for name, module in model.named_modules() if isinstance(module, ParamWrapper)), None)


def parallel_rows_choice(
    setting: bool | None, *, device: torch.device, processes: int, compiled: bool, mixed_precision: str,
    rows_independent: bool, reference_per_batch: bool, batch_size: int, dropout: str | None,
    trainable_share: float, swapped: str | None,
) -> int:
    """How many parts (threads) split each micro-batch's rows: 1 (sequential) up to torch's op-thread count.
    `setting` is `train.parallel_rows`: None (auto) splits where it is exact, into as many parts as keep the
    gradient copies within AUTO_MAX_GRADIENT_COPIES of the model; True into one part per op-thread where it is
    exact, else a ConfigError saying why not; False never. `dropout`: the model's `active_dropout`;
    `reference_per_batch`: a reference (or teacher) model runs in each step, alongside the parts; `swapped`: the
    model's `swapped_weights`."""
    threads = torch.get_num_threads()
    reasons = [
        (device.type != "cpu", f"it is for CPU runs; this one runs on {device.type}"),
        (processes > 1, f"it is for one process; this run has {processes}"),
        (compiled, "train.compile is on (compiled code is not thread-safe)"),
        (mixed_precision == "fp16", "fp16 loss scaling is on"),
        (not rows_independent, "this task's loss is not a sum of per-record terms computed from the rows alone"),
        (reference_per_batch, "a reference model runs per batch (train.cache_reference: true stores its outputs once)"),
        (dropout is not None, f"dropout is active ({dropout}); its random masks would differ from run to run"),
        (swapped is not None, f"{swapped} swaps a LoRA-merged weight into the module in each forward (peft's LoRA "
                              "on expert weights), which the threads would share"),
        (batch_size < 2, "train.batch_size is 1: no rows to split"),
        (threads < 2, "torch runs with one thread (torch.set_num_threads / OMP_NUM_THREADS)"),
    ]
    reason = next((why for applies, why in reasons if applies), None)
    if setting is False:
        return 1
    if setting is True and reason is not None:
        raise ConfigError(f"train.parallel_rows: {reason}; set it to false or leave it unset")
    if setting is True:
        return threads
    if reason is not None:
        return 1
    affordable = 1 + math.floor(AUTO_MAX_GRADIENT_COPIES / trainable_share) if trainable_share > 0 else threads
    return max(min(threads, affordable), 1)


def balanced_parts(items: Sequence[Item], lengths: Sequence[int], parts: int) -> list[list[Item]]:
    """`items` in at most `parts` non-empty groups of nearly equal total length: longest first, each to the
    lightest group so far (ties to the earliest group), keeping the items' order within each group."""
    loads = [0] * min(parts, len(items))
    groups: list[list[int]] = [[] for _ in loads]
    for index in sorted(range(len(items)), key=lambda index: -lengths[index]):
        lightest = loads.index(min(loads))
        groups[lightest].append(index)
        loads[lightest] += lengths[index]
    return [[items[index] for index in sorted(group)] for group in groups]


class RowThreads:
    """Runs each part's forward and backward in its own thread (the calling thread takes the first part), and adds
    the gradients in part order. While a micro-batch runs, the op-threads are shared out among its parts: one each
    when there are as many parts as threads (2 cores, batch >= 2), more when a micro-batch has fewer rows than
    there are threads, so every core stays busy."""

    def __init__(self, parts: int, threads: int):
        """At most `parts` parts per micro-batch, sharing `threads` op-threads."""
        self.threads = threads
        self._pool = ThreadPoolExecutor(parts - 1, thread_name_prefix="tunesmith-rows")

    def __enter__(self) -> RowThreads:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown()

    @staticmethod
    @contextmanager
    def op_threads(count: int) -> Iterator[None]:
        """torch's op-thread count at `count` for the calling thread (the others set theirs per part), restored
        after."""
        saved = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            yield
        finally:
            torch.set_num_threads(saved)

    def backward(
        self, part_loss: Callable[[Any], tuple[torch.Tensor, Any]], parts: Sequence[Any],
        trainable: Sequence[torch.nn.Parameter], seeds: Sequence[int | None],
    ) -> list[tuple[torch.Tensor, Any]]:
        """`part_loss(part) -> (loss, anything)` for each part, and the backward of each loss, under the part's
        dropout seed (training/keyed_dropout.py; None: none): the gradients of `trainable` end up in `.grad`, added
        in part order. Returns each part's (loss detached, anything)."""
        op_threads = max(self.threads // len(parts), 1)
        with self.op_threads(op_threads):
            pending = [self._pool.submit(self._gradients_of, part_loss, part, trainable, op_threads, seed)
                       for part, seed in zip(parts[1:], seeds[1:], strict=True)]
            try:
                with dropout_seed(seeds[0]):
                    loss, extra = part_loss(parts[0])
                    loss.backward()
                results = [(loss.detach(), extra)]
            finally:
                finished = [future.result() for future in pending]  # every thread done before anything else runs
        for loss, extra, gradients in finished:
            for parameter, gradient in zip(trainable, gradients, strict=True):
                if gradient is None:
                    continue
                if parameter.grad is None:
                    parameter.grad = gradient
                else:
                    parameter.grad += gradient
            results.append((loss, extra))
        return results

    @staticmethod
    def _gradients_of(
        part_loss: Callable[[Any], tuple[torch.Tensor, Any]], part: Any, trainable: Sequence[torch.nn.Parameter],
        op_threads: int, seed: int | None,
    ) -> tuple[torch.Tensor, Any, tuple[torch.Tensor | None, ...]]:
        torch.set_num_threads(op_threads)  # this thread's own OpenMP setting; the caller restores its own after
        with dropout_seed(seed):
            loss, extra = part_loss(part)
            gradients = torch.autograd.grad(loss, trainable, allow_unused=True)
        return loss.detach(), extra, gradients
