"""The objective contract: how examples become a batch and what a batch's loss is.

`loss(model, batch)` returns the SUM of per-token (or per-example) losses and how many there
were; the loop divides by the total count of the whole optimiser step, so that batch 8 x
accumulation 1 and batch 2 x accumulation 4 give the same gradient (the mean-of-means bug that
transformers, trl and unsloth shipped). An objective never normalises on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from tunesmith.registry import Registry

if TYPE_CHECKING:
    from tunesmith.training.reference import ReferenceModel


@dataclass
class LossOutput:
    loss_sum: torch.Tensor
    """Summed loss over the batch's loss tokens (0-dim, differentiable)."""
    num_loss_tokens: int
    """How many terms `loss_sum` adds up (tokens for LMs, examples for classification)."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Extra summed quantities to log, divided by num_loss_tokens by the loop."""


class ObjectiveSettings(BaseModel):
    """Base of every objective's settings (the `objective:` config section); sft and classify have none."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    model_kind: Literal["causal_lm", "sequence_classification"]
    collate: Callable[[list[dict], int], dict]
    """collate(examples, pad_id) -> batch of tensors plus `num_loss_tokens` and `num_tokens` ints."""
    loss: Callable[[torch.nn.Module, dict, Any], LossOutput]
    """loss(model, batch, settings) -> summed loss, its term count, summed metrics."""
    evaluate: Callable[[torch.nn.Module, Iterable[dict], Any], dict[str, float]]
    """evaluate(model, batches, settings) -> metrics by name; always includes `eval_loss`."""
    settings: type[ObjectiveSettings] = ObjectiveSettings
    supports_packing: bool = False
    rows_independent: bool = False
    """The loss is a sum of per-record terms (tokens, examples or pairs), each computed from its own record's
    rows alone, or with reference outputs stored on the record (`train.cache_reference`), never from a
    batch-wide statistic or a rollout: splitting a micro-batch's records into parts and summing the parts'
    losses changes nothing but rounding, so `train.parallel_rows` may run the parts in threads (not while a
    reference model runs per batch)."""
    reference: Callable[[torch.nn.Module, dict, Any], dict[str, torch.Tensor]] | None = None
    """For objectives that compare against the starting model (DPO, KL penalties):
    reference(reference_model, batch, settings) -> tensors added to the batch before `loss`.
    The loop runs it without gradients, in eval mode, on the reference: for a peft model the
    same model with its adapters disabled (no second copy), otherwise a frozen copy."""
    reference_is_starting_model: bool = True
    """False when `reference` brings its own model (distill's teacher): the loop then passes None
    instead of the starting model and keeps no frozen copy of the student."""
    cache_reference: Callable[[Any, list[dict], Any], None] | None = None
    """cache_reference(reference_model, examples, settings): compute the reference outputs of every
    example once and store them on the examples (which `collate` then batches), so that training
    needs neither `reference` per batch nor the reference model. The loop calls it before the first
    step, on train + eval examples, when `train.cache_reference` is set. `reference_model` is the
    reference module; for an objective that brings its own (`shard_reference`), None, or in a sharded
    run a function that loads and shards that model, to be called only if the outputs are not stored
    yet (a large teacher takes minutes to read)."""
    shard_reference: Callable[[Any, Callable[[torch.nn.Module], None]], torch.nn.Module] | None = None
    """For an objective whose `reference` brings its own model (distill's teacher), in a run with FSDP-sharded
    layers: shard_reference(settings, shard) -> that model, loaded on the host and passed to shard(model),
    which shards its decoder layers across the processes and places the rest on the device. The loop then
    passes it to `reference` as the reference model (every process runs it in step). Without the hook each
    process holds that model whole."""
    prepare_model: Callable[[torch.nn.Module, Any], None] | None = None
    """prepare_model(model, settings): add the objective's own trainable modules (a value head) after
    the method is applied and before the optimiser is built."""
    rollout: Callable[[torch.nn.Module, ReferenceModel | None, dict, Any], dict] | None = None
    """For online objectives (grpo, ppo), instead of `reference`: rollout(model, reference, batch,
    settings) -> the batch `loss` learns from. The loop runs it on each training micro-batch before
    `loss`: it samples from the current policy, scores the samples, and runs the reference on them
    (`with reference.active(model) as reference_model`). The reference is handed over whole because
    what it must score exists only after sampling. Evaluation batches do not go through it."""

    @property
    def has_reference(self) -> bool:
        """Whether the loop keeps a reference model (starting policy or teacher) for this objective."""
        return self.reference is not None or self.rollout is not None


OBJECTIVES: Registry[ObjectiveSpec] = Registry("task")


def register(spec: ObjectiveSpec) -> ObjectiveSpec:
    return OBJECTIVES.register(spec.name, spec)


def model_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """The keys of a batch that the model's forward takes."""
    return {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
