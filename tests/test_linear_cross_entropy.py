"""The fused linear cross-entropy against autograd through the head and `F.cross_entropy`: the same losses and
gradients (hidden states, head weight and bias), and no head matmul left for the backward pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from tunesmith.data.collate import IGNORE_INDEX
from tunesmith.objectives import linear_cross_entropy
from tunesmith.objectives.causal_lm import _chunk_cross_entropy_sum, chunked_cross_entropy_sum
from tunesmith.objectives.linear_cross_entropy import (
    MATMUL_ROW_MULTIPLE,
    fusable_head,
    linear_cross_entropy_eval,
    linear_cross_entropy_row_sums,
    linear_cross_entropy_sum,
)

HIDDEN, VOCAB = 24, 70


def case(positions: int, dtype: torch.dtype, bias: bool, weighted: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=generator) * 0.5)
    hidden = torch.randn(positions, HIDDEN, generator=generator).to(dtype)
    targets = torch.randint(0, VOCAB, (positions,), generator=generator)
    targets[::4] = -100  # ignored positions, as prompts and padding are
    weights = torch.rand(positions, generator=generator) if weighted else None
    return head, hidden, targets, weights


def loss_and_gradients(loss_fn, head, hidden, targets, weights, autocast: bool) -> list[torch.Tensor]:
    head.zero_grad()
    hidden = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(hidden, head, targets, weights)
    (loss * 0.37).backward()  # a scaled loss, as the loop divides by the step's token count
    grads = [loss.detach(), hidden.grad, head.weight.grad]
    return grads + ([head.bias.grad] if head.bias is not None else [])


def reference(hidden, head, targets, weights):
    losses = F.cross_entropy(head(hidden).float(), targets, reduction="none")
    return losses.sum() if weights is None else (losses * weights).sum()


def fused(chunk):
    return lambda hidden, head, targets, weights: linear_cross_entropy_sum(hidden, head, targets, chunk, weights)


@pytest.mark.parametrize("chunk", [None, 5, 64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_float32_equals_autograd(chunk, bias, weighted):
    """Chunks of 5 end on a short one (23 positions)."""
    head, hidden, targets, weights = case(23, torch.float32, bias, weighted)
    ours = loss_and_gradients(fused(chunk), head, hidden, targets, weights, autocast=False)
    expected = loss_and_gradients(reference, head, hidden, targets, weights, autocast=False)
    for value, wanted in zip(ours, expected, strict=True):
        torch.testing.assert_close(value, wanted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_dtype, autocast", [(torch.float32, True), (torch.bfloat16, False)])
def test_bfloat16_equals_autograd(model_dtype, autocast, monkeypatch):
    """Under bf16 autocast (float32 weights) and for a bf16 model: the matmuls in bf16, the softmax in float32
    (in blocks of 7 rows in one float32 buffer, chunks of 16: neither divides 40), the gradients in the
    parameters' dtypes, as autograd computes them."""
    monkeypatch.setattr(linear_cross_entropy, "SOFTMAX_BLOCK_ELEMENTS", 7 * VOCAB)
    head, hidden, targets, weights = case(40, model_dtype, False, True)
    ours = loss_and_gradients(fused(16), head, hidden, targets, weights, autocast)
    expected = loss_and_gradients(reference, head, hidden, targets, weights, autocast)
    for value, wanted in zip(ours, expected, strict=True):
        assert value.dtype == wanted.dtype
        torch.testing.assert_close(value, wanted, atol=2e-2, rtol=2e-2)  # bf16 rounding of the grad order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_chunks_logits_are_freed_before_the_next_chunks_exist(dtype):
    """One chunk's (C, V) logits at a time: a chunk's logits (its gradient, written over them) are gone before the
    next chunk's softmax runs, so a micro-batch of several chunks peaks at one chunk's logits, not two."""
    import weakref

    from tunesmith.objectives.linear_cross_entropy import softmax_cross_entropy

    head, hidden, targets, _ = case(40, dtype, bias=False, weighted=False)
    earlier: list[weakref.ref] = []

    def watched(logits, targets, scale, workspace=None, gradient=True):
        assert all(ref() is None for ref in earlier), "an earlier chunk's logits are still alive"
        earlier.append(weakref.ref(logits if logits._base is None else logits._base))
        return softmax_cross_entropy(logits, targets, scale, workspace, gradient)

    hidden = hidden.clone().requires_grad_()
    linear_cross_entropy_sum(hidden, head, targets, 8, chunk_loss=watched).backward()
    assert len(earlier) == 5 and hidden.grad is not None


def test_only_the_gradients_asked_for():
    """A frozen head gets no gradient (LoRA); hidden states that need none (a head trained alone) get none."""
    head, hidden, targets, _ = case(10, torch.float32, False, False)
    head.weight.requires_grad_(False)
    hidden = hidden.clone().requires_grad_()
    linear_cross_entropy_sum(hidden, head, targets, 4).backward()
    assert head.weight.grad is None and hidden.grad is not None
    head.weight.requires_grad_(True)
    frozen_hidden = hidden.detach()
    linear_cross_entropy_sum(frozen_hidden, head, targets, 4).backward()
    assert head.weight.grad is not None and frozen_hidden.grad is None


class LogitGradientOps(TorchDispatchMode):
    """The ops that only the logit gradient needs: the one-hot subtraction and the scaling."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.scatter_add_, torch.ops.aten.mul_):
            self.calls.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_gradients_only_the_loss(dtype, monkeypatch):
    """Evaluation computes the loss alone: no logit gradient (in bf16 through float32 blocks of 3 rows)."""
    monkeypatch.setattr(linear_cross_entropy, "SOFTMAX_BLOCK_ELEMENTS", 3 * VOCAB)
    head, hidden, targets, weights = case(17, dtype, True, True)
    with torch.no_grad(), LogitGradientOps() as gradient_ops:
        loss = linear_cross_entropy_sum(hidden, head, targets, 8, weights)
    assert loss.grad_fn is None and gradient_ops.calls == []
    torch.testing.assert_close(loss, reference(hidden, head, targets, weights), rtol=1e-5, atol=1e-5)
    with LogitGradientOps() as gradient_ops:  # the control: training computes it
        linear_cross_entropy_sum(hidden.clone().requires_grad_(), head, targets, 8, weights)
    assert "scatter_add_" in gradient_ops.calls


def test_no_positions_is_a_zero_loss_with_zero_gradients():
    head, hidden, targets, _ = case(0, torch.float32, False, False)
    hidden = hidden.clone().requires_grad_()
    loss = linear_cross_entropy_sum(hidden, head, targets, 8)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(head.weight.grad) == 0


def test_a_second_backward_is_refused():
    head, hidden, targets, _ = case(9, torch.float32, False, False)
    loss = linear_cross_entropy_sum(hidden.requires_grad_(), head, targets, 4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already used"):
        loss.backward()


class VocabularyMatmuls(TorchDispatchMode):
    """The number of positions of each matmul whose output is (C, V) logits."""

    def __init__(self):
        super().__init__()
        self.positions = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm) and out.shape[-1] == VOCAB:
            self.positions.append(out.shape[0])
        return out


def test_the_backward_pass_runs_no_head_matmul():
    """The forward pass computes logits for at most a chunk of positions at a time, and each chunk's gradients
    with them: the backward pass runs no head matmul (checkpointed chunks recomputed each chunk's logits there).
    Both for the fused loss and for a head that is not a plain Linear, or has a forward hook, which runs through
    autograd a chunk at a time; the control, checkpointed chunks, recomputes them last one first."""
    head, hidden, targets, _ = case(30, torch.float32, False, False)
    hooked = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    hooked.load_state_dict(head.state_dict())
    calls = []
    hooked.register_forward_hook(lambda module, inputs, output: calls.append(output.shape[0]))
    assert fusable_head(head) and not fusable_head(torch.nn.Sequential(head)) and not fusable_head(hooked)

    def checkpointed(hidden, module, targets, chunk_tokens):
        pieces = zip(hidden.split(chunk_tokens), targets.split(chunk_tokens), strict=True)
        return sum(checkpoint(_chunk_cross_entropy_sum, piece, piece_targets, module, use_reentrant=False)
                   for piece, piece_targets in pieces)

    matmuls = {}
    for name, module, loss_of in (("fused", head, chunked_cross_entropy_sum),
                                  ("wrapped", hooked, chunked_cross_entropy_sum),
                                  ("checkpointed", hooked, checkpointed)):
        with VocabularyMatmuls() as forward:
            loss = loss_of(hidden.clone().requires_grad_(), module, targets, 8)
        with VocabularyMatmuls() as backward:
            loss.backward()
        matmuls[name] = (forward.positions, backward.positions)
    assert matmuls == {"fused": ([8, 8, 8, 6], []), "wrapped": ([8, 8, 8, 6], []),
                       "checkpointed": ([8, 8, 8, 6], [6, 8, 8, 8])}
    assert calls == [8, 8, 8, 6] + [8, 8, 8, 6, 6, 8, 8, 8]  # the hook saw each chunk's forward once when wrapped


def test_wrapped_head_equals_the_fused_loss():
    head, hidden, targets, weights = case(23, torch.float32, False, True)
    results = []
    for module in (head, torch.nn.Sequential(head)):
        head.zero_grad()
        leaf = hidden.clone().requires_grad_()
        loss = chunked_cross_entropy_sum(leaf, module, targets, 5, weights)
        loss.backward()
        results.append([loss.detach(), leaf.grad, head.weight.grad])
    for value, wanted in zip(*results, strict=True):
        torch.testing.assert_close(value, wanted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_evaluation_counts_the_argmax_hits(dtype, monkeypatch):
    """Evaluation's loss and token-accuracy count, chunks of 6 (bf16: float32 blocks of 4 rows), against the whole
    logits: argmax taken before the softmax works over them, ignored targets counted in neither."""
    monkeypatch.setattr(linear_cross_entropy, "SOFTMAX_BLOCK_ELEMENTS", 4 * VOCAB)
    head, hidden, targets, _ = case(21, dtype, True, False)
    logits = head(hidden)  # (N, V)
    targets[:9] = logits[:9].argmax(-1)  # some hits
    targets[1] = IGNORE_INDEX  # a hit that must not count
    with torch.no_grad():
        loss, correct = linear_cross_entropy_eval(hidden, head, targets, 6)
    kept = targets != IGNORE_INDEX
    assert int(correct) == int((logits[kept].argmax(-1) == targets[kept]).sum()) == 8
    torch.testing.assert_close(loss, reference(hidden, head, targets, None), rtol=1e-5, atol=1e-5)


class WeightGradientBuffers(TorchDispatchMode):
    """How many zero-filled (VOCAB, HIDDEN) tensors (a head weight's gradient, summed over chunks) are made under
    this mode."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        zeros = func.overloadpacket in (torch.ops.aten.zeros_like, torch.ops.aten.zeros, torch.ops.aten.new_zeros)
        if zeros and tuple(out.shape) == (VOCAB, HIDDEN):
            self.count += 1
        return out


@pytest.mark.parametrize("trained_head", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_row_sums_equal_autograd_and_a_trained_head_holds_no_gradient_per_row(trained_head, autocast):
    """Per-row sums (dpo's sequence log-probs: rows of 7, 0, 12 and 11 positions, chunks of 5) against autograd,
    under an incoming gradient that differs per row; a trained head's weight gradient is made in the backward
    pass, once for all rows (in the forward pass each row would hold one), a frozen head's rows get theirs in the
    forward pass (no head matmul in the backward)."""
    rows = [7, 0, 12, 11]
    head, hidden, targets, _ = case(sum(rows), torch.float32, True, False)
    head.requires_grad_(trained_head)
    per_row = torch.tensor([0.5, -1.0, 2.0, 0.25])

    def sums_and_gradients(row_sums_of) -> tuple[list[torch.Tensor], int, list[int]]:
        head.zero_grad()
        leaf = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), WeightGradientBuffers() as forward:
            sums = row_sums_of(leaf)
        with VocabularyMatmuls() as backward:
            (sums * per_row).sum().backward()
        trained = [head.weight.grad, head.bias.grad] if trained_head else []
        return [sums.detach(), leaf.grad, *trained], forward.count, backward.positions

    def autograd_row_sums(leaf):
        return torch.stack([F.cross_entropy(head(row).float(), row_targets, reduction="sum")
                            for row, row_targets in zip(leaf.split(rows), targets.split(rows), strict=True)])

    ours, forward_buffers, backward_matmuls = sums_and_gradients(
        lambda leaf: linear_cross_entropy_row_sums(leaf, head, targets, rows, 5))
    expected, _, _ = sums_and_gradients(autograd_row_sums)
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if autocast else {"atol": 1e-5, "rtol": 1e-5}
    for value, wanted in zip(ours, expected, strict=True):
        torch.testing.assert_close(value, wanted, **tolerance)
    assert forward_buffers == 0
    # the rows' 30 positions in chunks of 5, each rounded up to MATMUL_ROW_MULTIPLE rows in bf16 on the CPU
    chunk = MATMUL_ROW_MULTIPLE if autocast else 5
    assert backward_matmuls == ([chunk] * 6 if trained_head else [])
