"""Log-likelihood scoring with a causal LM: continuations after a shared context, and perplexity.

`score_continuations` follows lm-evaluation-harness's HF backend (`HFLM._encode_pair`,
`_loglikelihood_tokens`): trailing spaces of the context move into the continuation, the context
and context+continuation are tokenized without special tokens, the continuation's tokens are
`whole[len(context):]`, and an empty context becomes the end-of-text token. What differs is how
the work is done, never what is computed:

- Items whose contexts start with the same tokens (one k-shot MMLU subject: description and the
  same dev examples) are a group; the group's longest common TOKEN prefix runs once and its KV
  cache is expanded over every batch of the group, so each item only runs its own question.
- Each item's context runs ONCE for all its choices, and a one-token continuation (MMLU's " A")
  is read off that pass's last logits; longer continuations take one more pass over the context's
  cache, with the log-softmax taken (in float32) only at their own positions.
- Batches go longest first, so similar lengths share a batch (little padding) and an
  out-of-memory error shows up at once rather than after an hour.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@dataclass
class EncodedItem:
    context: list[int]
    continuations: list[list[int]]


def encode_item(tokenizer, context: str, continuations: Sequence[str]) -> EncodedItem:
    """lm-eval's `_encode_pair` for every choice of one item (the context tokens are the same for all)."""
    spaces = len(context) - len(context.rstrip())
    moved, context = (context[-spaces:], context[:-spaces]) if spaces else ("", context)
    if not context:
        # lm-eval: an empty context is the end-of-text token, and the continuation is tokenized alone.
        encoded = tokenizer([moved + c for c in continuations], add_special_tokens=False)["input_ids"]
        return EncodedItem([tokenizer.eos_token_id], encoded)
    # One tokenizer call for the context and every context+continuation (the same ids as separate calls).
    context_ids, *wholes = tokenizer([context] + [context + moved + c for c in continuations],
                                     add_special_tokens=False)["input_ids"]
    return EncodedItem(context_ids, [whole[len(context_ids):] for whole in wholes])


def model_device(model) -> torch.device:
    """Where the model's weights are."""
    return next(model.parameters()).device


@torch.inference_mode()
def score_continuations(
    model, tokenizer, items: Sequence[tuple[str, Sequence[str]]], batch_size: int = 8, max_length: int | None = None
) -> list[list[float]]:
    """Summed log-probability of each continuation given its item's context: [[logp per choice] per item]."""
    encoded = [encode_item(tokenizer, context, choices) for context, choices in items]
    return score_encoded(model, encoded, batch_size, max_length)


PAD_ID = 0
"""Any id does: padded positions are masked out of attention and never read."""
MIN_SHARED_PREFIX = 16
"""Shorter common prefixes are not worth a separate forward pass."""
PREFIX_GROUP_TOKENS = 64
"""Items whose contexts agree on this many first tokens are a group that may share a prefix."""


def shared_prefix_length(contexts: Sequence[Sequence[int]]) -> int:
    """Tokens that every context starts with, leaving each at least one token of its own (its last
    position's logits predict the first continuation token)."""
    first, shortest = contexts[0], min(map(len, contexts))
    length = 0
    while length < shortest - 1 and all(c[length] == first[length] for c in contexts):
        length += 1
    return length


@torch.inference_mode()
def score_encoded(
    model, encoded: Sequence[EncodedItem], batch_size: int = 8, max_length: int | None = None
) -> list[list[float]]:
    """`score_continuations` on already tokenized items."""
    max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)
    device = model_device(model)
    items = [_left_truncated(item, max_length) for item in encoded]
    results: list[list[float]] = [[] for _ in items]
    share_prefixes = _prefix_cache_is_exact(model)
    for members, shared in _prefix_groups(items, share_prefixes):
        prefix = _prefix_cache(model, items[members[0]].context[:shared], device) if shared else None
        for start in range(0, len(members), batch_size):
            indices = members[start : start + batch_size]
            batch_scores = _score_batch(model, [items[i] for i in indices], prefix, shared, device)
            for index, scores in zip(indices, batch_scores, strict=True):
                results[index] = scores
    return results


def _left_truncated(item: EncodedItem, max_length: int) -> EncodedItem:
    """The context cut from the left so that context + its longest continuation fits the model, as
    lm-eval cuts (it cuts per choice; here one cut per item keeps the context shared by its choices,
    which is the same whenever nothing is cut)."""
    keep = max(1, max_length - max(map(len, item.continuations)) + 1)
    return EncodedItem(item.context[-keep:], item.continuations) if len(item.context) > keep else item


def _prefix_cache_is_exact(model) -> bool:
    """A cached prefix equals recomputing it only when every layer attends to the full past; a
    sliding-window layer (Mistral, Gemma) would drop part of a long prefix."""
    layers = DynamicCache(config=model.config).layers
    return all(type(layer) is DynamicLayer for layer in layers)


def _prefix_groups(items: Sequence[EncodedItem], share_prefixes: bool) -> Iterator[tuple[list[int], int]]:
    """(item indices longest first, shared prefix length) for each batch group, the group holding the
    longest item first. Items whose contexts agree on their first PREFIX_GROUP_TOKENS tokens and share at
    least MIN_SHARED_PREFIX tokens form a group with that prefix; the others are pooled, prefix 0."""

    def total_length(index: int) -> int:
        return len(items[index].context) + max(map(len, items[index].continuations))

    candidates: dict[tuple[int, ...], list[int]] = {}
    for index, item in enumerate(items):
        candidates.setdefault(tuple(item.context[:PREFIX_GROUP_TOKENS]), []).append(index)
    groups, pooled = [], []
    for members in candidates.values():
        shared = shared_prefix_length([items[i].context for i in members]) if len(members) > 1 else 0
        if share_prefixes and shared >= MIN_SHARED_PREFIX:
            groups.append((members, shared))
        else:
            pooled += members
    if pooled:
        groups.append((pooled, 0))
    groups.sort(key=lambda group: -max(map(total_length, group[0])))
    for members, shared in groups:
        yield sorted(members, key=lambda index: -total_length(index)), shared


def _prefix_cache(model, prefix: list[int], device) -> DynamicCache:
    """The KV cache of the shared prefix, one row; only the cache is wanted, so one position's logits."""
    output = model(input_ids=torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1)
    return output.past_key_values


def _expanded(prefix: DynamicCache, rows: int) -> DynamicCache:
    """A new cache holding the one-row prefix for each of `rows` rows: expanded views, copied only when
    the batch's own keys and values are appended, so the stored prefix is never changed."""
    return DynamicCache([(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))  # (rows, H, P, D)
                         for keys, values, _ in prefix])


def _score_batch(
    model, batch: list[EncodedItem], prefix: DynamicCache | None, shared: int, device
) -> list[list[float]]:
    """Summed log-probabilities of every choice of every item; the first `shared` context tokens are in
    `prefix` (a one-row cache), the rest of each context runs here."""
    suffixes = [item.context[shared:] for item in batch]
    width = max(map(len, suffixes))
    # Left padding: every context ends at the same column, so its last logits and its KV cache line up.
    # After a shared prefix the padding sits between prefix and suffix, masked out like any padding.
    input_ids = torch.tensor([[PAD_ID] * (width - len(s)) + s for s in suffixes], device=device)  # (B, W)
    suffix_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in suffixes], device=device)  # (B, W)
    prefix_mask = torch.ones((len(batch), shared), dtype=torch.long, device=device)  # (B, shared)
    context_mask = torch.cat([prefix_mask, suffix_mask], dim=1)  # (B, shared + W)
    position_ids = shared + (suffix_mask.cumsum(-1) - 1).clamp(min=0)  # (B, W)
    multi_token = any(len(c) > 1 for item in batch for c in item.continuations)
    past = _expanded(prefix, len(batch)) if prefix is not None else None
    # Only the last context position's logits are needed: (B, 1, V) instead of (B, W, V), which for a
    # 49k-token vocabulary is most of the memory and much of the time of a long few-shot context.
    output = model(input_ids=input_ids, attention_mask=context_mask, position_ids=position_ids, past_key_values=past,
                   use_cache=multi_token, logits_to_keep=1)
    first_logprobs = F.log_softmax(output.logits[:, -1, :].float(), dim=-1)  # (B, V)

    # Every choice of every item as one flat row: (item row, choice) in item order.
    choices = [(row, choice) for row, item in enumerate(batch) for choice in range(len(item.continuations))]
    item_rows = torch.tensor([row for row, _ in choices], device=device)  # (C,)
    first_tokens = torch.tensor([batch[row].continuations[choice][0] for row, choice in choices], device=device)
    totals = first_logprobs[item_rows, first_tokens]  # (C,)
    if multi_token:
        totals += _continuation_tail_logprobs(model, batch, choices, output.past_key_values, context_mask, device)
    flat = totals.tolist()  # the batch's one host sync
    scores, offset = [], 0
    for item in batch:
        scores.append(flat[offset : offset + len(item.continuations)])
        offset += len(item.continuations)
    return scores


def _continuation_tail_logprobs(model, batch: list[EncodedItem], choices: list[tuple[int, int]],
                                cache: DynamicCache, context_mask: torch.Tensor, device) -> torch.Tensor:
    """Summed log-probabilities of continuation tokens 1.. of every choice (0 for one-token choices): each
    longer choice is a row over its item's context cache, its continuation right-padded."""
    longer = [flat for flat, (row, choice) in enumerate(choices) if len(batch[row].continuations[choice]) > 1]
    continuations = [batch[choices[flat][0]].continuations[choices[flat][1]] for flat in longer]
    item_rows = torch.tensor([choices[flat][0] for flat in longer], device=device)  # (R,)
    cache.batch_select_indices(item_rows)
    fed_width = max(len(c) - 1 for c in continuations)
    # Token k of a row predicts token k + 1 of its continuation.
    fed_ids = torch.tensor([c[:-1] + [PAD_ID] * (fed_width - len(c) + 1) for c in continuations], device=device)
    targets = torch.tensor([c[1:] + [PAD_ID] * (fed_width - len(c) + 1) for c in continuations], device=device)
    fed_mask = torch.tensor([[1] * (len(c) - 1) + [0] * (fed_width - len(c) + 1) for c in continuations],
                            device=device)  # (R, F)
    row_context_mask = context_mask[item_rows]  # (R, shared + W)
    attention = torch.cat([row_context_mask, fed_mask], dim=1)  # (R, shared + W + F)
    positions = row_context_mask.sum(-1, keepdim=True) + torch.arange(fed_width, device=device)[None, :]  # (R, F)
    logits = model(input_ids=fed_ids, attention_mask=attention, position_ids=positions, past_key_values=cache).logits
    real = fed_mask.bool()  # (R, F)
    logprobs = F.log_softmax(logits[real].float(), dim=-1)  # (N, V): real continuation positions only
    picked = logprobs.gather(-1, targets[real][:, None])[:, 0]  # (N,)
    row_of_position = torch.arange(len(longer), device=device)[:, None].expand_as(real)[real]  # (N,)
    per_row = torch.zeros(len(longer), dtype=picked.dtype, device=device).index_add_(0, row_of_position, picked)
    tails = torch.zeros(len(choices), dtype=picked.dtype, device=device)  # (C,)
    tails[torch.tensor(longer, device=device)] = per_row
    return tails


@torch.inference_mode()
def document_nll(model, tokenizer, texts: Sequence[str], window: int, stride: int | None = None, batch_size: int = 4):
    """(NLL summed over predicted tokens, number of predicted tokens) per text.

    Sliding window (the Hugging Face perplexity guide): windows of `window` tokens start every
    `stride` tokens; each window scores only the tokens the previous one did not, so every token
    after the first is scored exactly once, with up to window - stride tokens of earlier context.
    The first token has no context and is not scored (the tokenizer's BOS, if it adds one, is it).
    """
    stride = stride or window
    device = model_device(model)
    # (text index, token ids of the window, how many trailing tokens of it are scored)
    windows: list[tuple[int, list[int], int]] = []
    for index, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"]
        previous_end = 1  # token 0 is never scored
        for begin in range(0, max(len(ids) - 1, 1), stride):
            end = min(begin + window, len(ids))
            if end <= previous_end:
                break
            windows.append((index, ids[begin:end], end - previous_end))
            previous_end = end
            if end == len(ids):
                break
    totals = [[0.0, 0] for _ in texts]
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][1]))
    for start in range(0, len(order), batch_size):
        chunk = [windows[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for _, ids, _ in chunk)
        input_ids = torch.tensor([ids + [PAD_ID] * (width - len(ids)) for _, ids, _ in chunk], device=device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for _, ids, _ in chunk], device=device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits  # (B, T, V)
        window_logprobs = []
        for row, (_, ids, scored) in enumerate(chunk):
            # Position p predicts token p + 1: the last `scored` tokens come from positions
            # len - scored - 1 .. len - 2, the only ones whose float32 log-softmax is taken.
            length = len(ids)
            logprobs = F.log_softmax(logits[row, length - scored - 1 : length - 1].float(), dim=-1)  # (scored, V)
            targets = torch.tensor(ids[length - scored :], device=device)  # (scored,)
            window_logprobs.append(logprobs.gather(-1, targets[:, None]).sum())
        for (text_index, _, scored), summed in zip(chunk, torch.stack(window_logprobs).tolist(), strict=True):
            totals[text_index][0] -= summed
            totals[text_index][1] += scored
    return [(nll, count) for nll, count in totals]
