"""Prefix tuning through peft (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation"): trained key/value vectors are prepended at every layer; the model is frozen.

`reparameterize` trains the prefix through a two-layer MLP (the paper's sec. 4.3: optimising the
prefix directly is unstable); only the resulting prefix matters at inference, but peft saves the
MLP, so the saved adapter is larger with it on.
"""

from __future__ import annotations

from typing import Literal

from peft import PrefixTuningConfig
from pydantic import Field

from tunesmith.methods.base import MethodSettings, MethodSpec, peft_model, peft_task_type, register


class PrefixSettings(MethodSettings):
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, ge=1, description="Prefix length at each layer (the paper uses 10-200).")
    reparameterize: bool = Field(False, description="Produce the prefix through an MLP while training (sec. 4.3).")
    encoder_hidden_size: int = Field(512, ge=1, description="Hidden size of that MLP (paper: 512 for GPT-2 medium).")


def apply_prefix(model, settings: PrefixSettings, task: str):
    # peft's SEQ_CLS task makes the new classification head trainable and saves it with the prefix.
    peft_config = PrefixTuningConfig(
        task_type=peft_task_type(task),
        num_virtual_tokens=settings.num_virtual_tokens,
        prefix_projection=settings.reparameterize,
        encoder_hidden_size=settings.encoder_hidden_size,
    )
    return peft_model(model, peft_config)


# Learning rate: prompt-learning methods train few parameters from scratch and need a high rate;
# 1e-2 is peft's documented recipe for prefix tuning (Li & Liang used 5e-5 with the MLP on GPT-2).
register(MethodSpec(
    name="prefix", settings=PrefixSettings, apply=apply_prefix, default_lr=1e-2, lr_range=(1e-3, 3e-2), saves="adapter"
))
