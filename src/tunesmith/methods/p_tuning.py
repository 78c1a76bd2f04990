"""P-tuning through peft (Liu et al. 2021, "GPT Understands, Too"): the virtual-token embeddings
are produced by a small prompt encoder (an MLP, or the paper's LSTM + MLP) that is trained;
the model is frozen.
"""

from __future__ import annotations

from typing import Literal

from peft import PromptEncoderConfig, PromptEncoderReparameterizationType
from pydantic import Field

from tunesmith.methods.base import MethodSettings, MethodSpec, peft_model, peft_task_type, register


class PTuningSettings(MethodSettings):
    name: Literal["p_tuning"] = "p_tuning"
    num_virtual_tokens: int = Field(20, ge=1, description="Number of virtual tokens.")
    encoder: Literal["mlp", "lstm"] = Field(
        "mlp", description="Prompt encoder: MLP, or bidirectional LSTM + MLP (the paper's)."
    )
    encoder_hidden_size: int = Field(128, ge=1, description="Hidden size of the prompt encoder.")
    encoder_num_layers: int = Field(2, ge=1, description="Layers of the LSTM encoder.")
    encoder_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout in the prompt encoder.")


def apply_p_tuning(model, settings: PTuningSettings, task: str):
    peft_config = PromptEncoderConfig(
        task_type=peft_task_type(task),
        num_virtual_tokens=settings.num_virtual_tokens,
        encoder_reparameterization_type=PromptEncoderReparameterizationType(settings.encoder.upper()),
        encoder_hidden_size=settings.encoder_hidden_size,
        encoder_num_layers=settings.encoder_num_layers,
        encoder_dropout=settings.encoder_dropout,
    )
    return peft_model(model, peft_config)


# peft's p-tuning recipes use 1e-3 with AdamW.
register(
    MethodSpec(
        name="p_tuning", settings=PTuningSettings, apply=apply_p_tuning, default_lr=1e-3,
        lr_range=(1e-4, 1e-2), saves="adapter",
        supports_packing=False,
    )
)
