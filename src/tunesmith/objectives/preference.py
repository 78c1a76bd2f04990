"""Preference optimisation: dpo (sigmoid, ipo, hinge, robust), simpo, orpo and kto, as registered objectives.

Every objective here scores a response by its summed (or length-averaged) log-probability under the
policy, `log pi(y|x)`, over the response tokens only (the data layer's assistant-only labels). Each
loss variant is a named function in `PAIRWISE_LOSSES` (for `dpo: {loss: ...}`) or its own objective,
with the paper it comes from; departures from the paper are flagged where they are made.

Normalisation: `loss` returns the SUM over pairs (kto: over examples) and the pair count, so the loop
divides by the pairs of the whole optimiser step (batch 8 x 1 == batch 2 x 4). Metrics are summed over
pairs as well: reward_accuracy, chosen_reward, rejected_reward, reward_margin, chosen_logps,
rejected_logps (dpo's rewards are beta * log(pi / pi_ref); simpo and orpo report their own implicit
rewards, as trl does).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from tunesmith.data.collate import IGNORE_INDEX, shift_labels
from tunesmith.objectives.base import (
    OBJECTIVES,
    LossOutput,
    ObjectiveSettings,
    ObjectiveSpec,
    loss_eval_sums,
    mean_metrics,
    register,
)
from tunesmith.objectives.branched_rows import BEGINNING, branched_row_hidden, branched_rows_pay
from tunesmith.objectives.causal_lm import (
    _can_skip_unused_logits,
    _language_model,
    loss_position_hidden,
    loss_position_logits,
    row_cross_entropy_sums,
)
from tunesmith.registry import Registry

# --- batches --------------------------------------------------------------------------------------------


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    longest = max(len(row) for row in rows)
    out = torch.full((len(rows), longest), value, dtype=torch.long)  # (B, T)
    for index, row in enumerate(rows):
        out[index, : len(row)] = torch.tensor(row)
    return out


def collate_pairs(examples: list[dict], pad_id: int) -> dict:
    """Chosen rows then rejected rows in ONE right-padded batch (2B, T), so a pair costs one forward.

    `num_loss_tokens` counts PAIRS: the loop divides the step's summed loss by it.
    """
    ids = [example["input_ids"] for example in examples] + [example["rejected_input_ids"] for example in examples]
    labels = [example["labels"] for example in examples] + [example["rejected_labels"] for example in examples]
    input_ids = _pad(ids, pad_id)  # (2B, T)
    attention_mask = _pad([[1] * len(row) for row in ids], 0)  # (2B, T)
    targets = _pad([shift_labels(row) for row in labels], IGNORE_INDEX)  # (2B, T)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "targets": targets,
        "num_loss_tokens": len(examples),
        "num_tokens": int(attention_mask.sum()),
        **cached_reference(examples),
    }


def collate_unpaired(examples: list[dict], pad_id: int) -> dict:
    """kto: one response per row (B, T) and whether it is desirable (B,); counts examples."""
    input_ids = _pad([example["input_ids"] for example in examples], pad_id)  # (B, T)
    attention_mask = _pad([[1] * len(example["input_ids"]) for example in examples], 0)  # (B, T)
    targets = _pad([shift_labels(example["labels"]) for example in examples], IGNORE_INDEX)  # (B, T)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "targets": targets,
        "desirable": torch.tensor([example["desirable"] for example in examples], dtype=torch.bool),  # (B,)
        "num_loss_tokens": len(examples),
        "num_tokens": int(attention_mask.sum()),
        **cached_reference(examples),
    }


# --- log-probabilities of responses ------------------------------------------------------------------------


def sequence_logps(
    model: torch.nn.Module, batch: dict, chunk_tokens: int | None = None, paired: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log pi(y|x) over each row's response tokens (R,) in float32, and the response lengths (R,).

    Only response positions reach the output head: the (R, T, V) logits are the largest activation of
    a small model and most positions are prompt. Each row's sum is sft's chunked cross-entropy over that
    row's positions (`row_cross_entropy_sums`), so with `chunk_tokens` the head and its log-softmax run on at
    most chunk_tokens positions at a time: the (N, V) float32 logits of all chosen and rejected responses
    never exist at once (a row no longer than chunk_tokens is one piece), and no row holds a gradient of a
    trained head's weights of its own. Without gradients the rows are still computed one at a time. A `paired`
    batch (collate_pairs) runs each pair as one row, its common beginning once, where that costs fewer FLOPs
    (`pair_row_hidden`).
    """
    targets = batch["targets"]  # (R, T)
    has_target = targets != IGNORE_INDEX  # (R, T)
    lengths = has_target.sum(-1)  # (R,)
    if not _can_skip_unused_logits(model):  # prompt learning, soft-capped heads: the full forward
        logits, flat_targets = loss_position_logits(model, batch)  # (N, V), (N,)
        token_logps = -F.cross_entropy(logits, flat_targets, reduction="none")  # (N,)
        rows = has_target.nonzero()[:, 0]  # (N,) the row of each target token
        logps = torch.zeros(len(lengths), device=token_logps.device).index_add(0, rows, token_logps)  # (R,)
        return logps, lengths.float()
    hidden = pair_row_hidden(model, batch, *has_target.nonzero(as_tuple=True)) if paired else None  # (N, H)
    if hidden is None:
        hidden, head = loss_position_hidden(model, batch)  # (N, H), row after row
    else:
        head = _language_model(model).get_output_embeddings()
    logps = -row_cross_entropy_sums(hidden, head, targets[has_target], lengths.tolist(), chunk_tokens)  # (R,)
    return logps, lengths.float()


def pair_row_hidden(
    model: torch.nn.Module, batch: dict, rows: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor | None:
    """Final hidden states (N, H) at positions `tokens` (N,) of rows `rows` (N,) of a pair batch (chosen rows,
    then rejected: collate_pairs), each pair's common beginning (its prompt, and any first response tokens both
    sides share) run once: B rows of S + (Lc - S) + (Lr - S) positions instead of 2B rows of max(L)
    (objectives/branched_rows.py). None where that layout does not pay (`branched_rows_pay`: long rows of a small
    model, where attention is most of the work; attention kernels that take no custom mask; sliding windows).

    Each pair is one row: the common beginning, the rest of the chosen side, the rest of the rejected side (its
    positions numbered on from S); the rejected side's tokens do not see the chosen side's
    (tests/test_preference_chunked.py, tests/test_preference_training.py).
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # (2B, T)
    pairs, width = input_ids.shape[0] // 2, input_ids.shape[1]
    chosen_lengths, rejected_lengths = attention_mask.sum(-1).chunk(2)  # (B,) right-padded rows
    both = torch.arange(width, device=input_ids.device) < torch.minimum(chosen_lengths, rejected_lengths)[:, None]
    alike = (input_ids[:pairs] == input_ids[pairs:]) & both  # (B, T)
    shared = alike.long().cumprod(-1).sum(-1)  # (B,) S, the common beginning's length
    row_lengths = chosen_lengths + rejected_lengths - shared  # (B,)
    row_width = int(row_lengths.max())
    if not branched_rows_pay(model, pairs, row_width, 2 * pairs, width):  # a row may be up to twice as long
        return None

    column = torch.arange(row_width, device=input_ids.device)[None, :]  # (1, W)
    chosen_part = column < chosen_lengths[:, None]  # (B, W) the common beginning and the chosen side's rest
    in_row = column < row_lengths[:, None]  # (B, W) then the rejected side's rest, then padding
    pair = torch.arange(pairs, device=input_ids.device)[:, None]  # (B, 1)
    source_row = torch.where(chosen_part, pair, pair + pairs)  # (B, W) the batch row each token comes from
    positions = torch.where(chosen_part, column, column - chosen_lengths[:, None] + shared[:, None])
    positions = torch.where(in_row, positions, 0)  # (B, W) the token's position in its own side
    branch = torch.where(column < shared[:, None], BEGINNING, torch.where(chosen_part, 1, 2))  # (B, W)
    hidden = branched_row_hidden(model, input_ids[source_row, positions], positions, branch, row_lengths)

    row_pair, rejected = rows % pairs, rows >= pairs  # (N,) each
    past_common = tokens - shared[row_pair]
    pair_column = torch.where(rejected & (past_common >= 0), chosen_lengths[row_pair] + past_common, tokens)
    return hidden[row_pair, pair_column]  # (N, H)


def pair_logps(model: torch.nn.Module, batch: dict, chunk_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """policy_chosen_logps, policy_rejected_logps (B,) and the response lengths of both sides (B,)."""
    logps, lengths = sequence_logps(model, batch, chunk_tokens, paired=True)
    chosen_logps, rejected_logps = logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    return {
        "policy_chosen_logps": chosen_logps,
        "policy_rejected_logps": rejected_logps,
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
    }


def reference_pair_logps(reference_model: torch.nn.Module, batch: dict, settings) -> dict[str, torch.Tensor]:
    """The loop runs this on the reference (adapters disabled, or a frozen copy) without gradients, so no
    logits are kept for a backward pass and `loss_chunk_tokens` does not apply."""
    logps, _ = sequence_logps(reference_model, batch, paired=True)
    chosen, rejected = logps.chunk(2)
    return {"reference_chosen_logps": chosen, "reference_rejected_logps": rejected}


def reference_logps(reference_model: torch.nn.Module, batch: dict, settings) -> dict[str, torch.Tensor]:
    logps, _ = sequence_logps(reference_model, batch)
    return {"reference_logps": logps}


# --- reference log-probs cached in one pass (full fine-tuning without a frozen copy) ------------------------


def cached_reference(examples: list[dict]) -> dict[str, torch.Tensor]:
    """The reference outputs `cache_reference_outputs` stored on the examples, as (B,) tensors; {} if none."""
    keys = [key for key in examples[0] if key.startswith("reference_")]
    return {key: torch.tensor([example[key] for example in examples], dtype=torch.float32) for key in keys}


@torch.no_grad()
def cache_reference_outputs(
    objective, reference_model: torch.nn.Module, examples: list[dict], settings, pad_id: int, batch_size: int,
    device: torch.device | str = "cpu",
) -> None:
    """Run `objective.reference` once over `examples` and store each example's outputs on it (keyed by name).

    The reference of dpo and kto depends only on the example (log pi_ref(y|x) per response), so one
    pass before the first optimiser step replaces the frozen model copy that full fine-tuning would
    otherwise hold: 2 floats per pair instead of a second set of weights, and one reference forward
    per example instead of one per example per epoch. The collate functions then put the cached
    values in each batch under the same names the losses read. Call it on the model as it starts
    (before any step or resume), like `ReferenceModel`. Values are float32, as computed; a row's
    log-prob differs from the per-batch computation only by float noise from the other rows' padding.
    """
    from tunesmith.data.collate import eval_batches

    was_training = reference_model.training
    reference_model.eval()  # no dropout: the reference is the deterministic starting policy
    # A peft model's reference is its base, as in `ReferenceModel` (PiSSA / OLoRA adapters do not start at zero).
    adapters_off = reference_model.disable_adapter() if hasattr(reference_model, "disable_adapter") else nullcontext()
    try:
        with adapters_off:
            for indices in eval_batches([len(example["input_ids"]) for example in examples], batch_size):
                chunk = [examples[index] for index in indices]
                batch = objective.collate([{key: value for key, value in example.items()
                                            if not key.startswith("reference_")} for example in chunk], pad_id)
                batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                         for key, value in batch.items()}
                for key, values in objective.reference(reference_model, batch, settings).items():
                    if values.shape != (len(chunk),):
                        raise ValueError(f"task {objective.name}: reference output {key!r} has shape "
                                         f"{tuple(values.shape)}, not one value per example; it cannot be cached")
                    for example, value in zip(chunk, values.float().tolist(), strict=True):
                        example[key] = value
    finally:
        reference_model.train(was_training)


def reference_cache_hook(task: str) -> Callable[[torch.nn.Module, list[dict], ReferenceSettings], None]:
    """The `cache_reference` hook of `task` (the loop's `train.cache_reference`): `cache_reference_outputs`
    on the reference's device. Padding is masked out of every log-prob, so any valid token id pads (0)."""

    def cache(reference_model: torch.nn.Module, examples: list[dict], settings: ReferenceSettings) -> None:
        device = next(reference_model.parameters()).device
        cache_reference_outputs(OBJECTIVES.get(task), reference_model, examples, settings, pad_id=0,
                                batch_size=settings.reference_batch_size, device=device)

    return cache


# --- the pairwise losses ------------------------------------------------------------------------------------


@dataclass
class PairLoss:
    losses: torch.Tensor
    """(B,) per-pair loss."""
    chosen_rewards: torch.Tensor
    """(B,) implicit reward of the chosen response (detached)."""
    rejected_rewards: torch.Tensor


PairLossFunction = Callable[[dict[str, torch.Tensor], "ObjectiveSettings"], PairLoss]
PAIRWISE_LOSSES: Registry[PairLossFunction] = Registry("dpo loss")


def register_pairwise_loss(name: str):
    def decorate(function: PairLossFunction) -> PairLossFunction:
        return PAIRWISE_LOSSES.register(name, function)

    return decorate


def _dpo_rewards(logps: dict[str, torch.Tensor], beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """beta * log(pi/pi_ref) of each side (B,): DPO's implicit reward (Rafailov et al. 2023, eq. 5)."""
    chosen = beta * (logps["policy_chosen_logps"] - logps["reference_chosen_logps"])
    rejected = beta * (logps["policy_rejected_logps"] - logps["reference_rejected_logps"])
    return chosen, rejected


@register_pairwise_loss("sigmoid")
def dpo_sigmoid_loss(logps: dict[str, torch.Tensor], settings) -> PairLoss:
    """DPO, Rafailov et al. 2023, "Direct Preference Optimization", eq. 7:
    -log sigma(beta * [log pi/pi_ref (y_w) - log pi/pi_ref (y_l)])."""
    chosen, rejected = _dpo_rewards(logps, settings.beta)
    return PairLoss(-F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach())


@register_pairwise_loss("robust")
def dpo_robust_loss(logps: dict[str, torch.Tensor], settings) -> PairLoss:
    """Robust DPO, Chowdhury et al. 2024, "Provably Robust DPO", eq. 8: an unbiased loss when a fraction
    eps = label_smoothing of the labels is flipped. (Mitchell's cDPO note uses the biased mixture
    -(1-eps) log sigma(h) - eps log sigma(-h); this is the rDPO form trl's `robust` implements.)"""
    chosen, rejected = _dpo_rewards(logps, settings.beta)
    margin = chosen - rejected  # (B,)
    eps = settings.label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(margin) + eps * F.logsigmoid(-margin)) / (1 - 2 * eps)
    return PairLoss(losses, chosen.detach(), rejected.detach())


@register_pairwise_loss("hinge")
def dpo_hinge_loss(logps: dict[str, torch.Tensor], settings) -> PairLoss:
    """SLiC-HF, Zhao et al. 2023, eq. 2 with delta = 1, on the DPO log-ratios (the `hinge` of trl):
    max(0, 1 - beta * [log pi/pi_ref (y_w) - log pi/pi_ref (y_l)])."""
    chosen, rejected = _dpo_rewards(logps, settings.beta)
    return PairLoss(torch.relu(1 - (chosen - rejected)), chosen.detach(), rejected.detach())


@register_pairwise_loss("ipo")
def dpo_ipo_loss(logps: dict[str, torch.Tensor], settings) -> PairLoss:
    """IPO, Azar et al. 2023, "A General Theoretical Paradigm...", eq. 17: (h - 1/(2 tau))^2 with tau = beta.

    Departure from the paper's notation: h uses log-ratios AVERAGED over response tokens, not summed;
    summed log-probs make the squared loss scale with length. trl does the same and reports that the
    IPO authors confirmed the paper's results use this normalised form.
    """
    chosen_ratio = (logps["policy_chosen_logps"] - logps["reference_chosen_logps"]) / logps["chosen_lengths"].clamp(
        min=1)
    rejected_ratio = (logps["policy_rejected_logps"] - logps["reference_rejected_logps"]) / logps[
        "rejected_lengths"].clamp(min=1)
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * settings.beta)) ** 2
    chosen, rejected = _dpo_rewards(logps, settings.beta)  # logged on the usual DPO scale
    return PairLoss(losses, chosen.detach(), rejected.detach())


def simpo_loss(logps: dict[str, torch.Tensor], settings) -> PairLoss:
    """SimPO, Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6:
    -log sigma(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma). No reference model."""
    chosen = settings.beta * logps["policy_chosen_logps"] / logps["chosen_lengths"].clamp(min=1)
    rejected = settings.beta * logps["policy_rejected_logps"] / logps["rejected_lengths"].clamp(min=1)
    return PairLoss(-F.logsigmoid(chosen - rejected - settings.gamma), chosen.detach(), rejected.detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_odds_ratio_term(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor) -> torch.Tensor:
    """log sigma(log odds(y_w) - log odds(y_l)) (B,), ORPO eqs. 4 and 7, with odds(y) = P / (1 - P) and
    P = exp(mean token log-prob)."""
    log_odds = (chosen_mean_logps - rejected_mean_logps) - (log1mexp(chosen_mean_logps) - log1mexp(rejected_mean_logps))
    return F.logsigmoid(log_odds)


def orpo_loss(logps: dict[str, torch.Tensor], settings) -> PairLoss:
    """ORPO, Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", eq. 6:
    L_SFT(y_w) - lambda * log sigma(log odds ratio). Both use length-averaged log-probs (eq. 3)."""
    chosen_mean = logps["policy_chosen_logps"] / logps["chosen_lengths"].clamp(min=1)  # (B,)
    rejected_mean = logps["policy_rejected_logps"] / logps["rejected_lengths"].clamp(min=1)  # (B,)
    losses = -chosen_mean - settings.beta * orpo_odds_ratio_term(chosen_mean, rejected_mean)
    return PairLoss(losses, settings.beta * chosen_mean.detach(), settings.beta * rejected_mean.detach())


# --- settings -------------------------------------------------------------------------------------------------


class ResponseLogpSettings(ObjectiveSettings):
    """What every objective that scores responses by log pi(y|x) shares."""

    loss_chunk_tokens: int | None = Field(
        128,
        ge=1,
        description="Run the output head over chunks of this many response positions of a row, recomputing "
        "their logits in the backward pass, so the (N, V) float32 logits never exist at once (exact). "
        "null: all positions of a row in one piece.",
    )


class ReferenceSettings(ResponseLogpSettings):
    """Objectives whose reference is per example (dpo, kto), so `train.cache_reference` can store it."""

    reference_batch_size: int = Field(
        8, ge=1, description="train.cache_reference: examples per reference forward in the one pass before training."
    )


class DPOSettings(ReferenceSettings):
    beta: float = Field(0.1, gt=0, description="KL strength beta (Rafailov et al. 2023 use 0.1); tau for ipo.")
    loss: str = Field("sigmoid", description="Loss variant: sigmoid (DPO), ipo, hinge (SLiC), robust (rDPO).")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="robust: assumed fraction of flipped preference labels."
    )

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, loss: str) -> str:
        return PAIRWISE_LOSSES.known(loss)

    @model_validator(mode="after")
    def _smoothing_needs_robust(self):
        if self.label_smoothing and self.loss != "robust":
            raise ValueError("label_smoothing applies to loss: robust only")
        return self


class SimPOSettings(ResponseLogpSettings):
    beta: float = Field(2.0, gt=0, description="Reward scale beta (SimPO paper: 2.0 to 2.5).")
    gamma: float = Field(1.0, ge=0, description="Target reward margin gamma (paper: gamma / beta about 0.5).")


class ORPOSettings(ResponseLogpSettings):
    beta: float = Field(0.1, gt=0, description="Weight lambda of the odds-ratio term (ORPO paper: 0.1).")


class KTOSettings(ReferenceSettings):
    beta: float = Field(0.1, gt=0, description="Risk aversion beta (KTO paper: 0.1).")
    desirable_weight: float = Field(1.0, gt=0, description="lambda_D, weight of desirable examples.")
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U, weight of undesirable examples.")


# --- pairwise objectives --------------------------------------------------------------------------------------


def _pair_metrics(logps: dict[str, torch.Tensor], result: PairLoss) -> dict[str, torch.Tensor]:
    """Metrics summed over pairs (the loop divides by the pair count)."""
    margin = result.chosen_rewards - result.rejected_rewards
    return {
        "reward_accuracy": (margin > 0).float().sum(),
        "chosen_reward": result.chosen_rewards.sum(),
        "rejected_reward": result.rejected_rewards.sum(),
        "reward_margin": margin.sum(),
        "chosen_logps": logps["policy_chosen_logps"].detach().sum(),
        "rejected_logps": logps["policy_rejected_logps"].detach().sum(),
    }


def pairwise_loss(loss_function: Callable[[dict, ObjectiveSettings], PairLoss]):
    """The `loss` of a pairwise objective built on `loss_function(logps, settings)`."""

    def loss(model: torch.nn.Module, batch: dict, settings) -> LossOutput:
        references = {key: value for key, value in batch.items() if "reference_" in key}
        logps = {**pair_logps(model, batch, settings.loss_chunk_tokens), **references}
        result = loss_function(logps, settings)
        return LossOutput(result.losses.sum(), batch["num_loss_tokens"], _pair_metrics(logps, result))

    return loss


def pair_means(totals: dict) -> dict[str, float]:
    """A pairwise objective's evaluation: its loss and metrics as means over the pairs."""
    return mean_metrics(totals, "eval_pairs")


def dpo_loss_function(logps: dict, settings: DPOSettings) -> PairLoss:
    return PAIRWISE_LOSSES.get(settings.loss, "objective.loss")(logps, settings)


_dpo_loss = pairwise_loss(dpo_loss_function)
register(ObjectiveSpec(
    name="dpo", model_kind="causal_lm", collate=collate_pairs, loss=_dpo_loss,
    eval_sums=loss_eval_sums(_dpo_loss), eval_metrics=pair_means,
    settings=DPOSettings, reference=reference_pair_logps, cache_reference=reference_cache_hook("dpo"),
    rows_independent=True,
))
_simpo_loss = pairwise_loss(simpo_loss)
register(ObjectiveSpec(
    name="simpo", model_kind="causal_lm", collate=collate_pairs, loss=_simpo_loss,
    eval_sums=loss_eval_sums(_simpo_loss), eval_metrics=pair_means,
    settings=SimPOSettings, rows_independent=True,
))
_orpo_loss = pairwise_loss(orpo_loss)
register(ObjectiveSpec(
    name="orpo", model_kind="causal_lm", collate=collate_pairs, loss=_orpo_loss,
    eval_sums=loss_eval_sums(_orpo_loss), eval_metrics=pair_means,
    settings=ORPOSettings, rows_independent=True,
))


# --- kto: unpaired ----------------------------------------------------------------------------------------------


def kto_losses(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
    settings: KTOSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example KTO loss (B,) and reward beta * log(pi/pi_ref) (B,); Ethayarajh et al. 2024,
    "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8:
    desirable:   lambda_D (1 - sigma(beta (r - z0)));  undesirable: lambda_U (1 - sigma(beta (z0 - r))),
    with r = log pi/pi_ref (y|x) and z0 the reference point `kl` (detached)."""
    logratios = policy_logps - reference_logps  # (B,)
    desirable_losses = settings.desirable_weight * (1 - torch.sigmoid(settings.beta * (logratios - kl)))
    undesirable_losses = settings.undesirable_weight * (1 - torch.sigmoid(settings.beta * (kl - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return losses, settings.beta * logratios.detach()


def kto_reference_point(policy_logps: torch.Tensor, reference_logps: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, mean log pi/pi_ref) over the batch's responses, detached.

    Departure from the paper: KTO (sec. 4.2) estimates KL(pi || pi_ref) on MISMATCHED pairs (x_i, y_j),
    which costs a second forward of every batch. We use the batch's own responses, which needs no extra
    pass; z0 is a detached baseline that only shifts where the sigmoid saturates.
    """
    return (policy_logps - reference_logps).detach().mean().clamp(min=0)


def kto_loss(model: torch.nn.Module, batch: dict, settings: KTOSettings) -> LossOutput:
    policy_logps, _ = sequence_logps(model, batch, settings.loss_chunk_tokens)  # (B,)
    reference = batch["reference_logps"]  # (B,)
    kl = kto_reference_point(policy_logps, reference)
    losses, rewards = kto_losses(policy_logps, reference, batch["desirable"], kl, settings)
    desirable = batch["desirable"].float()
    metrics = {
        # A desirable response should get a positive reward, an undesirable one a negative reward.
        "reward_accuracy": ((rewards > 0).float() * desirable + (rewards < 0).float() * (1 - desirable)).sum(),
        "chosen_reward": (rewards * desirable).sum(),
        "rejected_reward": (rewards * (1 - desirable)).sum(),
        "chosen_logps": (policy_logps.detach() * desirable).sum(),
        "rejected_logps": (policy_logps.detach() * (1 - desirable)).sum(),
        "desirable": desirable.sum(),
        "kl": kl * len(losses),
    }
    return LossOutput(losses.sum(), batch["num_loss_tokens"], metrics)


def kto_metrics(totals: dict) -> dict[str, float]:
    """kto's evaluation: rewards and log-probs as means over the desirable or the undesirable examples, the rest
    over all."""
    totals = {name: float(value) for name, value in totals.items()}
    examples = int(totals.get("count", 0))
    desirable = totals.get("desirable", 0.0)
    undesirable = examples - desirable
    metrics = {
        "eval_loss": totals.get("eval_loss", 0.0) / max(examples, 1),
        "reward_accuracy": totals.get("reward_accuracy", 0.0) / max(examples, 1),
        "chosen_reward": totals.get("chosen_reward", 0.0) / max(desirable, 1),
        "rejected_reward": totals.get("rejected_reward", 0.0) / max(undesirable, 1),
        "chosen_logps": totals.get("chosen_logps", 0.0) / max(desirable, 1),
        "rejected_logps": totals.get("rejected_logps", 0.0) / max(undesirable, 1),
        "kl": totals.get("kl", 0.0) / max(examples, 1),
        "eval_examples": examples,
    }
    metrics["reward_margin"] = metrics["chosen_reward"] - metrics["rejected_reward"]
    return metrics


register(ObjectiveSpec(
    name="kto", model_kind="causal_lm", collate=collate_unpaired, loss=kto_loss,
    eval_sums=loss_eval_sums(kto_loss), eval_metrics=kto_metrics,
    settings=KTOSettings, reference=reference_logps, cache_reference=reference_cache_hook("kto"),
))
