"""Log-likelihood scoring with a causal LM: continuations after a shared context, and perplexity.

`score_continuations` follows lm-evaluation-harness's HF backend (`HFLM._encode_pair`,
`_loglikelihood_tokens`): trailing spaces of the context move into the continuation, the context
and context+continuation are tokenized without special tokens, the continuation's tokens are
`whole[len(context):]`, and an empty context becomes the end-of-text token. What differs is how
the work is done: each item's context runs ONCE for all its choices (its KV cache is shared), items
are batched longest first, and a one-token continuation (MMLU's " A") needs no second pass at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class EncodedItem:
    context: list[int]
    continuations: list[list[int]]


def encode_item(tokenizer, context: str, continuations: Sequence[str]) -> EncodedItem:
    """lm-eval's `_encode_pair` for every choice of one item (the context tokens are the same for all)."""
    spaces = len(context) - len(context.rstrip())
    moved, context = (context[-spaces:], context[:-spaces]) if spaces else ("", context)
    if context:
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    else:
        context_ids = [tokenizer.eos_token_id]  # lm-eval: an empty context is the end-of-text token
    encoded = []
    for continuation in continuations:
        if context:
            whole = tokenizer(context + moved + continuation, add_special_tokens=False)["input_ids"]
            encoded.append(whole[len(context_ids):])
        else:
            encoded.append(tokenizer(moved + continuation, add_special_tokens=False)["input_ids"])
    return EncodedItem(context_ids, encoded)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def score_continuations(
    model, tokenizer, items: Sequence[tuple[str, Sequence[str]]], batch_size: int = 8, max_length: int | None = None
) -> list[list[float]]:
    """Summed log-probability of each continuation given its item's context: [[logp per choice] per item]."""
    encoded = [encode_item(tokenizer, context, choices) for context, choices in items]
    return score_encoded(model, encoded, batch_size, max_length)


@torch.inference_mode()
def score_encoded(model, encoded: Sequence[EncodedItem], batch_size: int = 8, max_length: int | None = None):
    max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)
    device = _device(model)
    results: list[list[float] | None] = [None] * len(encoded)
    # Longest first, as lm-eval does: similar lengths share a batch (less padding), and an
    # out-of-memory error shows up on the first batch rather than after an hour. Items whose
    # contexts start alike (one MMLU subject's description and shots) are kept together first, so
    # that a batch shares its prefix (see _score_batch); the group holding the longest item comes first.
    def total_length(index: int) -> int:
        return len(encoded[index].context) + max(map(len, encoded[index].continuations))

    groups: dict[tuple[int, ...], list[int]] = {}
    for index, item in enumerate(encoded):
        groups.setdefault(tuple(item.context[:PREFIX_GROUP_TOKENS]), []).append(index)
    order = [index for members in sorted(groups.values(), key=lambda m: -max(map(total_length, m)))
             for index in sorted(members, key=lambda index: -total_length(index))]
    for start in range(0, len(order), batch_size):
        batch = [encoded[i] for i in order[start : start + batch_size]]
        for index, scores in zip(order[start : start + batch_size], _score_batch(model, batch, device, max_length),
                                 strict=True):
            results[index] = scores
    return results


MIN_SHARED_PREFIX = 16
"""Shorter common prefixes are not worth a separate forward pass."""
PREFIX_GROUP_TOKENS = 64
"""Items whose contexts agree on this many first tokens are batched together."""


def shared_prefix_length(contexts: Sequence[Sequence[int]]) -> int:
    """Tokens that every context starts with, leaving each at least one token of its own (its last
    position's logits predict the first continuation token)."""
    first, shortest = contexts[0], min(map(len, contexts))
    length = 0
    while length < shortest - 1 and all(c[length] == first[length] for c in contexts):
        length += 1
    return length


def _score_batch(model, batch: list[EncodedItem], device, max_length: int) -> list[list[float]]:
    longest_continuation = max(len(c) for item in batch for c in item.continuations)
    # Left-truncate contexts so context + continuation fits the model, as lm-eval does.
    contexts = [item.context[-(max_length - longest_continuation + 1):] for item in batch]
    pad = 0
    # Few-shot items of one subject share a long prefix (description + solved examples): it runs
    # once, as one row, and its KV cache is repeated for every row of the batch.
    shared = shared_prefix_length(contexts) if len(contexts) > 1 else 0
    past, prefix_mask = None, torch.ones((len(contexts), 0), dtype=torch.long, device=device)
    if shared >= MIN_SHARED_PREFIX:
        prefix = model(input_ids=torch.tensor([contexts[0][:shared]], device=device), use_cache=True,
                       logits_to_keep=1)
        past = prefix.past_key_values
        past.batch_select_indices(torch.zeros(len(contexts), dtype=torch.long, device=device))
        prefix_mask = torch.ones((len(contexts), shared), dtype=torch.long, device=device)
        contexts = [c[shared:] for c in contexts]
    else:
        shared = 0
    width = max(map(len, contexts))
    # Left padding: every context ends at the same column, so its last logits and its KV cache line up.
    # After a shared prefix the padding sits between prefix and suffix, masked out like any padding.
    input_ids = torch.tensor([[pad] * (width - len(c)) + c for c in contexts], device=device)
    suffix_mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=device)
    context_mask = torch.cat([prefix_mask, suffix_mask], dim=1)  # (B, shared + width)
    position_ids = shared + (suffix_mask.cumsum(-1) - 1).clamp(min=0)
    # Only the last context position's logits are needed: (B, 1, V) instead of (B, T, V), which for a
    # 49k-token vocabulary is most of the memory and much of the time of a long few-shot context.
    output = model(input_ids=input_ids, attention_mask=context_mask, position_ids=position_ids, past_key_values=past,
                   use_cache=True, logits_to_keep=1)
    first_logprobs = F.log_softmax(output.logits[:, -1, :].float(), dim=-1)  # (B, V)

    scores = [[float(first_logprobs[row, c[0]]) for c in item.continuations] for row, item in enumerate(batch)]
    if longest_continuation == 1:
        return scores

    # Continuations longer than one token: tokens 1.. are predicted from the shared context cache,
    # repeated once per choice (rows = all choices of all items), continuation right-padded.
    rows = [(row, choice) for row, item in enumerate(batch) for choice in range(len(item.continuations))]
    cache = output.past_key_values
    cache.batch_select_indices(torch.tensor([row for row, _ in rows], device=device))
    fed = [batch[row].continuations[choice][:-1] for row, choice in rows]
    fed_width = max(1, max(map(len, fed)))
    fed_ids = torch.tensor([f + [pad] * (fed_width - len(f)) for f in fed], device=device)
    fed_mask = torch.tensor([[1] * len(f) + [0] * (fed_width - len(f)) for f in fed], device=device)
    row_index = torch.tensor([row for row, _ in rows], device=device)
    attention = torch.cat([context_mask[row_index], fed_mask], dim=1)
    context_lengths = context_mask[row_index].sum(-1, keepdim=True)
    positions = context_lengths + torch.arange(fed_width, device=device)[None, :]
    logits = model(input_ids=fed_ids, attention_mask=attention, position_ids=positions, past_key_values=cache).logits
    logprobs = F.log_softmax(logits.float(), dim=-1)  # (rows, fed_width, V)
    for flat, (row, choice) in enumerate(rows):
        targets = batch[row].continuations[choice][1:]
        if targets:
            picked = logprobs[flat, torch.arange(len(targets), device=device), torch.tensor(targets, device=device)]
            scores[row][choice] += float(picked.sum())
    return scores


@torch.inference_mode()
def document_nll(model, tokenizer, texts: Sequence[str], window: int, stride: int | None = None, batch_size: int = 4):
    """(NLL summed over predicted tokens, number of predicted tokens) per text.

    Sliding window (the Hugging Face perplexity guide): windows of `window` tokens start every
    `stride` tokens; each window scores only the tokens the previous one did not, so every token
    after the first is scored exactly once, with up to window - stride tokens of earlier context.
    The first token has no context and is not scored (the tokenizer's BOS, if it adds one, is it).
    """
    stride = stride or window
    device = _device(model)
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
        input_ids = torch.tensor([ids + [0] * (width - len(ids)) for _, ids, _ in chunk], device=device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for _, ids, _ in chunk], device=device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits  # (B, T, V)
        for row, (text_index, ids, scored) in enumerate(chunk):
            length = len(ids)
            logprobs = F.log_softmax(logits[row, : length - 1].float(), dim=-1)  # predicts tokens 1..length-1
            targets = torch.tensor(ids[1:], device=device)
            token_logprobs = logprobs.gather(-1, targets[:, None])[:, 0]
            totals[text_index][0] -= float(token_logprobs[-scored:].sum())
            totals[text_index][1] += scored
    return [(nll, count) for nll, count in totals]
