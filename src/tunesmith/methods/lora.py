"""LoRA through peft (Hu et al. 2021), with rsLoRA (Kalajdzievski 2023) and DoRA (Liu et al. 2024).

Defaults follow current practice: all linear layers (QLoRA, Dettmers et al. 2023, sec. 4),
alpha = 2r, and a learning rate about 10x full fine-tuning's (Biderman et al. 2024).
"""

from __future__ import annotations

from typing import Literal

from peft import LoraConfig, TaskType, get_peft_model
from pydantic import Field, model_validator

from tunesmith.methods.base import MethodSettings, MethodSpec, classification_head_names, register


class LoraSettings(MethodSettings):
    name: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, description="Rank of the update matrices.")
    alpha: float | None = Field(None, gt=0, description="Scaling numerator; default 2r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input; 0 takes peft's fast path.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="'all-linear' or a list of module names / suffixes."
    )
    rslora: bool = Field(False, description="Scale by alpha/sqrt(r) instead of alpha/r (rsLoRA).")
    dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Extra modules trained in full and saved with the adapter."
    )

    @model_validator(mode="after")
    def _default_alpha(self):
        if self.alpha is None:
            self.alpha = 2.0 * self.r
        return self


def apply_lora(model, settings: LoraSettings, task: str):
    modules_to_save = list(settings.modules_to_save)
    if task == "classify":
        # The classification head is new, random and small: train it in full (peft SEQ_CLS does the same).
        modules_to_save += [name for name in classification_head_names(model) if name not in modules_to_save]
    peft_config = LoraConfig(
        task_type=TaskType.SEQ_CLS if task == "classify" else TaskType.CAUSAL_LM,
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        use_rslora=settings.rslora,
        use_dora=settings.dora,
        modules_to_save=modules_to_save or None,
    )
    return get_peft_model(model, peft_config)


register(MethodSpec(name="lora", settings=LoraSettings, apply=apply_lora, default_lr=2e-4, saves="adapter"))
