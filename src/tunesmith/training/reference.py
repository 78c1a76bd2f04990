"""The reference model for objectives that compare against the starting policy (DPO, KL penalties).

For a peft model the reference is the same model with its adapters disabled: the frozen base IS
the starting policy, so no second copy is held in memory. Any other model gets a frozen copy,
made before the first optimiser step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


class ReferenceModel:
    def __init__(self, model: torch.nn.Module | None, load_copy: Callable[[], torch.nn.Module] | None = None):
        """`model` is the starting model, or None for an objective whose reference brings its own
        model (distill's teacher): `active` then yields None. `load_copy`, where given, loads the same
        weights as `model` holds (a sharded run's files, read again) in place of copying them."""
        self.uses_disabled_adapters = model is not None and hasattr(model, "disable_adapter")
        self.frozen_copy = None
        self.on_demand: Callable[[], torch.nn.Module] | None = None
        self.absent = model is None
        if model is not None and not self.uses_disabled_adapters:
            frozen = load_copy() if load_copy is not None else copy.deepcopy(model)
            self.frozen_copy = frozen.eval().requires_grad_(False)

    def hold_on_demand(self, load: Callable[[], torch.nn.Module]) -> None:
        """Keep `load` (which loads an objective's own model, sharded) for the `train.cache_reference` pass,
        which calls it only if the outputs it stores are not stored yet."""
        self.on_demand = load

    def hold(self, model: torch.nn.Module) -> None:
        """Run `model` as the reference from now on: an objective's own model (distill's teacher) once the
        loop has sharded it."""
        self.frozen_copy, self.absent = model.eval().requires_grad_(False), False

    @contextmanager
    def active(self, model: torch.nn.Module) -> Iterator[torch.nn.Module | None]:
        """The module to run as the reference, in eval mode (no dropout) and without gradients."""
        if self.absent:
            with torch.no_grad():
                yield None
            return
        if self.frozen_copy is not None:
            with torch.no_grad():
                yield self.frozen_copy
            return
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), model.disable_adapter():
                yield model
        finally:
            model.train(was_training)


def training_batch(objective, reference: ReferenceModel | None, model, batch: dict, settings) -> dict:
    """The batch a training micro-step's `loss` sees: an online objective's rollout (samples, rewards and
    the reference's view of them), or the batch with the reference's outputs added."""
    if objective.rollout is not None:
        return objective.rollout(model, reference, batch, settings)
    return add_reference_outputs(objective, reference, model, batch, settings)


def add_reference_outputs(objective, reference: ReferenceModel | None, model, batch: dict, settings) -> dict:
    """Run the objective's reference computation (if it has one) and add its tensors to the batch."""
    if objective.reference is None or reference is None:
        return batch
    with reference.active(model) as reference_model:
        return {**batch, **objective.reference(reference_model, batch, settings)}
