"""Per-record attention for packed rows equals transformers' block-diagonal SDPA: outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunesmith.training.packed_attention import NAME, causal_attention_by_matmul, packed_attention, record_spans


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
                            model={"attn_implementation": kernel}, train={"max_steps": 3, "batch_size": 2})
        result = train(config)
        assert NAME not in (result.run_dir / "model" / "config.json").read_text()
        weights[kernel] = load_file(result.run_dir / "model" / "model.safetensors")
    for name, value in weights["sdpa"].items():
        torch.testing.assert_close(value, weights["eager"][name], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_matmul_attention_equals_the_causal_sdpa_kernel(dtype, tolerance):
    """The bfloat16 CPU kernel (query heads grouped over shared key heads) against PyTorch's causal SDPA:
    outputs and the gradients of query, key and value; exact in float32, to bfloat16 rounding otherwise."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, heads, 11, 8, generator=generator) for heads in (6, 2, 2))
    grad = torch.randn(1, 6, 11, 8, generator=generator)
    results = []
    for kernel in (causal_attention_by_matmul, None):
        inputs = [tensor.to(dtype).requires_grad_(True) for tensor in (query, key, value)]
        if kernel is None:
            output = torch.nn.functional.scaled_dot_product_attention(*inputs, is_causal=True, scale=0.3,
                                                                       enable_gqa=True)
        else:
            output = kernel(*inputs, scaling=0.3)
        output.backward(grad.to(dtype))
        results.append([output.float(), *(tensor.grad.float() for tensor in inputs)])
    for ours, reference in zip(*results, strict=True):
        torch.testing.assert_close(ours, reference, atol=tolerance, rtol=tolerance)


def test_packed_bfloat16_training_forward_matches_the_masked_path(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa",
                                                 dtype=torch.bfloat16).train()
    batch = packed_batch(model.config.vocab_size)
    masked_logits, _ = forward_and_grads(model, batch)
    with packed_attention(model):
        packed_logits, _ = forward_and_grads(model, batch)
    torch.testing.assert_close(packed_logits.float(), masked_logits.float(), atol=5e-2, rtol=5e-2)
