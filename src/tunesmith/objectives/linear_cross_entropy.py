"""Cross-entropy of a linear output head, fused: each chunk's logits exist only inside the forward pass.

The gradient of cross-entropy with respect to the logits is known as soon as the loss is: softmax(z) minus
the one-hot target. So for each chunk of positions the forward pass computes the logits, the loss and at
once the gradients the head passes back (to the hidden states, and to the head's weight when it is
trained), then frees the logits. The backward pass only scales those gradients by the loss's incoming
gradient. Against autograd through `head(hidden).float()` and `cross_entropy` (checkpointed per chunk):
- no second head matmul per chunk in the backward pass (a checkpointed chunk ran its forward again);
- one exp per logit instead of two (log_softmax's forward and its backward), and no (C, V) zero-filled
  gradient from nll_loss's backward: the gradient is written over the logits, so a chunk takes two fresh
  (C, V) buffers (the logits, and their float32 copy in half precision) instead of six. On the CPU a fresh
  buffer of that size costs a page fault per 4 KiB, so fewer buffers is most of the saving.

The maths is the unfused path's: the matmuls run in the autocast dtype where autocast is on (else in the
hidden states' dtype), the softmax in float32, and the gradients are rounded where autograd rounds them
(tests/test_linear_cross_entropy.py compares losses and gradients with autograd).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torch.nn.modules.module as nn_module
from torch.autograd.function import once_differentiable

from tunesmith.data.collate import IGNORE_INDEX
from tunesmith.training.weight_casts import cast_weight

SoftmaxCrossEntropy = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def softmax_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, workspace: torch.Tensor | None = None,
    gradient: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross-entropy of (C, V) logits against (C,) targets, each row's loss times `scale` (C,), and
    the gradient of that sum with respect to the logits, in the logits' dtype. Rows with a zero scale (ignored
    targets) add nothing and get a zero gradient. The gradient is written over `logits` (no fresh buffer).
    Half-precision logits are worked on in float32: in `workspace` (C, V) where given, else in a new copy.
    `gradient=False` (evaluation): the loss only; `logits` are then left as they are, or overwritten where they
    are float32 and serve as the workspace."""
    index = targets.clamp(min=0)[:, None]  # (C, 1): ignored targets point at class 0, their scale is 0
    picked = logits.gather(1, index).float()  # (C, 1) the target's logit
    # float32, as cross_entropy(logits.float()); float32 logits are worked on in place
    exps = logits.float() if workspace is None else workspace.copy_(logits)  # (C, V)
    top = exps.amax(-1, keepdim=True)  # (C, 1)
    exps.sub_(top).exp_()
    total = exps.sum(-1, keepdim=True)  # (C, 1)
    losses = top + total.log() - picked  # (C, 1): logsumexp minus the target's logit
    loss_sum = (losses.squeeze(1) * scale).sum()
    if not gradient:
        return loss_sum, logits
    # d loss / d logits = (softmax - onehot(target)) * scale = (exps - total * onehot) * (scale / total)
    exps.scatter_add_(1, index, -total)
    exps.mul_(scale[:, None] / total)
    return loss_sum, logits.copy_(exps)


# On the CPU the float32 softmax of half-precision logits runs over blocks of at most this many logits (1 MiB),
# all in one float32 buffer: a float32 copy of the whole chunk would be a fresh mapping each time (glibc maps
# large blocks; a page fault per 4 KiB of it), and a block this small stays in the core's L2 cache through the
# softmax's eight passes over it. 448 positions, vocabulary 49,152, bfloat16, one thread, best of 3: 30.3-32.8 ms
# in blocks of 85 rows (16 MiB, the size before), 31.1 in 16 rows, 22.7 in 4 rows (this size: 5); in training
# (`bench/train_throughput.py --precision bf16`) +2.6-3.3% tokens/s. GPUs take the chunk whole,
# and so does the compiled loss (train.compile: no float32 buffer exists in its fused kernels).
SOFTMAX_BLOCK_ELEMENTS = 1 << 18


def _softmax_rows(
    device: torch.device, dtype: torch.dtype, vocabulary: int, chunk_loss: SoftmaxCrossEntropy
) -> int | None:
    """How many rows of (C, V) logits one float32 softmax block takes; None: the whole chunk."""
    if device.type != "cpu" or dtype == torch.float32 or chunk_loss is not softmax_cross_entropy:
        return None
    return max(SOFTMAX_BLOCK_ELEMENTS // vocabulary, 1)


# On the CPU in half precision, oneDNN builds (JIT-compiles) a matmul kernel for each new shape and caches it: the
# head's forward and backward for a new number of positions took 5-8 and 12-23 ms to build, against 20-25 ms to
# run each (SmolLM2-135M, 600-900 positions, one thread); and with packed rows almost every chunk brings a new
# count. Rounded up to a multiple of this, a run meets at most loss_chunk_tokens / 64 shapes, built once each,
# for at most 63 rows more of the two matmuls. Float32 CPU matmuls (no kernels built per shape) and GPUs take
# the chunk as it is.
MATMUL_ROW_MULTIPLE = 64


def _matmul_rows(chunk: torch.Tensor) -> torch.Tensor:
    """`chunk` (C, H) with zero rows added up to a multiple of MATMUL_ROW_MULTIPLE where that saves building
    kernels (half precision on the CPU); as it is elsewhere. A matmul's output row depends only on its input row,
    so the first C rows of the logits are the same either way."""
    if chunk.device.type != "cpu" or chunk.dtype not in (torch.bfloat16, torch.float16):
        return chunk
    extra = -chunk.shape[0] % MATMUL_ROW_MULTIPLE
    return F.pad(chunk, (0, 0, 0, extra)) if extra else chunk


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _chunk_bounds(positions: int, chunk_tokens: int | None) -> list[tuple[int, int]]:
    size = positions if chunk_tokens is None else chunk_tokens
    return [(start, min(start + size, positions)) for start in range(0, positions, max(size, 1))]


def _loss_and_gradients(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    scale: torch.Tensor, chunk_tokens: int | None, needs: tuple[bool, bool, bool], chunk_loss: SoftmaxCrossEntropy,
    correct: torch.Tensor | None = None, dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The summed loss and the gradients of it that `needs` asks for (hidden, weight, bias), chunk by chunk.
    `correct` (evaluation), a counter: the positions whose most likely token is their target are added to it.
    `dtype`: the matmuls' (default: autocast's where it is on, else the hidden states')."""
    dtype = dtype or _compute_dtype(hidden)
    matmul_weight = cast_weight(weight, dtype)  # (V, H): cast once, not per chunk (training/weight_casts.py)
    matmul_bias = None if bias is None else bias.to(dtype)
    need_hidden, need_weight, need_bias = needs
    grad_hidden = torch.empty_like(hidden) if need_hidden else None  # (N, H)
    grad_weight = torch.zeros_like(weight) if need_weight else None  # (V, H)
    grad_bias = torch.zeros_like(bias) if need_bias else None  # (V,)
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    block_rows = _softmax_rows(hidden.device, dtype, weight.shape[0], chunk_loss)
    workspace = None  # (block_rows, V) float32, one for every block of every chunk of the call
    with torch.autocast(hidden.device.type, enabled=False):
        for start, end in _chunk_bounds(hidden.shape[0], chunk_tokens):
            chunk = _matmul_rows(hidden[start:end].to(dtype))  # (C', H): C' >= C, any rows past C zero
            logits = F.linear(chunk, matmul_weight, matmul_bias)  # (C', V)
            if correct is not None:  # before the softmax works over the logits
                correct += (logits[: end - start].argmax(-1) == targets[start:end]).sum()
            rows = block_rows or end - start
            blocks = range(start, end, rows)
            if len(blocks) > 1 and workspace is None:
                workspace = logits.new_empty((rows, logits.shape[1]), dtype=torch.float32)
            for first in blocks:  # each block's gradient is written over its logits
                last = min(first + rows, end)
                block_workspace = None if len(blocks) == 1 else workspace[: last - first]
                loss_sum += chunk_loss(logits[first - start : last - start], targets[first:last], scale[first:last],
                                       workspace=block_workspace, gradient=any(needs))[0]
            grad_logits = logits  # (C', V)
            grad_logits[end - start :].zero_()  # the added rows: no loss, no gradient
            if grad_hidden is not None:  # (C, H), rounded to hidden's dtype
                grad_hidden[start:end] = (grad_logits @ matmul_weight)[: end - start]
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ chunk).to(weight.dtype)  # (V, H)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0).to(bias.dtype)
            # Freed before the next chunk's matmul (no other name holds them: the chunk loss's returned gradient is
            # not kept), which would otherwise make its logits while these live: two (C, V) buffers at once.
            del logits, grad_logits
    return loss_sum, grad_hidden, grad_weight, grad_bias


class _KnownGradients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, gradients, *inputs):
        ctx.gradients = gradients
        return value.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.gradients is None:
            raise RuntimeError("a fused loss's gradients were already used: backward through it once (retain_graph "
                               "is not supported)")
        gradients, ctx.gradients = ctx.gradients, None  # freed with this pass; scaled in place
        return None, None, *(None if gradient is None else gradient.mul_(grad_output) for gradient in gradients)


def with_known_gradients(
    value: torch.Tensor, inputs: Sequence[torch.Tensor | None], gradients: Sequence[torch.Tensor | None]
) -> torch.Tensor:
    """`value` (computed without a graph) differentiable in `inputs`, whose gradients of it, `gradients`, were
    computed with it in the forward pass (None: not needed): the backward pass only scales them by the incoming
    gradient, once."""
    return _KnownGradients.apply(value, list(gradients), *inputs)


class _RowSumsDeferred(torch.autograd.Function):
    """Summed cross-entropy per row, whose gradients are computed in the backward pass, where each position's
    weight in them (its row's incoming gradient) is known: one pass over the chunks then gives the head's whole
    weight gradient. Computed in the forward pass, each row's sum would hold a (V, H) weight gradient of its own
    until the backward (full fine-tuning's dpo: 2 x batch of them)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, row_sizes, chunk_tokens, chunk_loss):
        ctx.dtype = _compute_dtype(hidden)  # the backward runs outside autocast: its matmuls as the forward's
        ctx.row_sizes, ctx.chunk_tokens, ctx.chunk_loss = row_sizes, chunk_tokens, chunk_loss
        ctx.save_for_backward(hidden, weight, bias, targets)
        # Cast once for all rows (float32 weights under autocast), not once per row.
        matmul_weight, matmul_bias = cast_weight(weight, ctx.dtype), None if bias is None else bias.to(ctx.dtype)
        row_sums = []
        for row_hidden, row_targets in zip(hidden.split(row_sizes), targets.split(row_sizes), strict=True):
            scale = (row_targets != IGNORE_INDEX).float()
            row_sum, *_ = _loss_and_gradients(row_hidden, matmul_weight, matmul_bias, row_targets, scale, chunk_tokens,
                                              (False, False, False), chunk_loss, dtype=ctx.dtype)
            row_sums.append(row_sum)
        return torch.stack(row_sums) if row_sums else hidden.new_zeros(0, dtype=torch.float32)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        hidden, weight, bias, targets = ctx.saved_tensors
        sizes = torch.tensor(ctx.row_sizes, device=grad_rows.device)
        scale = grad_rows.repeat_interleave(sizes) * (targets != IGNORE_INDEX).float()  # (N,) each row's gradient
        _, *gradients = _loss_and_gradients(hidden, weight, bias, targets, scale, ctx.chunk_tokens,
                                            tuple(ctx.needs_input_grad[:3]), ctx.chunk_loss, dtype=ctx.dtype)
        return (*gradients, None, None, None, None)


def linear_cross_entropy_row_sums(
    hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, row_sizes: list[int],
    chunk_tokens: int | None, chunk_loss: SoftmaxCrossEntropy = softmax_cross_entropy,
) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` (N, H) against `targets` (N,) over each row's positions (R,), the
    rows `row_sizes` consecutive positions each, with the logits of at most `chunk_tokens` positions at a time.
    A frozen head: each row's gradients (to its hidden states) computed in the forward pass, as
    `linear_cross_entropy_sum`. A trained head (full fine-tuning): computed in the backward pass
    (`_RowSumsDeferred`: one more head matmul per chunk, one weight gradient for all rows)."""
    trained_head = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in (head.weight, head.bias)
    )
    if trained_head:
        return _RowSumsDeferred.apply(hidden, head.weight, head.bias, targets, row_sizes, chunk_tokens, chunk_loss)
    return torch.stack([
        linear_cross_entropy_sum(row_hidden, head, row_targets, chunk_tokens, chunk_loss=chunk_loss)
        for row_hidden, row_targets in zip(hidden.split(row_sizes), targets.split(row_sizes), strict=True)
    ]) if row_sizes else hidden.new_zeros(0, dtype=torch.float32)


def fusable_head(head: torch.nn.Module) -> bool:
    """Whether `head` is a plain linear layer whose weight the fused loss may read directly: no adapter or
    wrapper with a forward of its own, and no forward hooks (the fused loss never calls the head's forward,
    so a hook that watches or changes its output would be skipped)."""
    hooks = (head._forward_hooks, head._forward_pre_hooks, nn_module._global_forward_hooks,
             nn_module._global_forward_pre_hooks)
    return type(head) is torch.nn.Linear and not any(hooks)


def linear_cross_entropy_sum(
    hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, chunk_tokens: int | None,
    weights: torch.Tensor | None = None, chunk_loss: SoftmaxCrossEntropy = softmax_cross_entropy,
) -> torch.Tensor:
    """Sum over N positions of the cross-entropy of `head(hidden)` (N, H) against `targets` (N,), each
    position's loss times `weights` (N,) if given; positions whose target is IGNORE_INDEX add nothing. The
    logits exist for at most `chunk_tokens` positions at a time (all N if None) and never in the backward
    pass. Without gradients to compute (evaluation, reference passes) only the losses are."""
    scale = (targets != IGNORE_INDEX).float()  # (N,)
    if weights is not None:
        scale = scale * weights.float()
    differentiable = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in (hidden, head.weight, head.bias)
    )
    if differentiable:
        inputs = (hidden, head.weight, head.bias)
        needs = tuple(tensor is not None and tensor.requires_grad for tensor in inputs)
        with torch.no_grad():
            loss_sum, *gradients = _loss_and_gradients(
                hidden, head.weight, head.bias, targets, scale, chunk_tokens, needs, chunk_loss
            )
        return with_known_gradients(loss_sum, inputs, gradients)
    loss_sum, *_ = _loss_and_gradients(
        hidden, head.weight, head.bias, targets, scale, chunk_tokens, (False, False, False), chunk_loss
    )
    return loss_sum


def linear_cross_entropy_eval(
    hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, chunk_tokens: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation, without gradients: the summed cross-entropy of `head(hidden)` (N, H) against `targets` (N,)
    and how many of the N positions' most likely tokens (argmax: the first of tied maxima) are their targets
    (ignored targets add to neither), with the logits of at most `chunk_tokens` positions at a time, as in training."""
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    scale = (targets != IGNORE_INDEX).float()  # (N,)
    with torch.no_grad():
        loss_sum, *_ = _loss_and_gradients(
            hidden, head.weight, head.bias, targets, scale, chunk_tokens, (False, False, False),
            softmax_cross_entropy, correct,
        )
    return loss_sum, correct
