"""Attention for packed rows, one record at a time: no block-diagonal mask, causal kernels only.

A packed row holds several records whose position ids restart at 0. transformers' SDPA path turns
that into a (T, T) block-diagonal causal mask and attends over the whole row: every query scores
every key of the row and the mask throws most of it away, through SDPA's masked (slower) kernel.
Here each record's span is attended on its own with `is_causal=True`: the scores computed are the
sum of the records' squares instead of the row's square, and the causal kernel needs no mask. The
result is the same attention (tested against the masked path, values and gradients). On this
project's CPU, for a 512-token row of three records, one layer's attention forward + backward
falls from ~58 to ~35 ms, and to ~27 ms with the records cut by split instead of slicing (two rows,
float32; in bfloat16 records of up to 1,024 tokens take `causal_attention_by_matmul`; bench/README.md).

On CUDA, in bfloat16 / float16, the whole batch goes through one call of PyTorch's variable-length
flash kernel (`torch.nn.attention.varlen.varlen_attn`) instead: the rows are flattened into one
sequence of records and the kernel is told where each record starts, so a layer's attention is one
launch however many records the rows hold. That kernel has no CPU implementation; the CPU tests
check our use of it (offsets, layout, key-head grouping) against a reference that runs the same
calling contract through SDPA, and tests/test_packed_attention.py's CUDA test against the real one.

It runs only where it applies: a training forward (module.training) over full-length queries with
position ids, i.e. the rows of a packed batch (a row that holds one record is one span). Everything
else (evaluation, generation with its cache) goes to transformers' own SDPA function with the mask
transformers built for it, since the mask function registered under this name is SDPA's. Deciding
that reads shapes only: no layer waits for the device (the record starts are read once per forward).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import threading
import weakref
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from tunesmith.models import unwrapped_model

NAME = "tunesmith_packed_sdpa"


def record_spans(positions: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each record in one row, from its position ids (T,): a record starts at position 0."""
    starts = (positions == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return list(zip(starts, [*starts[1:], positions.shape[0]], strict=True))


def is_packed(position_ids: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whole rows with their position ids: a packed batch's rows, attended record by record. A check of
    shapes only; looking for restarts in the ids would make every layer wait for the device."""
    return position_ids is not None and query.shape[2] == key.shape[2] == position_ids.shape[-1]


class _RecordLengths(threading.local):
    """Each row's record lengths, worked out once per forward: every layer receives the same position_ids
    tensor, so the host sync that reads the record starts happens once, not once per layer (and so does
    the copy of the varlen kernel's offsets to the device, and the building of each record length's causal
    bias for the CPU matmul kernel). One per thread: with `train.parallel_rows` each thread runs its own
    forward on its own rows (training/parallel_rows.py)."""

    def __init__(self):
        self.position_ids: weakref.ref | None = None
        self.lengths: list[list[int]] = []
        self.offsets: tuple[torch.Tensor, int] | None = None
        self.biases: dict[tuple, torch.Tensor] = {}

    def of(self, position_ids: torch.Tensor) -> list[list[int]]:
        if self.position_ids is None or self.position_ids() is not position_ids:
            on_host = position_ids.cpu()  # one copy for the batch, not one device sync per row
            self.lengths = [[end - start for start, end in record_spans(row)] for row in on_host]
            self.position_ids = weakref.ref(position_ids)
            self.offsets = None
            self.biases = {}
        return self.lengths

    def offsets_of(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Where each record starts in the flattened batch, then its end: (records + 1,) int32 on the
        ids' device; and the longest record."""
        rows = self.of(position_ids)
        if self.offsets is None:
            lengths = [length for row in rows for length in row]
            starts = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            self.offsets = starts.to(position_ids.device), max(lengths)
        return self.offsets

    def causal_bias(self, start: int, end: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(groups * (end - start), end) for the query rows start..end of a record: 0 where a query may see a
        key, -inf for the keys after it; the rows repeated for each query head of a key head's group. Kept
        until the next batch's position ids, so each block's bias is built once per forward, not once per
        layer."""
        key = (start, end, groups, dtype, device)
        if key not in self.biases:
            bias = torch.zeros((end - start, end), dtype=dtype, device=device)
            bias[:, start:] = torch.full((end - start, end - start), float("-inf"), dtype=dtype, device=device).triu(1)
            self.biases[key] = bias.repeat(groups, 1)
        return self.biases[key]


_record_lengths = _RecordLengths()


# Records up to this many tokens take the matmul kernel below on CPU in bfloat16 / float16; longer ones
# PyTorch's flash kernel, which is faster there and keeps no (L, L) probabilities for the backward (one
# layer, 9 heads, forward + backward in bfloat16, fastest of 18 runs on this project's CPU: 10.9 / 42.1 ms
# here at 512 / 1,024 tokens, 20.5 / 50.4 ms flash; at 2,048 flash is several times faster).
MATMUL_ATTENTION_MAX_LENGTH = 1024


# Records of QUERY_BLOCKS_FROM_LENGTH tokens or more are split into QUERY_BLOCKS blocks of query rows. A block
# attends to the keys up to its last row only, so the scores above the diagonal blocks are never computed (5/8
# of the L x L remain with 4 blocks), and a block's scores stay in the CPU's cache. One layer, 9 heads, forward
# + backward in bfloat16, fastest of 12 runs on this project's CPU: 512 tokens 11.2 -> 8.2 ms, 768: 29.6 ->
# 12.7, 1,024: 56.9 -> 30.5; below 512 tokens one block was as fast (448: 6.0 ms, 4 blocks 6.4).
QUERY_BLOCKS = 4
QUERY_BLOCKS_FROM_LENGTH = 512


def causal_attention_by_matmul(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """Causal attention of one record (1, H, L, D) from (1, Hkv, L, D) keys and values: `attention_by_matmul`
    with each query block's causal bias.

    Used for bfloat16 / float16 on CPU, where PyTorch's flash kernel's backward is the slow part of a
    step (see MATMUL_ATTENTION_MAX_LENGTH). One layer, 9 heads, forward + backward in bfloat16, record of
    512 tokens, fastest of 18 runs on this project's CPU: flash 20.5 ms, this kernel with a separate scale,
    mask and float32 softmax (transformers' eager recipe) 23.0 ms, this kernel in one block 10.9 ms.
    """
    key_heads = key.shape[1]

    def causal_bias(start: int, end: int, groups: int) -> torch.Tensor:
        bias = _record_lengths.causal_bias(start, end, groups, query.dtype, query.device)  # (G*(end-start), end)
        return bias.expand(key_heads, -1, -1)

    return attention_by_matmul(query, key, value, scaling, causal_bias)


def attention_by_matmul(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
    block_bias: Callable[[int, int, int], torch.Tensor],
) -> torch.Tensor:
    """Attention of rows (B, H, L, D) from (B, Hkv, L, D) keys and values under a causal layout, as two batched
    matmuls and a softmax per block of query rows (QUERY_BLOCKS). The query heads that share a key head are
    stacked along the query axis, so keys and values are never repeated per head. `block_bias(start, end,
    groups)` gives the additive bias (B * Hkv, groups * (end - start), end) of the query rows start..end over the
    keys up to `end` (a block attends to no later key); the scale and the bias are applied inside the first
    matmul (baddbmm: one rounding of the scaled, biased float32 sum), and the softmax runs on the half-precision
    scores: PyTorch's CPU kernel works in float32 inside and rounds its output once, as
    `softmax(dtype=float32).to(dtype)` would, without the two float32 copies of the (L, L) scores for the
    forward and two more for the backward."""
    rows, heads, length, dim = query.shape
    key_heads = key.shape[1]
    groups = heads // key_heads
    scale = dim**-0.5 if scaling is None else scaling
    blocks = QUERY_BLOCKS if length >= QUERY_BLOCKS_FROM_LENGTH else 1
    spans = list(itertools.pairwise(length * index // blocks for index in range(blocks + 1)))
    keys = key.reshape(rows * key_heads, length, dim).transpose(-1, -2)  # (B*Hkv, D, L)
    values = value.reshape(rows * key_heads, length, dim)  # (B*Hkv, L, D)
    outputs = []
    # split, not slices: one backward concatenates the blocks' query gradients (a slice's zero-fills all of them)
    for (start, end), block in zip(spans, query.split([end - start for start, end in spans], dim=2), strict=True):
        grouped_rows = block.reshape(rows * key_heads, groups * (end - start), dim)  # (B*Hkv, G*(end-start), D)
        if grouped_rows.untyped_storage().nbytes() > grouped_rows.nbytes:
            # A view (a one-token record's) kept for the backward would keep the whole batch's queries with it.
            grouped_rows = grouped_rows.clone()
        bias = block_bias(start, end, groups)  # (B*Hkv, G*(end-start), end)
        scores = torch.baddbmm(bias, grouped_rows, keys[:, :, :end], alpha=scale)  # (B*Hkv, G*(end-start), end)
        weights = torch.softmax(scores, dim=-1)
        outputs.append((weights @ values[:, :end]).reshape(rows, heads, end - start, dim))
    return outputs[0] if blocks == 1 else torch.cat(outputs, dim=2)


def record_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, scaling: float | None
) -> torch.Tensor:
    """Causal attention over one record (1, H, L, D): the faster kernel for its device, dtype and length."""
    if (query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16) and dropout == 0.0
            and query.shape[2] <= MATMUL_ATTENTION_MAX_LENGTH):
        return causal_attention_by_matmul(query, key, value, scaling)
    return F.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )


VarlenKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float | None], torch.Tensor]


@functools.cache
def varlen_kernel() -> VarlenKernel | None:
    """PyTorch's variable-length flash attention, made causal, as (query (N, H, D), key (N, Hkv, D),
    value, offsets (records + 1,), longest record, scale) -> (N, H, D); None where this torch has none.

    Its keywords moved between PyTorch releases (`is_causal=True` became `window_size=(-1, 0)`;
    `enable_gqa` came later), so they are read off its signature. Without `enable_gqa` the key heads
    are repeated for their query heads, in transformers' order (query head h reads key head h // group).
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "scale" not in parameters:
        return None
    if "window_size" in parameters:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in parameters:
        causal = {"is_causal": True}
    else:
        return None
    grouped = "enable_gqa" in parameters

    def attend(query, key, value, offsets, longest, scale):
        options = dict(causal)
        if key.shape[1] != query.shape[1]:
            if grouped:
                options["enable_gqa"] = True
            else:
                group = query.shape[1] // key.shape[1]
                key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        return varlen_attn(query, key, value, offsets, offsets, longest, longest, scale=scale, **options)

    return attend


def uses_varlen(query: torch.Tensor, dropout: float) -> bool:
    """The varlen kernel is flash attention: CUDA, half precision, no attention dropout."""
    return (query.device.type == "cuda" and query.dtype in (torch.bfloat16, torch.float16) and dropout == 0.0
            and varlen_kernel() is not None)


def varlen_packed_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, position_ids: torch.Tensor, scaling: float | None,
    kernel: VarlenKernel,
) -> torch.Tensor:
    """The whole packed batch in one kernel call: (B, H, T, D) queries -> (B, T, H, D) outputs.

    The rows are laid end to end as one (B*T, heads, D) sequence (a free view: transformers made the
    (B, H, T, D) tensors by transposing (B, T, H, D) projections) and `offsets` marks every record's
    start in it, so no record attends across a record or row boundary.
    """
    batch, heads, length, dim = query.shape
    offsets, longest = _record_lengths.offsets_of(position_ids)

    def flat(tensor: torch.Tensor) -> torch.Tensor:  # (B, h, T, D) -> (B*T, h, D)
        return tensor.transpose(1, 2).reshape(batch * length, tensor.shape[1], dim)

    return kernel(flat(query), flat(key), flat(value), offsets, longest, scaling).reshape(batch, length, heads, dim)


def autocast_inputs(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention inputs in the autocast dtype where autocast is on, as autocast casts SDPA's: float32 weights
    give float32 queries under a bf16 autocast (the rotary embedding's float32 cos / sin promote them), and the
    half-precision kernels here choose by the inputs' dtype."""
    device = query.device.type
    if not torch.is_autocast_enabled(device):
        return query, key, value
    dtype = torch.get_autocast_dtype(device)
    return query.to(dtype), key.to(dtype), value.to(dtype)


@torch.compiler.disable  # record lengths change per batch: `train.compile` leaves attention eager
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
    """transformers' attention-function contract: returns the output as (B, T, H, D) and no weights.

    Records are cut out with unbind/split rather than slicing: their backward is one concatenation,
    where each slice's backward would zero-fill a gradient the size of the whole (B, H, T, D) tensor.
    A sliding-window layer (Mistral, Gemma 3, ...) whose window is shorter than a record takes the masked SDPA
    path, whose mask holds the window: the per-record kernels here attend to every earlier position.
    """
    window = kwargs.get("sliding_window")
    if not (module.training and is_packed(position_ids, query, key)) or (
            window is not None and max(max(row) for row in _record_lengths.of(position_ids)) > window):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    query, key, value = autocast_inputs(query, key, value)
    if uses_varlen(query, dropout):
        return varlen_packed_attention(query, key, value, position_ids, scaling, varlen_kernel()), None
    rows = []
    for row_query, row_key, row_value, lengths in zip(
        query.unbind(0), key.unbind(0), value.unbind(0), _record_lengths.of(position_ids), strict=True
    ):  # (H, T, D), (Hkv, T, D), (Hkv, T, D)
        pieces = [
            record_attention(record_query.unsqueeze(0), record_key.unsqueeze(0), record_value.unsqueeze(0), dropout,
                             scaling)  # (1, H, L, D)
            for record_query, record_key, record_value in zip(
                row_query.split(lengths, dim=1), row_key.split(lengths, dim=1), row_value.split(lengths, dim=1),
                strict=True,
            )
        ]
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def packed_rows_mask(*args, **kwargs) -> torch.Tensor | None:
    """SDPA's mask, always as a materialised tensor: when no row of a batch restarts (one whole record per
    row) transformers would pass None, or a broadcast view, and a compiled layer that saw one kind would
    be traced again for the other. Packed training ignores the mask; the SDPA fallback (evaluation
    inside the block) reads it."""
    mask = sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})
    return None if mask is None else mask.contiguous()


AttentionInterface.register(NAME, packed_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, packed_rows_mask)


# --- rows under a causal additive mask (branched rows: objectives/branched_rows.py) ---------------------------------

MASKED_NAME = "tunesmith_masked_sdpa"


class _CausalMasks(threading.local):
    """Whether the forward's additive mask is causal (nothing above its diagonal can be seen), read once per
    forward: every layer receives the same mask tensor. Also each query block's bias, cut from the mask and laid
    out for the grouped query heads, built once per forward rather than once per layer. One per thread
    (`train.parallel_rows`)."""

    def __init__(self):
        self.mask: weakref.ref | None = None
        self.causal = False
        self.biases: dict[tuple, torch.Tensor] = {}

    def is_causal(self, mask: torch.Tensor) -> bool:
        if self.mask is None or self.mask() is not mask:
            length = mask.shape[-1]
            above = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu(1)
            self.causal = bool((mask[..., above] == torch.finfo(mask.dtype).min).all())
            self.mask = weakref.ref(mask)
            self.biases = {}
        return self.causal

    def block_bias(self, mask: torch.Tensor, start: int, end: int, key_heads: int, groups: int) -> torch.Tensor:
        """(B * Hkv, groups * (end - start), end): the mask's rows start..end over the keys up to `end`, repeated
        for each query head of a key head's group, for each key head."""
        key = (start, end, key_heads, groups)
        if key not in self.biases:
            rows = mask[:, 0, start:end, :end].repeat(1, groups, 1)  # (B, G*(end-start), end)
            self.biases[key] = rows[:, None].expand(-1, key_heads, -1, -1).reshape(-1, *rows.shape[1:])
        return self.biases[key]


_causal_masks = _CausalMasks()


def masked_attention_by_matmul(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """Attention of rows (B, H, L, D) from (B, Hkv, L, D) keys and values under a causal additive mask
    (B, 1, L, L): `attention_by_matmul` with the mask's blocks as the bias. Returns (B, H, L, D)."""
    key_heads = key.shape[1]
    return attention_by_matmul(
        query, key, value, scaling,
        lambda start, end, groups: _causal_masks.block_bias(mask, start, end, key_heads, groups))


def takes_masked_matmul(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, dropout: float) -> bool:
    """Half precision on the CPU (where PyTorch's masked SDPA kernel is slow: one layer of two 958-token pair
    rows, 9 heads, forward + backward in bf16, 92-104 ms against 40-42 ms here), whole rows of at most
    MATMUL_ATTENTION_MAX_LENGTH (the kernel keeps each block's probabilities for the backward, which grow with the
    square of the length; SDPA keeps none), no dropout, and an additive causal mask of the rows' full size."""
    return (query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16) and dropout == 0.0
            and mask is not None and mask.dtype == query.dtype and mask.dim() == 4 and mask.shape[1] == 1
            and query.shape[2] == key.shape[2] == mask.shape[2] == mask.shape[3] <= MATMUL_ATTENTION_MAX_LENGTH
            and _causal_masks.is_causal(mask))


@torch.compiler.disable
def masked_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (B, H, T, D)
    key: torch.Tensor,  # (B, Hkv, T, D)
    value: torch.Tensor,  # (B, Hkv, T, D)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract (output (B, T, H, D), no weights): `masked_attention_by_matmul`
    where it applies (`takes_masked_matmul`), transformers' SDPA function otherwise (`autocast_inputs` first)."""
    query, key, value = autocast_inputs(query, key, value)
    if not takes_masked_matmul(query, key, attention_mask, dropout):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return masked_attention_by_matmul(query, key, value, attention_mask, scaling).transpose(1, 2).contiguous(), None


AttentionInterface.register(MASKED_NAME, masked_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(MASKED_NAME, sdpa_mask)


@contextmanager
def step_attention(model: torch.nn.Module, packed: bool, masked: bool):
    """Inside the block (a training step), attention for the step's rows: per record for `packed` rows
    (`packed_sdpa_attention`), or with `masked` the masked-rows kernel wherever a forward passes a causal additive
    mask (`masked_sdpa_attention`: a preference pair's or an rl group's branched rows); SDPA again after it (so
    exported configs and later evaluation or generation are untouched). Set once for the step, not per forward:
    `train.parallel_rows` runs forwards of one model in several threads."""
    base = unwrapped_model(model)
    previous = base.config._attn_implementation
    if previous != "sdpa" or not (packed or masked):  # eager / flash kernels chosen by the user are left alone
        yield
        return
    base.set_attn_implementation(NAME if packed else MASKED_NAME)
    try:
        yield
    finally:
        base.set_attn_implementation(previous)


def packed_attention(model: torch.nn.Module):
    """The per-record attention of packed rows inside the block (`step_attention`)."""
    return step_attention(model, packed=True, masked=False)
