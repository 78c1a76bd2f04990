"""Setting up a continued run: kept adapters, the replay buffer and the regulariser, once, before training.

The loop calls `prepare_continual` after the method is applied and the model is on its device,
before the optimiser is built; it appends `replay_examples` to the training examples and adds
`penalty(model)` once per optimiser step to the step's mean loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING

import torch

from tunesmith.continual.old_data import draw_examples, old_examples
from tunesmith.continual.penalties import REGULARIZERS, Penalty, PenaltySetup
from tunesmith.errors import ConfigError

if TYPE_CHECKING:
    from tunesmith.config import RunConfig
    from tunesmith.objectives.base import ObjectiveSpec

FISHER_SEED_OFFSET = 1
"""EWC's Fisher examples are drawn with train.seed + 1, independently of the replay buffer."""


@dataclass
class Continual:
    """What a continued run adds to the loop: old examples to train on, and a penalty per step."""

    replay_examples: list[dict] = field(default_factory=list)
    """Tokenised old examples, in the form of prepare_data's train examples, to append to them."""
    regularizer: Penalty | None = None

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """This process's share of the regulariser's value (0-dim, differentiable; summed across processes it
        is the penalty), to add once per optimiser step; None without one."""
        return None if self.regularizer is None else self.regularizer(model)

    def after_sharding(self, model: torch.nn.Module) -> None:
        """Follow the regulariser's weights into the sharded layers (FSDP replaced their parameters)."""
        follow = getattr(self.regularizer, "after_sharding", None)
        if follow is not None:
            follow(model)


def prepare_continual(
    config: RunConfig, model: torch.nn.Module, tokenizer, train_examples: list[dict], objective: ObjectiveSpec,
    device: torch.device,
) -> Continual:
    """Attach the kept adapters, draw the replay buffer and build the regulariser for `config.continual`.

    `model` is the model after `method.apply`, already on `device`; with adapter_per_task its new
    adapter is the one being trained, and the previous runs' adapters are attached to it here,
    frozen, before any anchor or Fisher is taken (the new adapter starts at B = 0, so attaching them
    restores the previous run's function exactly).
    """
    settings = config.continual
    if settings is None:
        return Continual()
    if settings.adapter_per_task:
        attach_previous_adapters(config, model, device)

    label_names = None
    if objective.model_kind == "sequence_classification":
        label_names = [model.config.id2label[index] for index in range(len(model.config.id2label))]

    @cache
    def all_old_examples() -> tuple[dict, ...]:
        return tuple(old_examples(config, tokenizer, label_names))

    replay_examples = []
    if settings.replay is not None and config.data.mixture is not None:
        raise ConfigError(
            "continual.replay: with data.mixture, add the old data as one more mixture component instead"
        )
    if settings.replay is not None:
        count = max(1, round(settings.replay.fraction * len(train_examples)))
        replay_examples = draw_examples(list(all_old_examples()), count, config.train.seed)
        if any("weight" in example for example in train_examples):  # sample weights: old examples count as 1
            replay_examples = [{"weight": 1.0, **example} for example in replay_examples]

    regularizer = None
    if settings.regularizer is not None:
        setup = PenaltySetup(
            model=model,
            weight=settings.regularizer.weight,
            fisher_examples=settings.regularizer.fisher_examples,
            old_examples=lambda count: draw_examples(
                list(all_old_examples()), count, config.train.seed + FISHER_SEED_OFFSET
            ),
            objective=objective,
            objective_settings=config.objective,
            pad_id=tokenizer.pad_token_id,
            device=device,
            from_run=config.model.from_run,
        )
        regularizer = REGULARIZERS.get(settings.regularizer.name, "continual.regularizer.name").build(setup)
    return Continual(replay_examples, regularizer)


def attach_previous_adapters(config: RunConfig, model: torch.nn.Module, device: torch.device) -> None:
    """Load the previous runs' LoRA adapters into the new peft model, frozen and active beside its own."""
    from tunesmith.models import attach_frozen_adapters, kept_adapter_folders

    if config.model.from_run is None:
        raise ConfigError("continual.adapter_per_task: needs model.from_run, the LoRA run whose adapter to keep")
    if config.method.name != "lora" or not hasattr(model, "peft_config"):
        raise ConfigError(
            f"continual.adapter_per_task: needs method.name: lora (a new adapter per task), got {config.method.name}"
        )
    if trains_module_copies(model):
        raise ConfigError(
            "continual.adapter_per_task: a classification head cannot be shared by several active adapters "
            "(peft's modules_to_save); continue a classify run with the adapters merged instead"
        )
    attach_frozen_adapters(model, kept_adapter_folders(config.model.from_run))
    model.to(device)


def trains_module_copies(model: torch.nn.Module) -> bool:
    """Whether the peft model trains a copy of some module in full (a classification head)."""
    return any(getattr(peft_config, "modules_to_save", None) for peft_config in model.peft_config.values())
