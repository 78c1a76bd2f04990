"""Per-record attention for packed rows equals transformers' block-diagonal SDPA: outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from tunesmith.training import packed_attention as attention_module
from tunesmith.training.packed_attention import (
    NAME,
    causal_attention_by_matmul,
    masked_attention_by_matmul,
    packed_attention,
    record_spans,
    takes_masked_matmul,
)


def packed_batch(vocab: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    lengths = [[5, 9, 2], [7, 6, 3]]  # two rows of 16 tokens, the last "record" of row 1 is padding-like
    positions = torch.tensor([[p for length in row for p in range(length)] for row in lengths])  # (2, 16)
    return {"input_ids": torch.randint(3, vocab, (2, 16), generator=generator), "position_ids": positions}


def forward_and_grads(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(**batch, use_cache=False).logits  # (B, T, V)
    (logits.float() ** 2).mean().backward()
    return logits.detach(), [parameter.grad.clone() for parameter in model.parameters() if parameter.grad is not None]


def test_record_spans_restart_at_zero():
    assert record_spans(torch.tensor([0, 1, 2, 0, 1, 0])) == [(0, 3), (3, 5), (5, 6)]
    assert record_spans(torch.tensor([3, 4, 0, 1])) == [(0, 2), (2, 4)]  # a row starting mid-record


def test_per_record_attention_equals_the_block_diagonal_mask(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa").train()
    batch = packed_batch(model.config.vocab_size)
    masked_logits, masked_grads = forward_and_grads(model, batch)
    with packed_attention(model):
        assert model.config._attn_implementation == NAME
        packed_logits, packed_grads = forward_and_grads(model, batch)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(packed_logits, masked_logits, atol=1e-5, rtol=1e-4)
    for packed, masked in zip(packed_grads, masked_grads, strict=True):
        torch.testing.assert_close(packed, masked, atol=1e-5, rtol=1e-4)
    # and both differ from attending across the whole row (the mask is doing something)
    whole_row = model(input_ids=batch["input_ids"], use_cache=False).logits.detach()
    assert not torch.allclose(whole_row, masked_logits, atol=1e-3)


def test_eval_mode_and_unpacked_batches_take_the_sdpa_path(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa").eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as in generation
    expected = model(input_ids=ids, attention_mask=mask).logits
    with packed_attention(model):
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected)


def test_packed_training_matches_the_masked_kernel_and_exports_plain_sdpa(tiny_llama_dir, tmp_path):
    from helpers import chat_records, run_config, write_jsonl
    from safetensors.torch import load_file

    from tunesmith.training import train

    train_file = write_jsonl(tmp_path / "chats.jsonl", chat_records(16))
    weights = {}
    for kernel in ("sdpa", "eager"):  # eager keeps the block-diagonal mask: the reference
        config = run_config(tiny_llama_dir, train_file, tmp_path / kernel, data={"packing": True},
                            model={"attn_implementation": kernel},
                            train={"max_steps": 3, "batch_size": 2, "mixed_precision": "no"})
        result = train(config)
        assert NAME not in (result.run_dir / "model" / "config.json").read_text()
        weights[kernel] = load_file(result.run_dir / "model" / "model.safetensors")
    for name, value in weights["sdpa"].items():
        torch.testing.assert_close(value, weights["eager"][name], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("blocks_from", [1000, 6], ids=["one block", "query blocks"])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_matmul_attention_equals_the_causal_sdpa_kernel(dtype, tolerance, blocks_from, monkeypatch):
    """The CPU half-precision kernel (query heads grouped over shared key heads, scale and causal bias inside
    the first matmul; in one block of query rows or several) against PyTorch's causal SDPA in float32: outputs
    and the gradients of query, key and value; exact in float32, to the dtype's rounding otherwise. Lengths
    repeat and change, as records do within a batch, so a cached bias of the wrong length would show; 11 does
    not divide into 4 blocks evenly."""
    monkeypatch.setattr(attention_module, "QUERY_BLOCKS_FROM_LENGTH", blocks_from)
    generator = torch.Generator().manual_seed(0)
    for length, scaling in ((11, 0.3), (4, None), (11, 0.3)):
        query, key, value = (torch.randn(1, heads, length, 8, generator=generator) for heads in (6, 2, 2))
        grad = torch.randn(1, 6, length, 8, generator=generator)
        results = []
        for kernel in (causal_attention_by_matmul, None):
            kernel_dtype = dtype if kernel else torch.float32
            inputs = [tensor.to(kernel_dtype).requires_grad_(True) for tensor in (query, key, value)]
            if kernel is None:
                output = torch.nn.functional.scaled_dot_product_attention(*inputs, is_causal=True, scale=scaling,
                                                                           enable_gqa=True)
            else:
                output = kernel(*inputs, scaling=scaling)
            output.backward(grad.to(inputs[0].dtype))
            results.append([output.float(), *(tensor.grad.float() for tensor in inputs)])
        for ours, reference in zip(*results, strict=True):
            torch.testing.assert_close(ours, reference, atol=tolerance, rtol=tolerance)


class ScoreElements(TorchDispatchMode):
    """The number of attention scores computed: elements of the baddbmm outputs."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.baddbmm:
            self.count += out.numel()
        return out


def test_query_blocks_skip_the_scores_above_the_diagonal_blocks(monkeypatch):
    """Split into 4 blocks of query rows, a record of 16 tokens computes 4 x (4 + 8 + 12 + 16) scores per query
    head instead of 16 x 16 (5/8), from its length QUERY_BLOCKS_FROM_LENGTH on."""
    query, key, value = (torch.randn(1, heads, 16, 8).bfloat16() for heads in (6, 2, 2))
    counts = []
    for blocks_from in (17, 16):
        monkeypatch.setattr(attention_module, "QUERY_BLOCKS_FROM_LENGTH", blocks_from)
        with ScoreElements() as scores:
            causal_attention_by_matmul(query, key, value, None)
        counts.append(scores.count)
    assert counts == [6 * 16 * 16, 6 * 4 * (4 + 8 + 12 + 16)]


def test_records_longer_than_the_matmul_limit_take_the_flash_kernel(monkeypatch):
    """The matmul kernel keeps (L, L) probabilities for the backward; past its length limit records go to
    SDPA's flash kernel, which keeps none."""
    used = []
    monkeypatch.setattr(attention_module, "MATMUL_ATTENTION_MAX_LENGTH", 8)
    monkeypatch.setattr(attention_module, "causal_attention_by_matmul",
                        lambda query, *args: used.append(query.shape[2]) or causal_attention_by_matmul(query, *args))
    generator = torch.Generator().manual_seed(0)
    for length in (8, 9):
        query, key, value = (torch.randn(1, heads, length, 8, generator=generator).bfloat16() for heads in (6, 2, 2))
        output = attention_module.record_attention(query, key, value, dropout=0.0, scaling=None)
        expected = torch.nn.functional.scaled_dot_product_attention(query.float(), key.float(), value.float(),
                                                                     is_causal=True, enable_gqa=True)
        torch.testing.assert_close(output.float(), expected, atol=3e-2, rtol=3e-2)
    assert used == [8]


@pytest.mark.parametrize("precision", ["bf16 model", "bf16 autocast"])
def test_packed_bfloat16_training_forward_matches_the_masked_path(precision, tiny_llama_dir, monkeypatch):
    """A bf16 model, or float32 weights under bf16 autocast (whose queries come out of the rotary embedding in
    float32: cast to bf16, as autocast casts SDPA's), take the half-precision matmul kernel per record."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, attn_implementation="sdpa",
        dtype=torch.bfloat16 if precision == "bf16 model" else torch.float32).train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16 autocast")
    batch = packed_batch(model.config.vocab_size)
    with autocast:
        masked_logits, _ = forward_and_grads(model, batch)
    biases_built = []
    build = attention_module._RecordLengths.causal_bias

    def recorded_build(self, start, end, *args):
        biases_built.append((start, end))
        return build(self, start, end, *args)

    monkeypatch.setattr(attention_module._RecordLengths, "causal_bias", recorded_build)
    triu_calls = []
    triu = torch.Tensor.triu
    monkeypatch.setattr(torch.Tensor, "triu", lambda self, *args: triu_calls.append(self.shape) or triu(self, *args))
    with packed_attention(model), autocast:
        packed_logits, _ = forward_and_grads(model, batch)
    torch.testing.assert_close(packed_logits.float(), masked_logits.float(), atol=5e-2, rtol=5e-2)
    # every layer asked for each record's causal bias; each distinct record length's was built once
    records = [length for row in ([5, 9, 2], [7, 6, 3]) for length in row]
    assert sorted(biases_built) == sorted([(0, length) for length in records] * model.config.num_hidden_layers)
    assert sorted(shape[0] for shape in triu_calls) == sorted(set(records))


# --- the CUDA varlen path ------------------------------------------------------------------------------


def sdpa_varlen(query, key, value, offsets, longest, scale, **options):
    """The varlen kernel's contract, (N, H, D) with record offsets, computed record by record through SDPA."""
    assert offsets.dtype == torch.int32 and int(offsets[-1]) == query.shape[0]
    assert longest == int((offsets[1:] - offsets[:-1]).max())
    outputs = []
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        record = [tensor[start:end].transpose(0, 1).unsqueeze(0) for tensor in (query, key, value)]  # (1, h, L, D)
        output = torch.nn.functional.scaled_dot_product_attention(
            *record, is_causal=True, scale=scale, enable_gqa=key.shape[1] != query.shape[1])
        outputs.append(output[0].transpose(0, 1))  # (L, H, D)
    return torch.cat(outputs)


def test_varlen_layout_and_offsets_equal_the_block_diagonal_mask(tiny_llama_dir, monkeypatch):
    """Our side of the varlen call (rows flattened end to end, int32 record offsets, the output's
    (B, T, H, D) layout), with the kernel replaced by SDPA record by record, against the masked path."""
    from tunesmith.training import packed_attention as module

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa").train()
    batch = packed_batch(model.config.vocab_size)
    masked_logits, masked_grads = forward_and_grads(model, batch)
    calls = []
    monkeypatch.setattr(module, "uses_varlen", lambda query, dropout: True)
    monkeypatch.setattr(module, "varlen_kernel", lambda: lambda *arguments: calls.append(1) or sdpa_varlen(*arguments))
    with packed_attention(model):
        varlen_logits, varlen_grads = forward_and_grads(model, batch)
    assert len(calls) == model.config.num_hidden_layers  # one call per layer for the whole batch
    torch.testing.assert_close(varlen_logits, masked_logits, atol=1e-5, rtol=1e-4)
    for ours, masked in zip(varlen_grads, masked_grads, strict=True):
        torch.testing.assert_close(ours, masked, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("keywords", ["is_causal", "window_size+enable_gqa"])
def test_varlen_kernel_speaks_each_torch_releases_keywords(keywords, monkeypatch):
    """varlen_attn's causal keyword and GQA support differ between PyTorch releases: both spellings reach
    the same causal, grouped attention (without enable_gqa, key heads are repeated in transformers' order)."""
    import torch.nn.attention.varlen as varlen

    from tunesmith.training.packed_attention import varlen_kernel

    seen = {}
    if keywords == "is_causal":
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None):
            seen.update(is_causal=is_causal, key_heads=key.shape[1])
            return sdpa_varlen(query, key, value, cu_seq_q, max_q, scale)
    else:
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                 enable_gqa=False):
            seen.update(window_size=window_size, key_heads=key.shape[1], enable_gqa=enable_gqa)
            return sdpa_varlen(query, key, value, cu_seq_q, max_q, scale)
    monkeypatch.setattr(varlen, "varlen_attn", fake)
    varlen_kernel.cache_clear()
    try:
        kernel = varlen_kernel()
        generator = torch.Generator().manual_seed(0)
        query, key, value = (torch.randn(12, heads, 8, generator=generator) for heads in (6, 2, 2))
        offsets = torch.tensor([0, 5, 12], dtype=torch.int32)
        got = kernel(query, key, value, offsets, 7, 0.3)
    finally:
        varlen_kernel.cache_clear()
    if keywords == "is_causal":
        assert seen == {"is_causal": True, "key_heads": 6}
    else:
        assert seen == {"window_size": (-1, 0), "key_heads": 2, "enable_gqa": True}
    torch.testing.assert_close(got, sdpa_varlen(query, key, value, offsets, 7, 0.3))


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="the varlen flash kernel runs on CUDA only (on a GPU: TUNESMITH_TEST_CUDA=1 pytest -k cuda)")
def test_cuda_varlen_kernel_equals_per_record_sdpa():
    """The real kernel on a GPU, in bfloat16: a packed batch of uneven records with grouped key heads,
    outputs and gradients against SDPA record by record (float32 references of the same inputs)."""
    from tunesmith.training.packed_attention import uses_varlen, varlen_kernel

    generator = torch.Generator().manual_seed(0)
    lengths = [700, 13, 250, 1, 84, 1000]  # two rows of 1024 tokens
    total = sum(lengths)
    offsets = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).cuda()
    query, key, value = (torch.randn(total, heads, 64, generator=generator).cuda() for heads in (9, 3, 3))
    grad = torch.randn(total, 9, 64, generator=generator).cuda()
    assert uses_varlen(query.bfloat16().unsqueeze(0), 0.0)
    results = []
    for dtype, kernel in ((torch.bfloat16, varlen_kernel()), (torch.float32, sdpa_varlen)):
        inputs = [tensor.to(dtype).requires_grad_(True) for tensor in (query, key, value)]
        output = kernel(*inputs, offsets, max(lengths), 0.125)
        output.backward(grad.to(dtype))
        results.append([output.float(), *(tensor.grad.float() for tensor in inputs)])
    for ours, reference in zip(*results, strict=True):
        assert torch.isfinite(ours).all()
        error = (ours - reference).norm() / reference.norm()
        assert error < 1e-2, f"relative error {error:.2e}"


def test_a_sliding_window_model_keeps_its_window_in_packed_rows(tmp_path):
    """A model whose layers attend to the last W positions only (Mistral's sliding window): packed training gives
    each record the logits and gradients it has alone, records longer than the window included."""
    from transformers import MistralConfig

    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    batch = packed_batch(config.vocab_size)
    alone = []
    for row_ids, row_positions in zip(batch["input_ids"], batch["position_ids"], strict=True):
        for start, end in record_spans(row_positions):
            alone.append(model(input_ids=row_ids[None, start:end], use_cache=False).logits[0])
    expected = torch.stack([torch.cat(alone[:3]), torch.cat(alone[3:])]).detach()  # (2, 16, V)
    with packed_attention(model):
        packed_logits, _ = forward_and_grads(model, batch)
    torch.testing.assert_close(packed_logits, expected, atol=1e-5, rtol=1e-4)


def branched_mask(dtype: torch.dtype) -> torch.Tensor:
    """(2, 1, 11, 11) additive mask of two branched rows (objectives/branched_rows.py): a beginning of 3 tokens,
    two continuations after it that see the beginning and themselves, causal; the second row ends in padding
    (2 columns) whose queries see themselves only."""
    branch = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]])
    lengths = torch.tensor([11, 9])
    column = torch.arange(11)[None, :]
    sees = (column.t() >= column) & (column < lengths[:, None])[:, None, :]
    sees &= (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    sees |= torch.eye(11, dtype=torch.bool)
    return torch.zeros(sees.shape, dtype=dtype).masked_fill_(~sees, torch.finfo(dtype).min)[:, None]


@pytest.mark.parametrize("blocks_from", [512, 4])
def test_masked_matmul_attention_equals_sdpa_under_the_same_mask(blocks_from, monkeypatch):
    """Branched rows' causal mask: the CPU half-precision kernel (query heads grouped, the mask's blocks inside the
    first matmul, in one block of query rows or several) against PyTorch's SDPA under the same mask in float32:
    outputs and the gradients of query, key and value, to bf16's rounding. Two masks in turn, so a bias cached
    for the wrong mask would show."""
    monkeypatch.setattr(attention_module, "QUERY_BLOCKS_FROM_LENGTH", blocks_from)
    generator = torch.Generator().manual_seed(0)
    mask = branched_mask(torch.bfloat16)
    for mask_now in (mask, mask.flip(0), mask):
        query, key, value = (torch.randn(2, heads, 11, 8, generator=generator) for heads in (6, 2, 2))
        grad = torch.randn(2, 6, 11, 8, generator=generator)
        results = []
        for dtype in (torch.bfloat16, torch.float32):
            inputs = [tensor.to(dtype).requires_grad_(True) for tensor in (query, key, value)]
            if dtype == torch.bfloat16:
                assert takes_masked_matmul(inputs[0], inputs[1], mask_now, dropout=0.0)
                output = masked_attention_by_matmul(*inputs, mask_now, scaling=0.3)
            else:
                output = torch.nn.functional.scaled_dot_product_attention(
                    *inputs, attn_mask=mask_now.float().clamp(min=torch.finfo(torch.float32).min), scale=0.3,
                    enable_gqa=True)
            output.backward(grad.to(dtype))
            results.append([output.float(), *(tensor.grad.float() for tensor in inputs)])
        for ours, reference in zip(*results, strict=True):
            torch.testing.assert_close(ours, reference, atol=2e-2, rtol=2e-2)


def test_the_masked_kernel_takes_causal_half_precision_masks_only(monkeypatch):
    """A mask that lets a query see a later key (a bidirectional prefix) cannot be cut into query blocks; float32,
    dropout, a boolean mask and rows longer than the matmul limit (whose probabilities it would keep) stay with
    SDPA."""
    mask = branched_mask(torch.bfloat16)
    query, key = torch.zeros(2, 6, 11, 8, dtype=torch.bfloat16), torch.zeros(2, 2, 11, 8, dtype=torch.bfloat16)
    assert takes_masked_matmul(query, key, mask, dropout=0.0)
    bidirectional = mask.clone()
    bidirectional[:, :, 0, 1] = 0
    assert not takes_masked_matmul(query, key, bidirectional, dropout=0.0)
    assert not takes_masked_matmul(query, key, mask, dropout=0.1)
    assert not takes_masked_matmul(query.float(), key.float(), mask.float(), dropout=0.0)
    assert not takes_masked_matmul(query, key, mask == 0, dropout=0.0)
    monkeypatch.setattr(attention_module, "MATMUL_ATTENTION_MAX_LENGTH", 10)
    assert not takes_masked_matmul(query, key, mask, dropout=0.0)
