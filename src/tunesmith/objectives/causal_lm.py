"""sft and pretrain: next-token cross-entropy on the positions the data layer marked for loss.

sft marks assistant tokens (every assistant turn, and the end-of-turn token after each reply);
pretrain marks every token. Both share this loss; they differ only in how data is tokenised.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GenericForSequenceClassification

from tunesmith.data.collate import IGNORE_INDEX, collate_padded
from tunesmith.models import prompt_learning, unwrapped_model
from tunesmith.objectives.base import LossOutput, ObjectiveSettings, ObjectiveSpec, model_inputs, register
from tunesmith.objectives.linear_cross_entropy import (
    _compute_dtype,
    fusable_head,
    linear_cross_entropy_eval,
    linear_cross_entropy_row_sums,
    linear_cross_entropy_sum,
    softmax_cross_entropy,
    with_known_gradients,
)

_language_model = unwrapped_model
"""The transformers *ForCausalLM under any peft wrapper."""


def rescales_logits(model_config) -> bool:
    """Whether the architecture changes its logits after the output head (Gemma 2 soft-capping, Cohere's
    logit_scale), so they are not a plain head over the final hidden states."""
    return bool(getattr(model_config, "final_logit_softcapping", None) or getattr(model_config, "logit_scale", None))


def _can_skip_unused_logits(model: torch.nn.Module) -> bool:
    """True when logits are plain `lm_head(hidden)`, so we may compute them at loss positions only.

    Prompt-learning peft methods feed virtual tokens through PeftModel.forward, and a few
    architectures rescale logits after the head (Gemma 2 soft-capping, Cohere logit_scale);
    those take the full forward.
    """
    if prompt_learning(model):
        return False
    if rescales_logits(_language_model(model).config):
        return False
    language_model = _language_model(model)
    return hasattr(language_model, language_model.base_model_prefix)


def continues_from_cache(model: torch.nn.Module) -> bool:
    """Whether a forward can continue from another's KV cache in transformers' default dynamic kind: not with
    prefix tuning (its virtual tokens live in the cache) or models that keep caches of other kinds. A decoder's
    classification head (a reward model: transformers' generic one, no `generate`) runs a causal LM's backbone."""
    if prompt_learning(model):
        return False
    language_model = _language_model(model)
    if isinstance(language_model, GenericForSequenceClassification):
        return True
    supports_dynamic_cache = getattr(language_model, "_supports_default_dynamic_cache", None)
    return supports_dynamic_cache is not None and supports_dynamic_cache()


class CausalLMSettings(ObjectiveSettings):
    loss_chunk_tokens: int | None = Field(
        1024,
        ge=1,
        description="Compute the loss over chunks of this many positions, so the (N, V) float32 logits never "
        "exist at once (exact); each chunk's gradients are computed in the forward pass, so no head matmul runs again "
        "in the backward pass. null: one piece.",
    )


def loss_position_hidden(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.nn.Module]:
    """Final hidden states (N, H) at the N positions that have a target, and the output head.

    Only loss positions need logits: with a 49k vocabulary the (B, T, V) logits tensor is the
    largest activation of a small model, and in sft most positions are prompt.
    """
    language_model = _language_model(model)
    backbone = getattr(language_model, language_model.base_model_prefix)
    hidden = backbone(**model_inputs(batch), use_cache=False).last_hidden_state  # (B, T, H)
    return hidden[batch["targets"] != IGNORE_INDEX], language_model.get_output_embeddings()


def loss_position_logits(
    model: torch.nn.Module, batch: dict, float32: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) at the N positions that have a target, in float32 (else in the head's compute dtype), and
    those targets (N,)."""
    targets = batch["targets"]  # (B, T)
    has_target = targets != IGNORE_INDEX  # (B, T)
    if _can_skip_unused_logits(model):
        hidden, head = loss_position_hidden(model, batch)
        logits = head(hidden)  # (N, V)
    else:
        logits = model(**model_inputs(batch), use_cache=False).logits  # (B, P + T, V)
        # Prompt and p-tuning prepend P virtual tokens to the input (prefix tuning puts them in
        # the attention cache instead, P = 0 here); targets are (B, T) for the real tokens only.
        logits = logits[:, logits.shape[1] - targets.shape[1]:][has_target]  # (N, V)
    return logits.float() if float32 else logits, targets[has_target]


def _chunk_cross_entropy_sum(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, weights: torch.Tensor | None = None
) -> torch.Tensor:
    losses = F.cross_entropy(head(hidden).float(), targets, reduction="none")  # (N,)
    return losses.sum() if weights is None else (losses * weights).sum()


class _CompiledLoss(NamedTuple):
    softmax_cross_entropy: Callable  # the fused loss's per-chunk softmax, loss and logit gradient
    chunk_cross_entropy_sum: Callable  # a wrapped head's chunk: head, log-softmax and target pick


_compiled_loss: ContextVar[_CompiledLoss | None] = ContextVar("compiled loss", default=None)


@contextmanager
def compiled_loss_chunks():
    """Inside the block (`train.compile`), each loss chunk's work on the (C, V) logits runs as one compiled graph,
    where eager code passes over them once per operation: for a plain head the fused loss's float32 softmax,
    loss and logit gradient (linear_cross_entropy.py), for a wrapped head the head matmul, log-softmax and
    target pick. One graph serves every chunk length (dynamic shapes: the last chunk of each batch is
    shorter), so nothing is traced again after the first step (tests/test_compile.py)."""
    compiled = _CompiledLoss(torch.compile(softmax_cross_entropy, dynamic=True),
                             torch.compile(_chunk_cross_entropy_sum, dynamic=True))
    token = _compiled_loss.set(compiled)
    try:
        yield
    finally:
        _compiled_loss.reset(token)


def chunked_cross_entropy_sum(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk_tokens: int | None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of cross-entropy over N positions, holding at most chunk_tokens x V logits at a time.

    A plain linear head takes the fused loss (linear_cross_entropy.py), whose softmax gradient is written over
    the logits. A wrapped head (an adapter on the head) runs through autograd a chunk at a time
    (`chunks_with_gradients`). Either way each chunk's gradients are computed in the forward pass, so no head
    matmul runs again in the backward pass.
    """
    compiled = _compiled_loss.get()
    if fusable_head(head):
        chunk_softmax = compiled.softmax_cross_entropy if compiled else softmax_cross_entropy
        return linear_cross_entropy_sum(hidden, head, targets, chunk_tokens, weights, chunk_softmax)
    chunk_loss = compiled.chunk_cross_entropy_sum if compiled else _chunk_cross_entropy_sum

    def loss_of(chunk: torch.Tensor, positions: slice) -> dict[str, torch.Tensor]:
        return {"loss": chunk_loss(chunk, targets[positions], head, None if weights is None else weights[positions])}

    return chunks_with_gradients(hidden, head, chunk_tokens, loss_of)["loss"]


def row_cross_entropy_sums(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, row_sizes: list[int], chunk_tokens: int | None
) -> torch.Tensor:
    """Summed cross-entropy over each row's positions (R,), from hidden states (N, H) and targets (N,) of rows of
    `row_sizes` consecutive positions, holding at most chunk_tokens x V logits at a time.

    A frozen head: each row is `chunked_cross_entropy_sum`, its gradients computed in the forward pass. A trained
    head (full fine-tuning, or an adapter on it): those would hold a gradient of the head's weights per row until
    the backward pass (R x (V, H) float32 for a full head), so the rows' gradients are computed there instead,
    where each row's incoming gradient is known: a plain head through the fused loss in one pass for all rows
    (`linear_cross_entropy_row_sums`), a wrapped one in checkpointed chunks. One more head matmul per chunk.
    """
    compiled = _compiled_loss.get()
    if fusable_head(head):
        chunk_softmax = compiled.softmax_cross_entropy if compiled else softmax_cross_entropy
        return linear_cross_entropy_row_sums(hidden, head, targets, row_sizes, chunk_tokens, chunk_softmax)
    rows = list(zip(hidden.split(row_sizes), targets.split(row_sizes), strict=True))
    if not (torch.is_grad_enabled() and any(parameter.requires_grad for parameter in head.parameters())):
        sums = [chunked_cross_entropy_sum(row_hidden, head, row_targets, chunk_tokens)
                for row_hidden, row_targets in rows]
        return torch.stack(sums) if sums else hidden.new_zeros(0, dtype=torch.float32)
    chunk_loss = compiled.chunk_cross_entropy_sum if compiled else _chunk_cross_entropy_sum
    size = max(chunk_tokens or hidden.shape[0], 1)
    sums = []
    for row_hidden, row_targets in rows:
        row_sum = hidden.new_zeros((), dtype=torch.float32)
        for piece, piece_targets in zip(row_hidden.split(size), row_targets.split(size), strict=True):
            row_sum = row_sum + checkpoint(chunk_loss, piece, piece_targets, head, None, use_reentrant=False)
        sums.append(row_sum)
    return torch.stack(sums) if sums else hidden.new_zeros(0, dtype=torch.float32)


def chunks_with_gradients(
    hidden: torch.Tensor, head: torch.nn.Module, chunk_tokens: int | None,
    terms_of: Callable[[torch.Tensor, slice], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """The terms `terms_of(chunk, positions)` gives for each chunk of `chunk_tokens` of the N positions of `hidden`
    (N, H) (chunk: those rows, (C, H)), summed over the chunks. With gradients to compute, those of the "loss" term
    with respect to `hidden` and to the trained parameters of `head` (which `terms_of` runs) are made chunk by chunk
    in this (forward) pass, so a chunk's logits and what the terms make of them exist for one chunk at a time and
    nothing runs again in the backward pass (a checkpointed chunk ran its head twice); "loss" carries them, the
    other terms are detached. None: one chunk."""
    weights = [parameter for parameter in head.parameters() if parameter.requires_grad]
    gradients_needed = torch.is_grad_enabled() and (hidden.requires_grad or bool(weights))
    grad_hidden = torch.empty_like(hidden) if gradients_needed and hidden.requires_grad else None  # (N, H)
    grad_weights = [torch.zeros_like(weight) for weight in weights] if gradients_needed else []
    size = max(chunk_tokens or hidden.shape[0], 1)
    totals: dict[str, torch.Tensor] = {}
    for start in range(0, max(hidden.shape[0], 1), size):
        positions = slice(start, start + size)
        if not gradients_needed:
            terms = terms_of(hidden[positions], positions)
        else:
            with torch.enable_grad():
                chunk = hidden[positions].detach().requires_grad_(grad_hidden is not None)  # (C, H)
                terms = terms_of(chunk, positions)
                inputs = [chunk] * (grad_hidden is not None) + weights
                gradients = torch.autograd.grad(terms["loss"], inputs, allow_unused=True, materialize_grads=True)
            if grad_hidden is not None:
                grad_hidden[positions], gradients = gradients[0], gradients[1:]
            for total, gradient in zip(grad_weights, gradients, strict=True):
                total += gradient
        totals = {name: totals.get(name, 0) + value.detach() for name, value in terms.items()}
    if gradients_needed:
        totals["loss"] = with_known_gradients(totals["loss"], [hidden, *weights], [grad_hidden, *grad_weights])
    return totals


def _chunk_token_logps(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")  # (C,): log softmax at the target


def chunked_token_logps(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk_tokens: int | None
) -> torch.Tensor:
    """log softmax(head(hidden))[target] at each of N positions (N,) in float32, from hidden states (N, H) and
    targets (N,), holding at most chunk_tokens x V logits at a time.

    With gradients, a frozen plain head (LoRA and the other adapters) has each position's gradient direction made
    in the forward pass (`token_logps_with_directions`), so the backward pass runs no head matmul. A trained head
    has each chunk checkpointed: its logits and log-softmax recomputed in the backward pass (one more head matmul)
    instead of kept, since its weight gradient needs the per-token weights only the backward pass knows."""
    if chunk_tokens is None:
        return _chunk_token_logps(hidden, head, targets)
    if torch.is_grad_enabled() and hidden.requires_grad and fusable_head(head) and not any(
            parameter.requires_grad for parameter in head.parameters()):
        return token_logps_with_directions(hidden, head, targets, chunk_tokens)
    pieces = [
        checkpoint(_chunk_token_logps, piece, head, piece_targets, use_reentrant=False)
        if torch.is_grad_enabled() else _chunk_token_logps(piece, head, piece_targets)
        for piece, piece_targets in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens), strict=True)
    ]
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


class _RowDirections(torch.autograd.Function):
    """Values (N,) whose gradient with respect to the rows of `hidden` (N, H) is the incoming gradient times each
    row's `directions` (N, H), worked out with the values."""

    @staticmethod
    def forward(ctx, values, hidden, directions):
        ctx.save_for_backward(directions)
        ctx.dtype = hidden.dtype
        return values.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (directions,) = ctx.saved_tensors
        return None, (grad_output[:, None] * directions).to(ctx.dtype), None


def token_logps_with_directions(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """chunked_token_logps for a frozen plain head: d log p(y) / d hidden = W[y] - softmax(logits) @ W, one (C, V)
    x (V, H) matmul a chunk in the forward pass, where the checkpointed chunk ran the head again and the matmul of
    the logits' gradient in the backward pass. Kept for the backward: (N, H) float32, the size of the states."""
    dtype = _compute_dtype(hidden)  # the head's matmul dtype (autocast's, where it is on)
    weight = head.weight.to(dtype)  # (V, H), cast once for all chunks
    values, directions = [], []
    with torch.no_grad():
        for piece, piece_targets in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens), strict=True):
            log_probs = torch.log_softmax(head(piece).float(), -1)  # (C, V)
            values.append(log_probs.gather(-1, piece_targets[:, None]).squeeze(-1))  # (C,)
            expected_row = (log_probs.exp_().to(dtype) @ weight).float()  # (C, H)
            directions.append(head.weight[piece_targets].float() - expected_row)
            del log_probs  # before the next chunk's logits: one chunk's (C, V) buffers at a time, not two
    if not values:
        return hidden.new_zeros(0, dtype=torch.float32)
    return _RowDirections.apply(torch.cat(values), hidden, torch.cat(directions))


def causal_lm_loss(model: torch.nn.Module, batch: dict, settings: CausalLMSettings | None = None) -> LossOutput:
    chunk_tokens = settings.loss_chunk_tokens if settings is not None else None
    targets = batch["targets"]  # (B, T)
    has_target = targets != IGNORE_INDEX  # (B, T)
    # Per-record sample weights (data.sample_weights), spread over each record's tokens.
    weights = batch["sample_weights"][has_target] if "sample_weights" in batch else None  # (N,)
    if _can_skip_unused_logits(model):
        hidden, head = loss_position_hidden(model, batch)  # (N, H)
        loss_sum = chunked_cross_entropy_sum(hidden, head, targets[has_target], chunk_tokens, weights)
    else:
        logits, loss_targets = loss_position_logits(model, batch)
        losses = F.cross_entropy(logits, loss_targets, reduction="none")  # (N,)
        loss_sum = losses.sum() if weights is None else (losses * weights).sum()
    return LossOutput(loss_sum=loss_sum, num_loss_tokens=batch["num_loss_tokens"])


def loss_and_correct(
    model: torch.nn.Module, batch: dict, chunk_tokens: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation: the summed cross-entropy over the batch's loss positions and how many of them the model's most
    likely token gets right, with the logits of at most `chunk_tokens` positions at a time (as the training loss
    holds them), so evaluating never needs more memory for logits than a training step."""
    if _can_skip_unused_logits(model):
        hidden, head = loss_position_hidden(model, batch)  # (N, H)
        targets = batch["targets"][batch["targets"] != IGNORE_INDEX]  # (N,)
        if fusable_head(head):
            return linear_cross_entropy_eval(hidden, head, targets, chunk_tokens)
        pieces = ((head(piece), piece_targets) for piece, piece_targets in
                  zip(_chunks(hidden, chunk_tokens), _chunks(targets, chunk_tokens), strict=True))
    else:  # the full forward made every position's logits already; the loss's own buffers stay bounded
        logits, targets = loss_position_logits(model, batch)  # (N, V), (N,)
        pieces = zip(_chunks(logits, chunk_tokens), _chunks(targets, chunk_tokens), strict=True)
    loss_sum = torch.zeros((), dtype=torch.float32, device=batch["targets"].device)
    correct = torch.zeros((), dtype=torch.long, device=batch["targets"].device)
    for logits, targets in pieces:  # (C, V), (C,)
        correct += (logits.argmax(-1) == targets).sum()
        loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss_sum, correct


def _chunks(tensor: torch.Tensor, chunk_tokens: int | None) -> tuple[torch.Tensor, ...]:
    return (tensor,) if chunk_tokens is None else tensor.split(chunk_tokens)


def causal_lm_eval_sums(model: torch.nn.Module, batch: dict, settings=None) -> dict:
    """The batch's summed cross-entropy, correct most-likely tokens and loss tokens. They stay on the device: no
    batch waits for the host."""
    loss_sum, correct = loss_and_correct(model, batch, settings.loss_chunk_tokens if settings is not None else None)
    return {"loss": loss_sum.double(), "correct": correct, "tokens": batch["num_loss_tokens"]}


def causal_lm_metrics(totals: dict) -> dict[str, float]:
    """Token-weighted loss over the whole eval set (not a mean of batch means), its perplexity and token accuracy."""
    tokens = totals.get("tokens", 0)
    eval_loss = float(totals.get("loss", 0.0)) / max(tokens, 1)
    return {
        "eval_loss": eval_loss,
        "perplexity": math.exp(min(eval_loss, 50.0)),
        "token_accuracy": int(totals.get("correct", 0)) / max(tokens, 1),
        "eval_tokens": tokens,
    }


for _name in ("sft", "pretrain"):
    register(
        ObjectiveSpec(
            name=_name,
            model_kind="causal_lm",
            collate=collate_padded,
            loss=causal_lm_loss,
            eval_sums=causal_lm_eval_sums,
            eval_metrics=causal_lm_metrics,
            settings=CausalLMSettings,
            supports_packing=True,
            rows_independent=True,
        )
    )
