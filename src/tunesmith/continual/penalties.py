"""Regularisers that keep a continued run near what the previous run learned.

Each is a named, registered builder: `build(setup) -> penalty`, where `penalty(model)` is a 0-dim
tensor that the loop adds ONCE per optimiser step to the step's per-token mean loss (so its
`weight` is in units of that mean loss, whatever the batch size or accumulation).

- l2sp: (weight / 2) * sum_i (theta_i - theta*_i)^2, L2-SP (Li, Grandvalet & Davoine 2018),
  theta* = the weights the run started from (the previous run's result).
- ewc: (weight / 2) * sum_i F_i (theta_i - theta*_i)^2, Elastic Weight Consolidation
  (Kirkpatrick et al. 2017, eq. 3), F = diagonal empirical Fisher of the objective's loss on old data.
- olora: weight * sum_layers sum_jk |(A_old A_new^T)_jk|, O-LoRA's orthogonality loss L_orth
  (Wang et al. 2023), A = LoRA down-projections of the previous runs and of this one.
  Departure from the paper's formula, which squares each entry: we take the absolute value, as the
  authors' code does (cmnfriend/O-LoRA, uie_trainer_lora.py; lamda_1 = 0.5 in its scripts). Both are
  zero exactly when the subspaces are orthogonal. Their optional L2 term on the new adapter (lamda_2)
  is left out.

What "theta - theta*" is depends on the method. Under full or partial fine-tuning it is each
trainable parameter minus its starting value. Under LoRA the previous weights are the frozen base
(the previous adapters merged, or kept beside it), and the new adapter moves layer W by
delta W = scale * B A: that delta is penalised, and EWC's Fisher is taken with respect to W.
This is how L2-SP and EWC read for a low-rank update; neither paper covers adapters.

Across processes a penalty returns this process's SHARE: summed over the processes it is the penalty,
and the gradients it leaves, once summed across processes (the loop sums replicated gradients; FSDP
reduce-scatters sharded ones), are the penalty's. A term on whole tensors, which every process computes
alike, counts 1/processes; a term on the rows of a sharded layer that this process holds (FSDP,
`train.sharding`) counts in full, since no other process holds them. So on sharded layers the start
values and Fisher of each weight are kept for the held rows only, and only O-LoRA's small A matrices
and a LoRA update's A are gathered whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from tunesmith.errors import ConfigError
from tunesmith.registry import Registry
from tunesmith.training.distributed import rank_and_world
from tunesmith.training.dtensors import full_tensor
from tunesmith.training.sharded_checkpoint import held_rows

if TYPE_CHECKING:
    from tunesmith.objectives.base import ObjectiveSettings, ObjectiveSpec

Penalty = Callable[[torch.nn.Module], torch.Tensor]
"""penalty(model) -> this process's share of the penalty (0-dim, differentiable); a penalty may also have
`after_sharding(model)`, which the loop calls once FSDP has sharded the decoder layers."""


@dataclass
class PenaltySetup:
    """What a regulariser may need at setup; `old_examples()` is read only by those that need it."""

    model: torch.nn.Module
    weight: float
    fisher_examples: int
    old_examples: Callable[[int], list[dict]]
    """old_examples(count) -> up to `count` tokenised old training examples (seeded draw)."""
    objective: ObjectiveSpec
    objective_settings: ObjectiveSettings | None
    pad_id: int
    device: torch.device
    from_run: Path | None


@dataclass(frozen=True)
class RegularizerSpec:
    name: str
    build: Callable[[PenaltySetup], Penalty]


REGULARIZERS: Registry[RegularizerSpec] = Registry("continual regularizer")


def register(spec: RegularizerSpec) -> RegularizerSpec:
    return REGULARIZERS.register(spec.name, spec)


# --- anchors: how far each trained weight has moved from the previous task's ------------------------


@dataclass
class ParameterAnchor:
    """A trainable parameter and its value when the run started (the held rows, once sharded)."""

    name: str
    parameter: torch.nn.Parameter
    start: torch.Tensor

    def drift(self) -> torch.Tensor:
        return held_part(self.parameter).to(self.start.device) - self.start

    @property
    def fisher_target(self) -> torch.Tensor:
        return self.parameter

    @property
    def sharded(self) -> bool:
        return isinstance(self.parameter, DTensor)

    def bind_shards(self, model: torch.nn.Module) -> DTensor | None:
        """Follow the parameter into FSDP's sharded one and keep the start rows it holds; returns it. A
        parameter left whole keeps its whole start value, moved to the device the parameter went to."""
        self.parameter = model.get_parameter(self.name)
        if not self.sharded:
            self.start = self.start.to(self.parameter.device)
            return None
        self.start = rows_held(self.start, self.parameter)
        return self.parameter


@dataclass
class LoraAnchor:
    """A LoRA layer whose trainable adapter moves its frozen base weight W by scale * B A."""

    name: str
    layer: torch.nn.Module
    adapter: str

    def drift(self) -> torch.Tensor:
        """delta W = scale * B A, (out, in) laid out like W; on a sharded layer the rows of W this process
        holds: its rows of B times the whole A (A's gradient is then summed across the processes)."""
        if not self.sharded:
            return self.layer.get_delta_weight(self.adapter)
        down, up = self.layer.lora_A[self.adapter].weight, self.layer.lora_B[self.adapter].weight
        device = torch.device(up.device_mesh.device_type)
        return (held_part(up).to(device) @ full_tensor(down, sum_gradients=True)) * self.layer.scaling[self.adapter]

    @property
    def fisher_target(self) -> torch.Tensor:
        return self.layer.base_layer.weight  # (out, in)

    @property
    def sharded(self) -> bool:
        return isinstance(self.layer.lora_B[self.adapter].weight, DTensor)

    def bind_shards(self, model: torch.nn.Module) -> DTensor | None:
        """The sharded W whose rows the drift holds (B and W are sharded alike, by output rows), or None."""
        if not self.sharded:
            return None
        if getattr(self.layer, "fan_in_fan_out", False):
            raise ConfigError(f"continual.regularizer: {self.name} stores its weight transposed (fan_in_fan_out), "
                              "whose sharded rows are not W's; set train.sharding: none")
        return self.layer.base_layer.weight


Anchor = ParameterAnchor | LoraAnchor


# --- sharded layers ----------------------------------------------------------------------------------


def held_part(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of a sharded tensor that this process holds (differentiable); a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def rows_held(whole: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This process's rows of `whole`, a tensor shaped like the sharded `like` (the rows the sharded
    checkpoints place it at), as a copy on the mesh's device, so the whole tensor can be freed."""
    start, stop = held_rows(like)
    return whole[start:stop].to(like.device_mesh.device_type, copy=True)


def trainable_lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """(module name, layer, adapter name) of each linear LoRA layer with a trainable adapter."""
    from peft.tuners.lora import LoraLayer

    found = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter, down in module.lora_A.items():
            if down.weight.requires_grad:
                found.append((name, module, adapter))
    return found


def anchors(model: torch.nn.Module) -> list[Anchor]:
    """One anchor per trained weight: each trainable LoRA layer, and every other trainable parameter."""
    lora_layers = trainable_lora_layers(model)
    lora_parameters = {
        id(parameter)
        for _, layer, adapter in lora_layers
        for parameter in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)
    }
    found: list[Anchor] = [LoraAnchor(name, layer, adapter) for name, layer, adapter in lora_layers]
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and id(parameter) not in lora_parameters:
            found.append(ParameterAnchor(name, parameter, parameter.detach().clone()))
    return found


def diagonal_fisher(
    model: torch.nn.Module, targets: list[torch.Tensor], examples: list[dict], objective: ObjectiveSpec,
    settings: ObjectiveSettings | None, pad_id: int, device: torch.device,
) -> list[torch.Tensor]:
    """Empirical diagonal Fisher F = mean_n (d loss_n / d theta)^2 for each target tensor.

    loss_n is the objective's mean loss on old example n, one example per backward pass: squared
    per-example gradients, as EWC's Fisher is defined (Kirkpatrick et al. 2017), not the square
    of a batch's mean gradient. Computed in eval mode (no dropout), in float32.
    """
    was_training = model.training
    needed_grad = [target.requires_grad for target in targets]
    for target in targets:
        target.requires_grad_(True)  # LoRA: W is frozen, but its Fisher is what EWC weighs the update by
    fisher = [torch.zeros_like(target, dtype=torch.float32) for target in targets]
    used = 0
    model.eval()
    try:
        for example in examples:
            batch = {
                key: value.to(device) if isinstance(value, torch.Tensor) else value
                for key, value in objective.collate([example], pad_id).items()
            }
            output = objective.loss(model, batch, settings)
            if output.num_loss_tokens == 0:
                continue
            gradients = torch.autograd.grad(output.loss_sum / output.num_loss_tokens, targets, allow_unused=True)
            for total, gradient in zip(fisher, gradients, strict=True):
                if gradient is not None:
                    total += gradient.float() ** 2
            used += 1
    finally:
        for target, needed in zip(targets, needed_grad, strict=True):
            target.requires_grad_(needed)
        model.train(was_training)
    if used == 0:
        raise ConfigError("continual.regularizer: ewc found no old example with loss tokens to compute the Fisher")
    return [total / used for total in fisher]


class AnchorPenalty:
    """(weight / 2) * sum over anchors of importance * drift^2; importance 1 is L2-SP, the Fisher is EWC."""

    def __init__(self, anchored: list[Anchor], weight: float, importance: list[torch.Tensor] | None = None):
        self.anchored = anchored
        self.weight = weight
        self.importance = importance

    def after_sharding(self, model: torch.nn.Module) -> None:
        """Keep the start values and Fisher of the rows this process holds of each sharded weight (those of
        a weight left whole go with it to its device: a sharded run sets up on the host)."""
        for index, anchor in enumerate(self.anchored):
            held = anchor.bind_shards(model)
            if self.importance is None:
                continue
            if held is not None:
                self.importance[index] = rows_held(self.importance[index], held)
            else:
                self.importance[index] = self.importance[index].to(anchor.fisher_target.device)

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        whole_terms, held_terms = [], []
        for index, anchor in enumerate(self.anchored):
            squared = anchor.drift().float() ** 2
            if self.importance is not None:
                squared = squared * self.importance[index]
            (held_terms if anchor.sharded else whole_terms).append(squared.sum())
        share = sum(whole_terms, torch.zeros(())) / rank_and_world()[1] + sum(held_terms, torch.zeros(()))
        return 0.5 * self.weight * share


def build_l2sp(setup: PenaltySetup) -> Penalty:
    anchored = anchors(setup.model)
    if not anchored:
        raise ConfigError("continual.regularizer: l2sp found no trainable weight to hold")
    return AnchorPenalty(anchored, setup.weight)


def build_ewc(setup: PenaltySetup) -> Penalty:
    if setup.objective.reference is not None:
        raise ConfigError(
            f"continual.regularizer: ewc needs a loss of the model alone; task {setup.objective.name} also needs "
            "a reference model. Use l2sp, or replay"
        )
    anchored = anchors(setup.model)
    if not anchored:
        raise ConfigError("continual.regularizer: ewc found no trainable weight to hold")
    fisher = diagonal_fisher(
        setup.model, [anchor.fisher_target for anchor in anchored], setup.old_examples(setup.fisher_examples),
        setup.objective, setup.objective_settings, setup.pad_id, setup.device,
    )
    return AnchorPenalty(anchored, setup.weight, fisher)


# --- O-LoRA -----------------------------------------------------------------------------------------


def previous_lora_subspaces(from_run: Path) -> dict[str, torch.Tensor]:
    """Module name -> the LoRA A matrices of every LoRA run in the from_run chain, stacked (R, in).

    Read from the runs' adapter files, whether their adapters were later merged or kept. Keys are
    peft's saved names without the adapter name (`...q_proj.lora_A.weight`), which are the module
    names in this run's peft model plus `.lora_A.weight`.
    """
    from tunesmith.models import read_run

    subspaces: dict[str, list[torch.Tensor]] = {}
    run_dir: Path | None = from_run
    while run_dir is not None:
        run = read_run(run_dir)
        weights = run.weights_dir / "adapter_model.safetensors"
        if run.is_adapter and run.method == "lora" and weights.is_file():
            for key, tensor in load_file(weights).items():
                if key.endswith(".lora_A.weight"):
                    subspaces.setdefault(key.removesuffix(".lora_A.weight"), []).append(tensor.float())
        run_dir = run.from_run
    return {name: torch.cat(parts, dim=0) for name, parts in subspaces.items()}


class OrthogonalSubspacePenalty:
    """weight * sum over layers of |A_old A_new^T|, summed over entries (O-LoRA's L_orth)."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.nn.Parameter]], weight: float,
                 names: list[str] | None = None):
        self.pairs = pairs  # (A_old (R, in) frozen, A_new (r, in) trainable) per layer
        self.weight = weight
        self.names = names  # each A_new's parameter name, to follow it into FSDP's sharded parameter

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        # Each (R, r) before the sum, from the whole A on every process: each counts 1/processes.
        overlaps = [(old @ full_tensor(new, sum_gradients=True).float().T).abs().sum() for old, new in self.pairs]
        return self.weight * torch.stack(overlaps).sum() / rank_and_world()[1]

    def after_sharding(self, model: torch.nn.Module) -> None:
        """Follow each new A into FSDP's parameter; the old subspaces go to the device it is gathered on."""
        pairs = []
        for (old, _), name in zip(self.pairs, self.names, strict=True):
            new = model.get_parameter(name)
            device = torch.device(new.device_mesh.device_type) if isinstance(new, DTensor) else new.device
            pairs.append((old.to(device), new))
        self.pairs = pairs


def build_olora(setup: PenaltySetup) -> Penalty:
    if setup.from_run is None:
        raise ConfigError("continual.regularizer: olora needs model.from_run, a LoRA run whose subspace to avoid")
    old = previous_lora_subspaces(setup.from_run)
    pairs, names = [], []
    for name, layer, adapter in trainable_lora_layers(setup.model):
        if name in old:
            new = layer.lora_A[adapter].weight  # (r, in)
            pairs.append((old[name].to(new.device), new))
            names.append(f"{name}.lora_A.{adapter}.weight")
    if not pairs:
        raise ConfigError(
            f"continual.regularizer: olora found no layer with LoRA both in {setup.from_run}'s chain and in this "
            "run; use method.name: lora with the previous run's target_modules"
        )
    return OrthogonalSubspacePenalty(pairs, setup.weight, names)


register(RegularizerSpec("l2sp", build_l2sp))
register(RegularizerSpec("ewc", build_ewc))
register(RegularizerSpec("olora", build_olora))
