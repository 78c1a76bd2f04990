"""Frozen float32 weights cast to autocast's dtype once per training run, not in every forward.

Under autocast a matmul casts a float32 weight to bf16 / fp16 on every call. Autocast keeps a cast for reuse only
for leaf tensors that require a gradient, so a frozen weight (LoRA's base linears, every linear of a prompt, prefix,
IA3 or adapter run; the tied embedding a LoRA run's loss multiplies by) is cast again in every forward, and each
forward in flight keeps its casts for its backward. With float32 weights under `train.mixed_precision: bf16` that
is 106M weights of SmolLM2-135M read, rounded and written per micro-batch and per row thread. Within
`cached_weight_casts()` each frozen weight is cast once and the cast reused (the same rounding, so the same outputs
and gradients bit for bit) until the weight changes in place or the block ends. A linear keeps a new cast only
where its forward would hold the cast for the backward anyway (`keeping_linears`, with gradients on), so frozen
layers below every trained one (freeze) and no-grad passes (a frozen reference copy) do not hold casts for the run;
they reuse a kept one where there is one. CPU benchmark job (bench/train_throughput.py --precision amp: float32 weights
under bf16 autocast): +5-9% tokens/s at 8% less peak memory; LoRA dpo, whose reference is the model with its
adapters off (the same kept casts): +7-10% (bench/README.md).

Not for sharded runs (FSDP gathers a layer's weights anew each forward; a kept cast of every layer would undo the
sharding), recomputed layers (their casts are transient, one layer at a time; kept casts would add half the
frozen weights' memory) or compiled ones (the compiled graph fuses the cast): `train` (training/loop.py) enters it
for the whole run, only without any of them.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

# (id(weight), dtype) -> (weight, its version and storage when cast, the cast), while `cached_weight_casts` runs.
# A module-level dict, not a context variable: the loop's row threads (training/parallel_rows.py) share it.
_casts: dict[tuple[int, torch.dtype], tuple[torch.Tensor, int, int, torch.Tensor]] | None = None
KEEPS_CAST = "_tunesmith_keeps_cast"  # set on each linear by `use_kept_casts`


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


def cast_weight(weight: torch.Tensor, dtype: torch.dtype, keep: bool = True) -> torch.Tensor:
    """`weight.to(dtype)`: from the cache where `cached_weight_casts` runs and the weight is frozen. `keep=False`
    reuses a kept cast but keeps no new one."""
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
    if keep:
        casts[key] = (weight, weight._version, weight.data_ptr(), cast)
    return cast


def frozen_linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`; under autocast a frozen weight's cast is the run's kept one (see `use_kept_casts` for which
    layers keep theirs; the others reuse a kept cast of the same weight where there is one)."""
    weight = layer.weight
    if not weight.requires_grad and torch.is_autocast_enabled(x.device.type):
        keep = getattr(layer, KEEPS_CAST, True) and torch.is_grad_enabled()
        weight = cast_weight(weight, torch.get_autocast_dtype(x.device.type), keep)
    return F.linear(x, weight, layer.bias)


def keeping_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The plain linears of `model` whose frozen weight's cast a training run keeps: those whose forward holds the
    cast for the backward anyway. That is those at or above the lowest transformer block a gradient flows into
    (`trained_blocks`). Below that block (freeze's frozen blocks) no gradient flows and a forward's casts are
    transient: keeping them would hold half their float32 size for the run. tunesmith.plan counts the same linears."""
    linears = [layer for layer in model.modules() if type(layer) is torch.nn.Linear]
    blocks, first = trained_blocks(model)
    below = {id(layer) for block in blocks[:first] for layer in block.modules()}
    return [layer for layer in linears if id(layer) not in below]


def trained_blocks(model: torch.nn.Module) -> tuple[list[torch.nn.Module], int]:
    """The transformer blocks of `model` (none when it has no block list) and the index of the lowest one a gradient
    flows into: the lowest with a trainable parameter; 0 where what feeds the first block trains (prompt and prefix
    tuning's virtual tokens, trained input embeddings); len(blocks) where nothing from the first block up trains (a
    head trained alone). Below it autograd keeps nothing: no input or weight there needs a gradient."""
    from tunesmith.methods.freeze import transformer_blocks
    from tunesmith.models import prompt_learning

    try:
        _, blocks = transformer_blocks(model)
    except (AttributeError, ValueError):  # no config or no block list
        return [], 0
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if prompt_learning(model) or (embeddings is not None and embeddings.weight.requires_grad):
        return list(blocks), 0
    first = next((index for index, block in enumerate(blocks)
                  if any(parameter.requires_grad for parameter in block.parameters())), len(blocks))
    return list(blocks), first


def use_kept_casts(model: torch.nn.Module) -> None:
    """Give every plain `nn.Linear` of `model` the forward above (per instance; subclasses such as quantised
    linears keep their own), marked whether it keeps a new cast (`keeping_linears`; and only where gradients are
    on: a no-grad pass, such as a frozen reference copy's, keeps none). Outside `cached_weight_casts` the forward
    computes what `nn.Linear`'s does."""
    keeping = {id(layer) for layer in keeping_linears(model)}
    for layer in model.modules():
        if type(layer) is torch.nn.Linear:
            layer.forward = types.MethodType(frozen_linear, layer)
            setattr(layer, KEEPS_CAST, id(layer) in keeping)
