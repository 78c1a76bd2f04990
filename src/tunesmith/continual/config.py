"""The `continual:` section of a run config: how a run that starts from a previous one
(`model.from_run`) guards what that run learned."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from tunesmith.continual.penalties import REGULARIZERS
from tunesmith.settings import Section


class ReplayConfig(Section):
    fraction: float = Field(
        0.25,
        gt=0,
        description="Old examples mixed into training, as a fraction of the new training examples (0.25: one old "
        "example per four new). They are drawn once, seeded, from `continual.old_data`: a fixed replay buffer.",
    )


class RegularizerConfig(Section):
    name: str = Field(
        description="l2sp: squared distance to the previous weights (Li et al. 2018); ewc: the same weighted by "
        "the diagonal Fisher on old data (Kirkpatrick et al. 2017); olora: |A_old A_new^T| between the old and new "
        "LoRA subspaces (Wang et al. 2023).",
    )
    weight: float = Field(
        gt=0,
        description="Multiplies the penalty, which is added once per optimiser step to the step's per-token mean "
        "loss. No paper default carries over to that scale: see docs/continual.md for the ranges that worked.",
    )
    fisher_examples: int = Field(
        64, ge=1, description="ewc: old examples whose squared loss gradients (one example at a time) make the Fisher."
    )

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        return REGULARIZERS.known(name)


class ContinualConfig(Section):
    old_data: Literal["previous"] | Path = Field(
        "previous",
        description="The old task's examples, for replay and EWC's Fisher: `previous` (the training data of "
        "model.from_run, read from its config.yaml) or a data file read with this run's data settings.",
    )
    replay: ReplayConfig | None = Field(None, description="Mix old examples into the new training data.")
    regularizer: RegularizerConfig | None = Field(None, description="Penalise moving away from the old task.")
    adapter_per_task: bool = Field(
        False,
        description="LoRA: keep the previous run's adapters, frozen and active, and train a new one beside them "
        "(instead of merging them into the base).",
    )

    @field_validator("old_data")
    @classmethod
    def _exists(cls, value: Literal["previous"] | Path) -> Literal["previous"] | Path:
        if value != "previous" and not Path(value).exists():
            raise ValueError(f"file not found: {value}")
        return value

    def needs_from_run(self) -> str | None:
        """The key that needs model.from_run (a previous run to read), or None: L2-SP and EWC with a
        data file in continual.old_data also work from a base model (L2-SP's original use)."""
        if self.old_data == "previous" and (self.replay is not None or self._regularizer_name() == "ewc"):
            return "continual.old_data"
        if self.adapter_per_task:
            return "continual.adapter_per_task"
        if self._regularizer_name() == "olora":
            return "continual.regularizer.name"
        return None

    def _regularizer_name(self) -> str | None:
        return self.regularizer.name if self.regularizer is not None else None

