"""(IA)^3 through peft (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
Cheaper than In-Context Learning", T-Few): learned vectors rescale the keys, the values and the
feed-forward activations. They start at one, so training starts at the base model's output.
"""

from __future__ import annotations

from typing import Literal

from peft import IA3Config
from pydantic import Field, model_validator

from tunesmith.methods.base import MethodSettings, MethodSpec, peft_model, peft_task_type, register


class IA3Settings(MethodSettings):
    name: Literal["ia3"] = "ia3"
    target_modules: list[str] | None = Field(
        None, description="Modules to rescale; default peft's per-architecture keys, values and FFN output."
    )
    feedforward_modules: list[str] | None = Field(
        None, description="Which of target_modules are feed-forward (their INPUT is rescaled); a subset of them."
    )

    @model_validator(mode="after")
    def _both_or_neither(self):
        if (self.target_modules is None) != (self.feedforward_modules is None):
            raise ValueError("give target_modules and feedforward_modules together, or neither (peft's defaults)")
        return self


def apply_ia3(model, settings: IA3Settings, task: str):
    peft_config = IA3Config(
        task_type=peft_task_type(task),
        target_modules=settings.target_modules,
        feedforward_modules=settings.feedforward_modules,
    )
    return peft_model(model, peft_config)


# T-Few trains (IA)^3 with lr 3e-3 (sec. 3.3).
register(MethodSpec(
    name="ia3", settings=IA3Settings, apply=apply_ia3, default_lr=3e-3, lr_range=(1e-3, 1e-2), saves="adapter"
))
