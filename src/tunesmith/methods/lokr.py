"""LoKr through peft (Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS
Fine-Tuning to Model Evaluation"; LyCORIS): the update is a Kronecker product W1 (x) (W2a W2b).
W1 starts at zero, so training starts at the base model's output.
"""

from __future__ import annotations

from typing import Literal

from peft import LoKrConfig, get_peft_model
from pydantic import Field, model_validator

from tunesmith.methods.base import MethodSettings, MethodSpec, peft_task_type, register


class LokrSettings(MethodSettings):
    name: Literal["lokr"] = "lokr"
    r: int = Field(8, ge=1, description="Rank of the low-rank factor W2a W2b.")
    alpha: float | None = Field(None, gt=0, description="Scaling numerator (update x alpha/r); default r.")
    decompose_factor: int = Field(-1, description="Size of W1 along each dimension; -1 picks the most square split.")
    decompose_both: bool = Field(False, description="Also factor W1 into a low-rank product.")
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


def apply_lokr(model, settings: LokrSettings, task: str):
    peft_config = LoKrConfig(
        task_type=peft_task_type(task),
        r=settings.r,
        alpha=settings.alpha,
        decompose_factor=settings.decompose_factor,
        decompose_both=settings.decompose_both,
        rank_dropout=settings.rank_dropout,
        module_dropout=settings.module_dropout,
        target_modules=settings.target_modules,
    )
    return get_peft_model(model, peft_config)


register(MethodSpec(name="lokr", settings=LokrSettings, apply=apply_lokr, default_lr=2e-4, saves="adapter"))
