"""Continuations that share a beginning, run as one row: the beginning once, each continuation after it.

A preference pair's chosen and rejected sides share their prompt; a grpo / ppo group's G completions share
theirs. Run as separate rows, the beginning runs once per continuation. As one row (the beginning, then each
continuation in turn, its positions numbered on from the beginning's end) under a mask in which a
continuation's tokens see the beginning and their own continuation only, every token's state is the one it has
in its own separate row: a token's state depends only on the tokens it attends to, and their positions.

The row is longer than each separate one, and a masked attention kernel scores every key of it, so the layout
pays where the positions it saves outweigh the attention it adds (`forward_flops`); the callers compare the two.
Unlike continuing from a KV cache (objectives/rl.py's `continued_forward`), this is one ordinary forward, so it
works with recomputed (checkpointed) layers.
"""

from __future__ import annotations

import torch

from tunesmith.objectives.causal_lm import _language_model
from tunesmith.training.packed_attention import MASKED_NAME

BEGINNING = 0
"""The branch number of a row's shared beginning; continuations are 1, 2, ..."""


def takes_branched_rows(model: torch.nn.Module, width: int | None = None) -> bool:
    """Whether the model's attention takes the layout's 4-D mask (transformers' SDPA; eager and flash kernels
    here keep separate rows), for rows of `width` (None: of any width). The one mask serves every layer, so a
    model with sliding-window layers (Mistral, Gemma 3, Qwen2 with use_sliding_window) takes it only for rows no
    wider than its window, where the window hides nothing."""
    config = _language_model(model).config
    window = sliding_window(config)
    return config._attn_implementation in ("sdpa", MASKED_NAME) and (
        window is None or (width is not None and width <= window))


def sliding_window(model_config) -> int | None:
    """The attention window of a model with sliding-window layers, None where every layer attends to all earlier
    positions: the config's `layer_types` where it has them, else its `sliding_window`."""
    layer_types = getattr(model_config, "layer_types", None)
    if layer_types is not None and not any("sliding" in kind for kind in layer_types):
        return None
    return getattr(model_config, "sliding_window", None)


def branched_rows_pay(model: torch.nn.Module, rows: int, width: int, separate_rows: int, separate_width: int) -> bool:
    """Whether `rows` branched rows of `width` should replace `separate_rows` rows of `separate_width`: the model
    takes the layout at that width, and it costs fewer FLOPs (a row is fewer positions in all but longer, and at
    long lengths of a small model attention is most of the work)."""
    return takes_branched_rows(model, width) and costs_less(
        _language_model(model).config, rows, width, separate_rows, separate_width)


def costs_less(model_config, rows: int, width: int, separate_rows: int, separate_width: int) -> bool:
    """The layouts' FLOPs rule (`forward_flops`): `rows` branched rows of `width` against `separate_rows` rows of
    `separate_width`; `branched_rows_pay` applies it to a batch, `tunesmith plan` to its bounds."""
    return forward_flops(model_config, rows, width) < forward_flops(model_config, separate_rows, separate_width)


def forward_flops(model_config, rows: int, length: int) -> float:
    """Rough FLOPs of a decoder layer's forward over `rows` x `length` positions, to compare two layouts of one
    batch: 2 per weight per position (llama-like sizes read from the config) and 4 x hidden per query-key pair
    (a masked kernel scores every key of the row)."""
    hidden = model_config.hidden_size
    heads = getattr(model_config, "num_attention_heads", 1)
    key_value = hidden * (getattr(model_config, "num_key_value_heads", None) or heads) // heads
    intermediate = getattr(model_config, "intermediate_size", None) or 4 * hidden
    layer_weights = hidden * (2 * hidden + 2 * key_value) + 3 * hidden * intermediate
    return rows * length * (2 * layer_weights + 4 * hidden * length)


def longest_accepted_row(model_config, continuations: int, length: int) -> int:
    """The longest row of a beginning and `continuations` continuations that costs fewer FLOPs than the
    continuations as rows of `length` (`forward_flops`): the callers' rule, as `tunesmith plan` bounds it. 0 where
    no row longer than `length` does."""
    shortest, longest = length, continuations * length  # a row holds at least one continuation, at most all whole
    if not costs_less(model_config, 1, shortest + 1, continuations, length):
        return 0
    while shortest < longest:  # forward_flops grows with the length: the last length the rule accepts
        middle = (shortest + longest + 1) // 2
        shortest, longest = (middle, longest) if costs_less(model_config, 1, middle, continuations, length) else (
            shortest, middle - 1)
    return shortest


def branched_row_hidden(
    model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, branch: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """Final hidden states (R, W, H) of rows laid out as the module describes: tokens (R, W), each token's
    position in its own continuation (R, W), its branch (R, W: BEGINNING or a continuation's number), and each
    row's length (R,) (the columns after it are padding).

    Which keys a query sees: causal, real keys only, and a key of a continuation only for the queries of the same
    continuation. Padding queries see themselves (a row of the softmax with no key at all would be NaN, and NaN
    times a zero gradient is still NaN). The mask goes to the kernel as one additive (R, 1, W, W) tensor in the
    attention's dtype, which every layer's attention saves for its backward as it is; a boolean mask would be
    turned into a float32 copy of that size in each layer, and each copy kept (2 GB for 30 layers at W = 4,096)."""
    language_model = _language_model(model)
    backbone = getattr(language_model, language_model.base_model_prefix)
    width, device = input_ids.shape[1], input_ids.device
    column = torch.arange(width, device=device)[None, :]  # (1, W)
    in_row = column < lengths[:, None]  # (R, W)
    sees = (column.t() >= column) & in_row[:, None, :]  # (R, W, W) query x key: causal, real keys
    sees &= (branch[:, None, :] == BEGINNING) | (branch[:, :, None] == branch[:, None, :])
    sees |= torch.eye(width, dtype=torch.bool, device=device)
    dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
             else backbone.get_input_embeddings().weight.dtype)
    additive = torch.zeros(sees.shape, dtype=dtype, device=device).masked_fill_(~sees, torch.finfo(dtype).min)
    return backbone(input_ids=input_ids, attention_mask=additive[:, None], position_ids=position_ids,
                    use_cache=False).last_hidden_state  # (R, W, H)
