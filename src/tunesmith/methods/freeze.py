"""Selective fine-tuning: train the last N blocks, named modules, or only the biases (BitFit).

BitFit: Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models". A newly created classification head is always
trained: it starts from random weights and a frozen random head cannot learn anything.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field, model_validator

from tunesmith.errors import ConfigError
from tunesmith.methods.base import MethodSettings, MethodSpec, classification_head_names, creates_head, register


class FreezeSettings(MethodSettings):
    name: Literal["freeze"] = "freeze"
    layers: int | None = Field(
        None, ge=1, description="Train only the last N transformer blocks (and the final norm)."
    )
    modules: list[str] = Field(
        default_factory=list,
        description="Regular expressions; parameters whose name matches any of them are trained.",
    )
    bitfit: bool = Field(False, description="Train only the bias terms (BitFit).")

    @model_validator(mode="after")
    def _something_is_trained(self):
        if self.layers is None and not self.modules and not self.bitfit:
            self.layers = 2
        return self


def transformer_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of transformer blocks: the longest ModuleList whose length is num_hidden_layers."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers
    ]
    if not candidates:
        raise ValueError(f"cannot find the {n_layers} transformer blocks of {type(model).__name__}")
    return candidates[0]


def trained_by_freeze(model: torch.nn.Module, settings: FreezeSettings) -> set[str]:
    names: set[str] = set()
    all_names = [name for name, _ in model.named_parameters()]
    if settings.layers is not None:
        blocks_name, blocks = transformer_blocks(model)
        first = max(len(blocks) - settings.layers, 0)
        prefixes = tuple(f"{blocks_name}.{index}." for index in range(first, len(blocks)))
        names |= {name for name in all_names if name.startswith(prefixes)}
        # The final norm sits between the last block and the head; it belongs with the top layers.
        names |= {name for name in all_names if re.search(r"(^|\.)(norm|final_layer_norm|ln_f)\.", name)}
    for pattern in settings.modules:
        names |= {name for name in all_names if re.search(pattern, name)}
    if settings.bitfit:
        names |= {name for name in all_names if name.endswith(".bias")}
    return names


def apply_freeze(model, settings: FreezeSettings, task: str):
    trained = trained_by_freeze(model, settings)
    heads = tuple(f"{head}." for head in classification_head_names(model)) if creates_head(task) else ()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trained or (bool(heads) and name.startswith(heads)))
    if not any(parameter.requires_grad for parameter in model.parameters()):
        raise ConfigError("method: freeze settings (layers, modules, bitfit) select no parameter to train")
    return model


register(
    MethodSpec(name="freeze", settings=FreezeSettings, apply=apply_freeze, default_lr=5e-5,
    lr_range=(1e-5, 2e-4), saves="model", adds_parameters=False)
)
