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
    eval_sums: Callable[[torch.nn.Module, dict, Any], dict[str, Any]]
    """eval_sums(model, batch, settings) -> one evaluation batch's totals by name (0-dim tensors, numbers, or lists
    such as predictions), chosen so that any set of batches' totals are their sum (lists concatenate): a data
    mixture's metrics, overall and each task's, come from one pass over its records (training/loop.py `evaluate`)."""
    eval_metrics: Callable[[dict[str, Any]], dict[str, float]]
    """eval_metrics(totals) -> metrics by name from the totals of any set of batches (none: empty totals); always
    includes `eval_loss`."""
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


def add_sums(totals: dict[str, Any], sums: dict[str, Any]) -> dict[str, Any]:
    """`totals` with one batch's `sums` added: tensors and numbers add, lists concatenate."""
    merged = dict(totals)
    for name, value in sums.items():
        merged[name] = merged[name] + value if name in merged else value
    return merged


def loss_eval_sums(loss: Callable[[torch.nn.Module, dict, Any], LossOutput]):
    """`eval_sums` from an objective's `loss`: its summed loss as `eval_loss`, its summed metrics, and their term
    count as `count` (for objectives whose metrics are means over pairs or examples)."""

    def eval_sums(model: torch.nn.Module, batch: dict, settings) -> dict:
        output = loss(model, batch, settings)
        return {"eval_loss": output.loss_sum, **output.metrics, "count": output.num_loss_tokens}

    return eval_sums


def mean_metrics(totals: dict[str, Any], count_name: str) -> dict[str, float]:
    """`loss_eval_sums` totals as means over their count, which is reported as `count_name`."""
    count = totals.get("count", 0)
    means = {name: float(value) / max(count, 1) for name, value in totals.items() if name != "count"}
    return {"eval_loss": 0.0, **means, count_name: count}


@torch.no_grad()
def evaluation_totals(objective: ObjectiveSpec, model: torch.nn.Module, batches: Iterable[dict], settings) -> dict:
    """The sum of the objective's `eval_sums` over `batches`."""
    totals: dict[str, Any] = {}
    for batch in batches:
        totals = add_sums(totals, objective.eval_sums(model, batch, settings))
    return totals


def evaluate(objective: ObjectiveSpec, model: torch.nn.Module, batches: Iterable[dict], settings) -> dict[str, float]:
    """The objective's metrics over `batches`."""
    return objective.eval_metrics(evaluation_totals(objective, model, batches, settings))
