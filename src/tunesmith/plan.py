"""`tunesmith plan CONFIG`: how much memory a run needs per device, before any training starts.

Parameter counts are exact: the model is built on the meta device (no weights are read) and the
method is applied to it, so LoRA / adapters / prompts count what they really add. The rest is
the standard accounting for mixed-precision training (Rajbhandari et al. 2020, ZeRO, sec. 3.1)
and activation sizes per transformer layer (Korthikanti et al. 2022, sec. 4.1), adapted to
what tunesmith does: SDPA attention (no stored (T, T) scores), logits only at loss positions,
computed in chunks, and optional activation checkpointing. It is an estimate: allocator slack,
CUDA context and the framework add a few hundred MB that no formula sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tunesmith.config import RunConfig
from tunesmith.methods import METHODS, count_parameters
from tunesmith.methods.base import creates_head

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30

# Activation bytes kept per token per layer, in units of hidden size x activation bytes, for a
# Llama-style block with SDPA (Korthikanti et al.'s 34 sbh, minus the dropout masks we do not keep
# and plus the gated MLP's third projection); MLP intermediate ~ 2.7 hidden in Llama families.
ACTIVATION_UNITS_PER_LAYER = 34


@dataclass
class MemoryPlan:
    total_params: int
    trainable_params: int
    parts_gib: dict[str, float] = field(default_factory=dict)
    budget_gib: float | None = None
    advice: list[str] = field(default_factory=list)

    @property
    def total_gib(self) -> float:
        return sum(self.parts_gib.values())

    @property
    def fits(self) -> bool:
        return self.budget_gib is None or self.total_gib <= self.budget_gib


def parameter_counts(config: RunConfig) -> tuple[int, int, object]:
    """(trainable, total, model config): the method applied to the model built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from tunesmith.models import resolve_model

    folder = resolve_model(config.model)
    model_config = AutoConfig.from_pretrained(folder, trust_remote_code=config.model.trust_remote_code)
    model_class = AutoModelForSequenceClassification if creates_head(config.task) else AutoModelForCausalLM
    with torch.device("meta"):
        model = model_class.from_config(model_config)
        model = METHODS.get(config.method.name).apply(model, config.method, config.task)
    trainable, total = count_parameters(model)
    return trainable, total, model_config


def weights_dtype(config: RunConfig, on_gpu: bool) -> str:
    if config.model.dtype != "auto":
        return config.model.dtype
    return "bfloat16" if on_gpu else "float32"


def plan_memory(config: RunConfig, budget_gib: float | None = None, on_gpu: bool | None = None) -> MemoryPlan:
    """Estimated peak memory per device (data parallel: every process holds a full replica)."""
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    trainable, total, model_config = parameter_counts(config)
    dtype = weights_dtype(config, on_gpu)
    weight_bytes = BYTES[dtype]
    train = config.train
    hidden = getattr(model_config, "hidden_size", 0) or getattr(model_config, "d_model", 0)
    layers = getattr(model_config, "num_hidden_layers", 0) or getattr(model_config, "n_layer", 0)
    vocab = getattr(model_config, "vocab_size", 0)
    tokens = train.batch_size * config.data.max_length  # per micro-batch, per process
    activation_bytes = 2 if (on_gpu or dtype != "float32") else 4

    if train.gradient_checkpointing:
        # Only each layer's input is kept, plus one layer's full activations during recomputation.
        activations = tokens * hidden * activation_bytes * (layers + ACTIVATION_UNITS_PER_LAYER)
    else:
        activations = tokens * hidden * activation_bytes * ACTIVATION_UNITS_PER_LAYER * layers
    if creates_head(config.task):
        logits = train.batch_size * 4 * 64  # a handful of classes: negligible
    else:
        # float32 logits (+ softmax gradient) for at most loss_chunk_tokens positions at a time.
        chunk = getattr(config.objective, "loss_chunk_tokens", None) or tokens
        logits = min(chunk, tokens) * vocab * 4 * 2

    parts = {
        "weights": total * weight_bytes,
        "gradients": trainable * weight_bytes,
        # AdamW: two moments per trainable parameter, in the parameter's dtype (torch's zeros_like).
        "optimizer (AdamW)": trainable * 2 * weight_bytes,
        "activations": activations,
        "logits + loss": logits,
    }
    plan = MemoryPlan(total, trainable, {name: value / GIB for name, value in parts.items()}, budget_gib)
    if not plan.fits:
        plan.advice = advice_for(config, plan)
    return plan


def advice_for(config: RunConfig, plan: MemoryPlan) -> list[str]:
    """What to change, largest saving first, named by config key."""
    parts = plan.parts_gib
    advice = []
    if not config.train.gradient_checkpointing and parts["activations"] > 0.2 * plan.total_gib:
        advice.append("train.gradient_checkpointing: true (recompute activations; ~30% slower, far less memory)")
    if config.train.batch_size > 1 and parts["activations"] > 0.2 * plan.total_gib:
        advice.append(
            f"train.batch_size: {max(1, config.train.batch_size // 2)} with train.grad_accum: "
            f"{config.train.grad_accum * 2} (same effective batch, half the activations)"
        )
    training_state = parts["optimizer (AdamW)"] + parts["gradients"]
    if config.method.name in ("full", "freeze") and training_state > 0.3 * plan.total_gib:
        advice.append("method.name: lora (optimizer state and gradients only for the adapters)")
    if config.model.dtype in ("auto", "float32") and parts["weights"] > 0.3 * plan.total_gib:
        advice.append("model.dtype: bfloat16 on a GPU that supports it (half the weight memory)")
    if not advice or parts["activations"] > 0.5 * plan.total_gib:
        advice.append(f"data.max_length: {max(64, config.data.max_length // 2)} (activations scale with length)")
    return advice
