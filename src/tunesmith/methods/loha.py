"""LoHa through peft (Hyeon-Woo et al. 2022, "FedPara"; LyCORIS): the update is the Hadamard
product of two low-rank products, (W1a W1b) * (W2a W2b), so rank r gives an update of rank up to r^2.
One factor starts at zero, so training starts at the base model's output.
"""

from __future__ import annotations

from typing import Literal

from peft import LoHaConfig
from pydantic import Field, model_validator

from tunesmith.methods.base import MethodSettings, MethodSpec, peft_model, peft_task_type, register


class LycorisSettings(MethodSettings):
    """Settings LoHa and LoKr share (peft's LyCORIS family: a factored weight update per module)."""

    r: int = Field(8, ge=1, description="Rank of the low-rank factors.")
    alpha: float | None = Field(None, gt=0, description="Scaling numerator (update x alpha/r); default r.")
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the rank dimension while training.")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="Probability of skipping a module's update.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="'all-linear' or a list of module names / suffixes."
    )

    @model_validator(mode="after")
    def _default_alpha(self):
        if self.alpha is None:
            self.alpha = float(self.r)
        return self


class LohaSettings(LycorisSettings):
    name: Literal["loha"] = "loha"


def apply_loha(model, settings: LohaSettings, task: str):
    peft_config = LoHaConfig(
        task_type=peft_task_type(task),
        r=settings.r,
        alpha=settings.alpha,
        rank_dropout=settings.rank_dropout,
        module_dropout=settings.module_dropout,
        target_modules=settings.target_modules,
    )
    return peft_model(model, peft_config)


# LyCORIS recommends learning rates like LoRA's for LoHa.
register(MethodSpec(
    name="loha", settings=LohaSettings, apply=apply_loha, default_lr=2e-4, lr_range=(1e-4, 2e-3), saves="adapter"
))
