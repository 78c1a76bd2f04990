"""FSDP: each decoder layer's parameters, gradients and optimizer state sharded across processes.

`train.sharding: fsdp` (or `auto` under `accelerate launch` with an FSDP config) applies PyTorch's
FSDP2 `fully_shard` to every decoder layer, not to the whole model: our LM loss calls the backbone
directly (logits only at loss positions), which would bypass a root unit's hooks, while the layers
are always called through their own forward. Each layer's weights are all-gathered just before its
forward (and again for its backward when `train.reshard_after_forward`, ZeRO-3 style) and its
gradients reduce-scattered after its backward. The embeddings, final norm and head stay replicated;
their gradients are summed like those of unsharded runs (training/distributed.py).

The maths does not change: gradients are SUMMED across processes (divide factor 1), because each
process already divides its loss by the global number of loss tokens of the step, so a sharded run
reaches the weights of one process with the same global batch (tests/test_sharding.py).

Checkpoints gather nothing: every process writes its own rows of the sharded weights and AdamW
moments, the main process the replicated tensors and a JSON index (training/sharded_checkpoint.py),
and each process of the resuming run reads only the rows it holds, so a sharded run resumes on any
number of processes, sharded or not. The exported model holds full tensors: a whole model is written
one gathered tensor at a time (`full_tensor`, a collective every process joins; training/sharded_export.py);
an adapter export gathers the adapters only (`gather_for_export`) and saves as an unsharded run does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from tunesmith.errors import ConfigError
from tunesmith.models import decoder_layers, resolve_model, stored_dtype, unwrapped_model
from tunesmith.training.dtensors import full_tensor
from tunesmith.training.launch import fsdp_from_launcher

if TYPE_CHECKING:  # only for annotations: the objectives import this module (rl checks for sharded layers)
    from tunesmith.config import RunConfig
    from tunesmith.methods.base import MethodSpec
    from tunesmith.objectives.base import ObjectiveSpec


def shard_layers(
    model: torch.nn.Module, reshard_after_forward: bool, cpu_offload: bool = False,
    gather_dtype: torch.dtype | None = None, dtype: torch.dtype | None = None,
) -> None:
    """fully_shard each decoder layer of `model` in place over all processes, under the backbone as the
    root unit; gradients are summed. Each layer moves to the process's device as it is sharded (the model
    can come from the host whole); the parts outside the layers stay where they are (`place_unsharded`
    moves them). `cpu_offload` keeps the shards (weights, gradients, and so the AdamW
    state and step) in host memory; FSDP copies a layer to the device for its forward and backward.

    `gather_dtype` (a half dtype, for training under its autocast): float32 layers are cast to it before
    their all-gather, so the traffic and the gathered copy are half the size and autocast has no weight
    left to cast; their gradients are reduced in float32 into the float32 shards. The layers' inputs are
    not cast (the residual stream stays float32), so the only change to the maths is that weights used
    outside matmuls (the norms') are rounded to the half dtype, as every matmul weight already is.

    `dtype`: the layers' floating-point parameters are converted to it one layer at a time, just before
    that layer is sharded (see `load_as_stored`), so a process never holds more than one converted
    whole layer beside its shards."""
    layers = decoder_layers(model)
    if not layers:
        name = type(unwrapped_model(model)).__name__
        raise ConfigError(f"train.sharding: no decoder layers found in {name} to shard; set train.sharding: none")
    # The model is still on the host (fully_shard moves each layer to the device); FSDP's device is CUDA's
    # wherever there is one, as the loop's. Pinned host shards copy to a GPU asynchronously.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    for layer in layers:
        if dtype is not None:
            convert_parameters(layer, dtype)
        float32 = all(parameter.dtype == torch.float32 for parameter in layer.parameters())
        precision = (MixedPrecisionPolicy(param_dtype=gather_dtype, reduce_dtype=torch.float32,
                                          cast_forward_inputs=False)
                     if gather_dtype is not None and float32 else MixedPrecisionPolicy())
        fully_shard(layer, reshard_after_forward=reshard_after_forward, offload_policy=offload, mp_policy=precision)
    # The backbone becomes the root unit, managing none of its own parameters (embeddings and final norm
    # stay whole). FSDP never reshards a root after its forward; without a common root each layer would
    # be one and keep its gathered weights until the backward (measured: +430 MB for SmolLM2-135M).
    backbone = unwrapped_model(model).base_model
    in_layers = {id(parameter) for layer in layers for parameter in layer.parameters()}
    fully_shard(backbone, ignored_params={p for p in backbone.parameters() if id(p) not in in_layers})
    for unit in [*layers, backbone]:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-multiplied sum


def place_unsharded(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Move what `shard_layers` left where it was to `device`: the parameters and buffers outside the sharded
    layers (embeddings, final norm, head, rotary tables). fully_shard moved each layer's own (with
    `cpu_offload`, its shards back to the host). Tied parameters stay one parameter. `dtype`: those
    parameters are converted to it as well (as `shard_layers` converted the layers'); buffers keep theirs."""
    for module in model.modules():
        for _, parameter in module.named_parameters(recurse=False):
            if isinstance(parameter, DTensor):
                continue
            target = dtype if dtype is not None and parameter.is_floating_point() else parameter.dtype
            if parameter.device != device or parameter.dtype != target:
                move_in_place(parameter, device, target)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.device != device:
                setattr(module, name, buffer.to(device))


def move_in_place(parameter: torch.nn.Parameter, device: torch.device, dtype: torch.dtype) -> None:
    """Give `parameter` its data on `device` in `dtype`, swapped in place (as Module.to does with swap_tensors):
    the Parameter object is kept, so a tied parameter changes once and every reference to it holds."""
    with torch.no_grad():
        moved = torch.nn.Parameter(parameter.to(device, dtype), requires_grad=parameter.requires_grad)
    torch.utils.swap_tensors(parameter, moved)


def convert_parameters(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Convert `module`'s floating-point parameters to `dtype` in place (`move_in_place`); buffers keep their
    dtype (rotary tables stay float32)."""
    for parameter in module.parameters():
        if parameter.is_floating_point() and parameter.dtype != dtype:
            move_in_place(parameter, parameter.device, dtype)


def load_as_stored(config: RunConfig, method: MethodSpec, objective: ObjectiveSpec) -> torch.dtype | None:
    """The files' dtype, when a sharded run should load the weights in it (their mapped pages, which the
    processes of a node share: one copy in the page cache) and reach `model.dtype` layer by layer as it
    shards them; None to load in `model.dtype` as every other run does.

    This keeps two private copies of the whole model out of each process. Loading in another dtype than
    the files' converts the whole model into the process's own memory before sharding frees it: on a
    node of 8 processes, eight float32 copies of a bfloat16 model (2.2 TB for 70B). And full fine-tuning's
    frozen reference (dpo, kto) is loaded again from the files rather than copied from the model. Loaded
    as stored, each layer is converted just before it is sharded: a process holds its shards, the parts
    left whole and one converted layer.

    Only where every parameter of the starting model comes from the files, so converting them all gives
    what loading in `model.dtype` gives, and loading again gives a copy: a method that adds none (full,
    freeze), no objective head (ppo's value head), no continual learning (its anchors are taken from the
    loaded weights) and no `model.from_run` (its adapters are merged on load). Models that keep some
    modules in float32 are caught after loading (`keeps_float32_modules`)."""
    if (config.model.from_run is not None or method.adds_parameters or objective.prepare_model is not None
            or config.continual is not None):
        return None
    return stored_dtype(resolve_model(config.model))


def keeps_float32_modules(model: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Whether transformers would keep some of `model`'s modules in float32 when loading it in `dtype`
    (`_keep_in_fp32_modules`, e.g. MoE routers): converting every parameter would not give that."""
    plan = getattr(unwrapped_model(model), "_get_dtype_plan", None)
    return bool(plan(dtype)) if plan is not None else False


def reduce_gradients(model: torch.nn.Module, now: bool) -> None:
    """Whether the next backward reduce-scatters the sharded layers' gradients (FSDP's default) or leaves
    each process accumulating whole layer gradients, to be reduced by a later backward that does."""
    root = unwrapped_model(model).base_model
    if isinstance(root, FSDPModule):
        root.set_requires_gradient_sync(now, recurse=True)


def sharded_across_processes(model: torch.nn.Module) -> bool:
    return any(isinstance(parameter, DTensor) for parameter in model.parameters())


def clip_gradients(parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients so their global L2 norm is at most `max_norm`; returns the norm before.

    Sharded gradients hold one slice per process (their squares are summed across processes);
    replicated ones are whole and already summed (counted once)."""
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = [grad for grad in grads if isinstance(grad, DTensor)]
    whole = [grad for grad in grads if not isinstance(grad, DTensor)]
    # Summed where the collectives run: with cpu_offload the shards' gradients are on the host.
    device = whole[0].device if whole else torch.device(sharded[0].device_mesh.device_type)
    sharded = [grad.to_local() for grad in sharded]
    sharded_squares = sum((grad.float().pow(2).sum().to(device) for grad in sharded), torch.zeros((), device=device))
    if dist.is_initialized():
        dist.all_reduce(sharded_squares)
    whole_squares = sum((grad.float().pow(2).sum() for grad in whole), torch.zeros((), device=device))
    norm = (sharded_squares + whole_squares).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(scale.to(grad.device, grad.dtype))
    return norm


def adapter_parameters(model: torch.nn.Module) -> Callable[[str, torch.nn.Parameter], bool]:
    """Which parameters a peft adapter export writes: the trained ones and any adapter's (peft names them
    `...lora_A.<adapter>.weight`, `...modules_to_save.<adapter>...`), not the frozen base weights."""
    adapters = list(getattr(model, "peft_config", {}))
    return lambda name, parameter: parameter.requires_grad or any(f".{adapter}." in f"{name}." for adapter in adapters)


@torch.no_grad()
def gather_for_export(
    model: torch.nn.Module, is_main: bool, exported: Callable[[str, torch.nn.Parameter], bool] | None = None
) -> None:
    """Make the parameters the export writes (all, or those `exported(name, parameter)` picks) plain tensors
    again, the whole tensor on the main process (on the host) and an empty one elsewhere, so the usual save
    code runs on the main process; an adapter export thus gathers the adapters, not the sharded base model.
    The model can only be saved afterwards, not trained."""
    for module_name, module in model.named_modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            qualified = f"{module_name}.{name}" if module_name else name
            if isinstance(parameter, DTensor) and (exported is None or exported(qualified, parameter)):
                full = full_tensor(parameter)  # every process joins the gather
                full = full.to("cpu") if is_main else torch.empty(0, dtype=parameter.dtype)
                setattr(module, name, torch.nn.Parameter(full, requires_grad=parameter.requires_grad))


def sharding_choice(train, processes: int) -> bool | None:
    """None to keep a full replica per process, else FSDP's reshard-after-forward setting: from
    `train.sharding` (`auto` follows `accelerate launch`'s FSDP config, whose own reshard choice wins)."""
    launched_fsdp, launched_reshard = fsdp_from_launcher()
    if processes < 2 or train.sharding == "none" or (train.sharding == "auto" and not launched_fsdp):
        return None
    if train.sharding == "auto" and launched_reshard is not None:
        return launched_reshard
    return train.reshard_after_forward
