"""Frozen float32 weights cast to autocast's dtype once per training run, not in every forward.

Under autocast a matmul casts a float32 weight to bf16 / fp16 on every call. Autocast keeps a cast for reuse only
for leaf tensors that require a gradient, so a frozen weight (LoRA's base linears; the tied embedding a LoRA run's
loss multiplies by) is cast again in every forward, and each forward in flight keeps its casts for its backward.
With float32 weights under `train.mixed_precision: bf16` that is 106M weights of SmolLM2-135M read, rounded and
written per micro-batch and per row thread. Within `cached_weight_casts()` each frozen weight is cast once and the
cast reused (the same rounding, so the same outputs and gradients bit for bit) until the weight changes in place
or the block ends. CPU benchmark job (bench/train_throughput.py --precision amp: float32 weights under bf16
autocast): +5-9% tokens/s at 8% less peak memory; LoRA dpo, whose reference is the model with its adapters off
(the same kept casts): +7-10% (bench/README.md).

Not for sharded runs (FSDP gathers a layer's weights anew each forward; a kept cast of every layer would undo the
sharding), recomputed layers (their casts are transient, one layer at a time; kept casts would add half the
frozen weights' memory) or compiled ones (the compiled graph fuses the cast): `train` (training/loop.py) enters it
for the whole run, only without any of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# (id(weight), dtype) -> (weight, its version and storage when cast, the cast), while `cached_weight_casts` runs.
# A module-level dict, not a context variable: the loop's row threads (training/parallel_rows.py) share it.
_casts: dict[tuple[int, torch.dtype], tuple[torch.Tensor, int, int, torch.Tensor]] | None = None


def casts_kept(sharded: bool, recomputed: bool, compiled: bool) -> bool:
    """Whether a training run keeps the casts (the loop and tunesmith.plan ask): not where a forward casts its
    weights a layer at a time anyway (sharded, recomputed or compiled layers)."""
    return not (sharded or recomputed or compiled)


@contextmanager
def cached_weight_casts() -> Iterator[None]:
    """Frozen weights passed to `cast_weight` are cast once while the block runs; the casts are dropped after it."""
    global _casts
    _casts = {}
    try:
        yield
    finally:
        _casts = None


def cast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight.to(dtype)`: from the cache where `cached_weight_casts` runs and the weight is frozen."""
    casts = _casts
    if casts is None or weight.requires_grad or weight.dtype == dtype:
        return weight.to(dtype)
    key = (id(weight), dtype)
    kept = casts.get(key)
    if kept is not None:
        kept_weight, version, storage, cast = kept
        # An in-place change (a loaded checkpoint) bumps the version, `.data = ...` changes the storage; changes
        # made through `.data` in place are not seen, and the loop makes none while the block runs.
        if kept_weight is weight and version == weight._version and storage == weight.data_ptr():
            return cast
    cast = weight.detach().to(dtype)
    casts[key] = (weight, weight._version, weight.data_ptr(), cast)
    return cast
