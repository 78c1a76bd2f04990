"""Attention for packed rows, one record at a time: no block-diagonal mask, causal kernels only.

A packed row holds several records whose position ids restart at 0. transformers' SDPA path turns
that into a (T, T) block-diagonal causal mask and attends over the whole row: every query scores
every key of the row and the mask throws most of it away, through SDPA's masked (slower) kernel.
Here each record's span is attended on its own with `is_causal=True`: the scores computed are the
sum of the records' squares instead of the row's square, and the causal kernel needs no mask. The
result is the same attention (tested against the masked path, values and gradients). On this
project's CPU, for a 512-token row of three records, one layer's attention forward + backward
falls from ~58 to ~35 ms (bench/README.md).

It runs only where it applies: a training forward (module.training) over full-length queries whose
position ids restart inside a row. Everything else (evaluation, generation with its cache, padded
batches) goes to transformers' own SDPA function with the mask transformers built for it, since
the mask function registered under this name is SDPA's.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "tunesmith_packed_sdpa"


def record_spans(positions: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each record in one row, from its position ids (T,): a record starts at position 0."""
    starts = (positions == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return list(zip(starts, [*starts[1:], positions.shape[0]], strict=True))


def is_packed(position_ids: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> bool:
    if position_ids is None or query.shape[2] != key.shape[2] or position_ids.shape[-1] != query.shape[2]:
        return False
    return bool((position_ids[:, 1:] == 0).any())


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, H, T, D)
    key: torch.Tensor,  # (B, Hkv, T, D)
    value: torch.Tensor,  # (B, Hkv, T, D)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: returns the output as (B, T, H, D) and no weights."""
    if not (module.training and is_packed(position_ids, query, key)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    rows = []
    for row in range(query.shape[0]):
        pieces = [
            F.scaled_dot_product_attention(
                query[row : row + 1, :, start:end], key[row : row + 1, :, start:end],
                value[row : row + 1, :, start:end], dropout_p=dropout, is_causal=True, scale=scaling,
                enable_gqa=query.shape[1] != key.shape[1],
            )  # (1, H, L, D)
            for start, end in record_spans(position_ids[row])
        ]
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, packed_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


@contextmanager
def packed_attention(model: torch.nn.Module):
    """Use the per-record attention inside the block (training on packed rows), SDPA again after it
    (so exported configs and later evaluation or generation are untouched)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = base.config._attn_implementation
    if previous != "sdpa":  # eager / flash kernels chosen by the user are left alone
        yield
        return
    base.set_attn_implementation(NAME)
    try:
        yield
    finally:
        base.set_attn_implementation(previous)
