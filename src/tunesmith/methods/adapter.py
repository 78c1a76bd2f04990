"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP";
Pfeiffer et al. 2021, "AdapterFusion"). peft has none, so they are built here.

An adapter is down-projection -> activation -> up-projection, added to its input (the residual),
placed on a sublayer's output projection, before the block adds its own skip connection:

    houlsby:  after the attention output projection AND after the MLP output projection (sec. 2.1)
    pfeiffer: after the MLP output projection only (AdapterFusion, sec. 3.1 / appendix)

The up-projection starts at zero (Houlsby sec. 2.1 uses near-zero init), so the adapted model
starts exactly at the base model's output. Adapters are inserted by replacing each target
Linear with an `AdaptedLinear(base_layer, adapter)` module (as peft does for LoRA): no forward
is patched, and the base weights keep their values under `<name>.base_layer.weight`.

Not mergeable: the activation makes the adapter non-linear, so it cannot be folded into W.

Saved form (`save_pretrained(folder)`, what the loop calls): `bottleneck_adapter.safetensors`
(the trainable tensors, named as in the base model: adapters and, for classify, the new head) and
`bottleneck_adapter.json` (this method's settings, the inserted module names, the base folder).
`load_adapter(base_model, folder)` rebuilds it on a freshly loaded base.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

from tunesmith.errors import ModelError
from tunesmith.methods.base import MethodSettings, MethodSpec, classification_head_names, creates_head, register

WEIGHTS_NAME = "bottleneck_adapter.safetensors"
CONFIG_NAME = "bottleneck_adapter.json"
FORMAT_VERSION = 1

# Output projections of attention and of the MLP, by architecture (module-name regexes).
ATTENTION_OUTPUTS = (r"self_attn\.o_proj", r"attention\.output\.dense", r"attn\.c_proj", r"self_attn\.out_proj")
MLP_OUTPUTS = (r"mlp\.down_proj", r"(?<!attention\.)output\.dense", r"mlp\.c_proj", r"\.fc2")

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class AdapterSettings(MethodSettings):
    name: Literal["adapter"] = "adapter"
    placement: Literal["houlsby", "pfeiffer"] = Field(
        "pfeiffer", description="houlsby: after attention and after the MLP; pfeiffer: after the MLP only."
    )
    reduction_factor: float | None = Field(
        16.0, gt=0, description="Bottleneck size = hidden size / reduction_factor (Pfeiffer: 16)."
    )
    size: int | None = Field(None, ge=1, description="Bottleneck size; overrides reduction_factor.")
    activation: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="Non-linearity in the bottleneck.")
    residual: bool = Field(True, description="Add the adapter's input to its output (the adapter learns a residual).")
    attention_modules: list[str] = Field(
        default_factory=lambda: list(ATTENTION_OUTPUTS),
        description="Regexes of attention output projections (houlsby places an adapter after each).",
    )
    mlp_modules: list[str] = Field(
        default_factory=lambda: list(MLP_OUTPUTS), description="Regexes of MLP output projections."
    )

    @model_validator(mode="after")
    def _starts_at_the_base_model(self):
        if not self.residual:
            # Without the skip, a zero up-projection outputs zeros: the model would start broken.
            raise ValueError("residual: false would start training from a zeroed sublayer; keep residual: true")
        return self

    def bottleneck_size(self, hidden_size: int) -> int:
        return self.size if self.size is not None else max(1, round(hidden_size / self.reduction_factor))


class BottleneckAdapter(nn.Module):
    def __init__(self, hidden_size: int, bottleneck: int, activation: str, residual: bool):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.activation = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.residual = residual

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., H)
        update = self.up(self.activation(self.down(hidden)))
        return hidden + update if self.residual else update


class AdaptedLinear(nn.Module):
    """A frozen Linear followed by a trainable adapter; `enabled = False` gives the Linear alone."""

    def __init__(self, base_layer: nn.Linear, adapter: BottleneckAdapter):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.enabled = True

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        output = self.base_layer(inputs)
        return self.adapter(output) if self.enabled else output


class BottleneckAdapterModel(nn.Module):
    """The base model with adapters inserted in place, plus what the loop and load_run need of a
    tuned model: forward, generate, get_base_model, disable_adapter (the reference model for
    DPO-style objectives), save_pretrained."""

    def __init__(self, model: nn.Module, settings: AdapterSettings, task: str):
        super().__init__()
        self.model = model
        self.settings = settings
        self.task = task
        self.adapted_modules = insert_adapters(model, settings)
        self.model.requires_grad_(False)
        for module in self.adapted_layers():
            module.adapter.requires_grad_(True)
        if creates_head(task):
            # A new classification head is random: it must be trained (and saved) in full.
            for head in classification_head_names(model):
                getattr(model, head).requires_grad_(True)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The transformers model, adapters included (they sit inside it, as peft's LoRA layers do)."""
        return self.model

    @property
    def config(self):
        return self.model.config

    def adapted_layers(self) -> list[AdaptedLinear]:
        return [self.model.get_submodule(name) for name in self.adapted_modules]

    @contextmanager
    def disable_adapter(self):
        layers = self.adapted_layers()
        for layer in layers:
            layer.enabled = False
        try:
            yield
        finally:
            for layer in layers:
                layer.enabled = True

    def save_pretrained(self, folder, **kwargs) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            name: parameter.detach().to("cpu").contiguous()
            for name, parameter in self.model.named_parameters()
            if parameter.requires_grad
        }
        save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        description = {
            "format": "tunesmith-bottleneck-adapter",
            "version": FORMAT_VERSION,
            "settings": self.settings.model_dump(),
            "task": self.task,
            "adapted_modules": self.adapted_modules,
            "mergeable": False,
            "base_model_name_or_path": str(getattr(self.model, "name_or_path", "") or ""),
        }
        (folder / CONFIG_NAME).write_text(json.dumps(description, indent=2), encoding="utf-8")


def insert_adapters(model: nn.Module, settings: AdapterSettings) -> list[str]:
    """Replace each target Linear with an AdaptedLinear; return the replaced modules' names."""
    patterns = list(settings.mlp_modules)
    if settings.placement == "houlsby":
        patterns += settings.attention_modules
    targets = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(re.search(f"{pattern}$", name) for pattern in patterns)
    ]
    if not targets:
        raise ModelError(
            f"method.adapter: no module of {type(model).__name__} matches {patterns}; set "
            "method.mlp_modules / method.attention_modules to the names of its output projections"
        )
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child_name)
        hidden = linear.out_features
        adapter = BottleneckAdapter(hidden, settings.bottleneck_size(hidden), settings.activation, settings.residual)
        adapter.to(device=linear.weight.device, dtype=linear.weight.dtype)
        setattr(parent, child_name, AdaptedLinear(linear, adapter))
    return targets


def apply_adapter(model, settings: AdapterSettings, task: str):
    return BottleneckAdapterModel(model, settings, task)


def is_adapter_folder(folder: Path) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


def load_adapter(base_model: nn.Module, folder: Path) -> BottleneckAdapterModel:
    """The saved adapter rebuilt on `base_model` (a fresh base, with a new head for classify)."""
    folder = Path(folder)
    description = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    if description.get("format") != "tunesmith-bottleneck-adapter" or description.get("version") != FORMAT_VERSION:
        raise ModelError(f"{folder / CONFIG_NAME}: not a tunesmith bottleneck adapter (version {FORMAT_VERSION})")
    model = BottleneckAdapterModel(base_model, AdapterSettings(**description["settings"]), description["task"])
    if model.adapted_modules != description["adapted_modules"]:
        raise ModelError(f"{folder}: the adapter was trained on another architecture than this base model")
    tensors = load_file(folder / WEIGHTS_NAME)
    parameters = dict(model.model.named_parameters())
    unknown = sorted(set(tensors) - set(parameters))
    missing = sorted(name for name, parameter in parameters.items() if parameter.requires_grad and name not in tensors)
    if unknown or missing:
        raise ModelError(
            f"{folder / WEIGHTS_NAME}: does not fit the base model (unknown {unknown[:3]}, missing {missing[:3]})"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)
    return model


# Houlsby et al. tune lr in {1e-4 .. 1e-3}; Pfeiffer et al. use 1e-4; 5e-4 suits small models.
register(
    MethodSpec(
        name="adapter", settings=AdapterSettings, apply=apply_adapter, default_lr=5e-4,
        lr_range=(1e-4, 3e-3), saves="adapter",
        load=load_adapter,
    )
)
