"""Full fine-tuning: every parameter is trained."""

from __future__ import annotations

from typing import Literal

from tunesmith.methods.base import MethodSettings, MethodSpec, register


class FullSettings(MethodSettings):
    name: Literal["full"] = "full"


def apply_full(model, settings: FullSettings, task: str):
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


register(MethodSpec(
    name="full", settings=FullSettings, apply=apply_full, default_lr=2e-5, lr_range=(1e-5, 1e-4), saves="model",
    adds_parameters=False,
))
