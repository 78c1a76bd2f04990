"""The method contract: which parameters become trainable, and how the result is saved and loaded.

A method knows nothing of losses. It is one module holding a settings class (pydantic, its
fields are the `method.*` config keys) and one `register(MethodSpec(...))` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from tunesmith.registry import Registry


class MethodSettings(BaseModel):
    """Base of every method's settings; `name` selects the method."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    settings: type[MethodSettings]
    apply: Callable[[torch.nn.Module, MethodSettings, str], torch.nn.Module]
    """apply(model, settings, task) -> model with exactly the right parameters trainable."""
    default_lr: float
    """The learning rate used when `train.lr` is not set (current practice for this method)."""
    saves: Literal["model", "adapter"]
    """What the run directory holds: a full model folder or a peft adapter folder."""
    optimizer_groups: Callable[[torch.nn.Module, MethodSettings, float, float], list[dict]] | None = None
    """Optional optimizer_groups(model, settings, lr, weight_decay) -> AdamW parameter groups."""


METHODS: Registry[MethodSpec] = Registry("method")


def register(spec: MethodSpec) -> MethodSpec:
    return METHODS.register(spec.name, spec)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


def classification_head_names(model: torch.nn.Module) -> list[str]:
    """Names of the modules a sequence-classification model creates new (`classifier`, `score`)."""
    return [name for name in ("classifier", "score") if hasattr(model, name)]
