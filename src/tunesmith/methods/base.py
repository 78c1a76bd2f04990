"""The method contract: which parameters become trainable, and how the result is saved and loaded.

A method knows nothing of losses. It is one module holding a settings class (pydantic, its
fields are the `method.*` config keys) and one `register(MethodSpec(...))` call.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from tunesmith.errors import ConfigError
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
    lr_range: tuple[float, float] | None = None
    """(low, high): the learning rates the method's paper and current practice sweep (full fine-tuning
    1e-5..1e-4, Devlin et al. 2019 / Ouyang et al. 2022; LoRA 5e-5..1e-3, Hu et al. 2022; adapters
    1e-4..3e-3, Houlsby et al. 2019; prompt tuning up to 0.3, Lester et al. 2021; IA3 3e-3, Liu et al.
    2022); `compare-methods --lr-trials` searches it."""
    optimizer_groups: Callable[[torch.nn.Module, MethodSettings, float, float], list[dict]] | None = None
    """Optional optimizer_groups(model, settings, lr, weight_decay) -> AdamW parameter groups."""
    save: Callable[[torch.nn.Module, Path], None] | None = None
    """Optional save(model, folder) for a method whose saved form is not `model.save_pretrained(folder)`
    (PiSSA/OLoRA convert their adapter so it applies to the ORIGINAL base). None: save_pretrained."""
    supports_packing: bool = True
    """False for methods that prepend virtual tokens: peft ignores position_ids for them."""
    load: Callable[[torch.nn.Module, Path], torch.nn.Module] | None = None
    """Optional load(base_model, folder) -> tuned model, for a format plain peft cannot read
    (the bottleneck `adapter`). None: the folder is a peft adapter (`PeftModel.from_pretrained`)."""
    adds_parameters: bool = True
    """False for a method that only chooses which of the loaded weights train (full, freeze): every
    parameter it leaves is one the files held, so a sharded run may load the weights in their stored dtype
    and convert each layer as it shards it (`model.dtype` reached layer by layer, training/sharding.py)."""


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


def peft_task_type(task: str):
    """peft's TaskType for a tunesmith task: SEQ_CLS trains and saves the new head (modules_to_save)."""
    from peft import TaskType

    return TaskType.SEQ_CLS if creates_head(task) else TaskType.CAUSAL_LM


# peft's settings that its LoRA on a parameter (`ParamWrapper`: a mixture of experts' 3-D weights, which
# target_modules: all-linear reaches) refuses, by the config key that sets them.
PARAMETER_LORA_REFUSES = {"lora_dropout": "method.dropout", "use_dora": "method.dora"}


def peft_model(model: torch.nn.Module, peft_config) -> torch.nn.Module:
    """peft's `get_peft_model`, without two warnings about peft's own doing that its user can do nothing about:
    the FutureWarning it makes transformers 5 print on every run (peft reads the deprecated
    `is_gradient_checkpointing`), and, for a mixture of experts, that the ranks and alphas peft itself sets for
    the fused gate_up_proj weights "did not match any targeted module" (they apply: it targets them as
    parameters). A setting that LoRA on such parameters refuses is a ConfigError naming its key."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", category=RuntimeWarning,
                                message=r"The following (rank|alpha)_pattern keys did not match .*gate_up_proj")
        try:
            return get_peft_model(model, peft_config)
        except ValueError as error:
            key = next((key for option, key in PARAMETER_LORA_REFUSES.items()
                        if f"ParamWrapper does not work with {option}" in str(error)), None)
            if key is None:
                raise
            raise ConfigError(
                f"{key}: LoRA on a mixture of experts' expert and router weights (which target_modules: all-linear "
                f"reaches) cannot take it; turn it off, or name the linear layers in method.target_modules "
                f"(such as q_proj, k_proj, v_proj and o_proj)") from None


def creates_head(task: str) -> bool:
    """Whether the task puts a new, randomly initialised head on the model (classify, reward).

    Such a head is always trained in full: a frozen random head cannot learn anything.
    """
    from tunesmith.objectives import OBJECTIVES  # objectives import the data layer; keep config light

    return OBJECTIVES.get(task).model_kind == "sequence_classification"
