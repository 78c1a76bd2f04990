"""LoRA's forward with the scale on the rank side and the update accumulated by the GEMM.

peft computes `base(x) + B(A(x)) * s`: the scale multiplies the (N, out) update and the sum is one more
pass over (N, out), in the forward and again in the backward. The same sum is
`base(x).addmm_((A(x) * s), B^T)`: the scale touches (N, r) values instead of (N, out), and the
up-projection is added into the base output, in place, by the matrix multiply itself. One decoder layer of
SmolLM2-135M has seven LoRA linears, so this runs 210 times per forward; on this project's CPU it
removes most of the elementwise `mul` / `add` time of a LoRA step (bench/README.md).

Dropout, where set, drops the LoRA branch's input through the layer's own module, so peft's forward would draw the
same masks; a keyed mask (training/keyed_dropout.py) leaves its 1 / keep-probability to the rank-side scale.
It replaces peft's forward only where it is the same computation: vanilla LoRA (no DoRA or other
variant), exactly one active adapter, not merged, adapters enabled, a plain `nn.Linear`
base, no per-call arguments (mixed-batch adapter names), and the update in the base output's dtype
(or under autocast, which computes both in one dtype anyway); and, adapters disabled (the reference model of
preference objectives), the base linear alone. Every other call goes to peft's forward. Under autocast the base
weight's cast comes from training/weight_casts.py: made once a training run, not in every call.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear

from tunesmith.training.keyed_dropout import KeyedDropout
from tunesmith.training.weight_casts import frozen_linear

LORA_DROPOUTS = (torch.nn.Identity, torch.nn.Dropout, KeyedDropout)  # peft's lora_dropout: Identity where p is 0


def fast_adapter(layer: LoraLinear) -> str | None:
    """The adapter the fast path can compute for `layer` (dtypes aside: see the forward), or None when peft's forward
    must run."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant or layer.fan_in_fan_out:
        return None
    if type(layer.base_layer) is not torch.nn.Linear or type(layer.lora_dropout[name]) not in LORA_DROPOUTS:
        return None
    return name


def lora_linear_forward(layer: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs:
        return LoraLinear.forward(layer, x, *args, **kwargs)
    if layer.disable_adapters and not layer.merged and type(layer.base_layer) is torch.nn.Linear:
        return frozen_linear(layer.base_layer, x)  # adapters off: the reference model of dpo, kto, ...
    name = fast_adapter(layer)
    mixed_dtypes = name is not None and layer.base_layer.weight.dtype != layer.lora_A[name].weight.dtype
    if name is None or (mixed_dtypes and not torch.is_autocast_enabled(x.device.type)):
        return LoraLinear.forward(layer, x)  # peft adds a float32 update to a low-precision base output: its maths
    lora_a = layer.lora_A[name].weight  # (r, in)
    lora_b = layer.lora_B[name].weight  # (out, r)
    rows = x.reshape(-1, x.shape[-1])  # (N, in): 2-D, so the base output below is a tensor of its own, not a view
    result = frozen_linear(layer.base_layer, rows)  # (N, out)
    dropout = layer.lora_dropout[name]
    dropped, rescale = dropout.drop(rows) if type(dropout) is KeyedDropout else (dropout(rows), 1.0)
    down = F.linear(dropped, lora_a) * (layer.scaling[name] * rescale)  # (N, r)
    # Added in place: no copy of the (N, out) base output (out-of-place addmm's first pass). Autograd allows it,
    # since the base matmul's backward needs its inputs only. In-place ops get no autocast: cast B as it would.
    result.addmm_(down, lora_b.t().to(result.dtype))
    return result.view(*x.shape[:-1], result.shape[-1])


def use_fast_lora_forward(model: torch.nn.Module) -> None:
    """Give every peft LoRA linear of `model` the fused forward (per instance: other models that share
    peft's class are untouched)."""
    for layer in model.modules():
        if type(layer) is LoraLinear:
            layer.forward = types.MethodType(lora_linear_forward, layer)
