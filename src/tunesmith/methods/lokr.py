"""LoKr through peft (Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS
Fine-Tuning to Model Evaluation"; LyCORIS): the update is a Kronecker product W1 (x) (W2a W2b).
W1 starts at zero, so training starts at the base model's output.
"""

from __future__ import annotations

from typing import Literal

from peft import LoKrConfig
from pydantic import Field

from tunesmith.methods.base import MethodSpec, peft_model, peft_task_type, register
from tunesmith.methods.loha import LycorisSettings


class LokrSettings(LycorisSettings):
    name: Literal["lokr"] = "lokr"
    decompose_factor: int = Field(-1, description="Size of W1 along each dimension; -1 picks the most square split.")
    decompose_both: bool = Field(False, description="Also factor W1 into a low-rank product.")


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
    return peft_model(model, peft_config)


register(MethodSpec(
    name="lokr", settings=LokrSettings, apply=apply_lokr, default_lr=2e-4, lr_range=(1e-4, 2e-3), saves="adapter"
))
