"""The RMSNorm with its own backward (training/rms_norm.py) equals transformers' norm: the same output bit for bit,
the same gradients up to float32 rounding; and only norms whose forward is Llama's get it."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from tunesmith.config import ModelConfig
from tunesmith.models import load_model
from tunesmith.training.rms_norm import use_fast_rms_norm


def norm_outputs_and_grads(norm, hidden, grad_output, autocast=False):
    hidden = hidden.detach().clone().requires_grad_(True)
    norm.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        output = norm(hidden)
    output.backward(grad_output.to(output.dtype))
    return output.detach(), hidden.grad, None if norm.weight.grad is None else norm.weight.grad.clone()


@pytest.mark.parametrize(("dtype", "autocast", "trained_weight"), [
    (torch.float32, False, True), (torch.bfloat16, False, False), (torch.bfloat16, False, True),
    (torch.float32, True, True),  # float32 weights under bf16 autocast: the norm itself stays float32
])
def test_fast_norm_equals_transformers_norm(dtype, autocast, trained_weight):
    generator = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=generator) * 0.5 + 1)
    norm.weight.requires_grad_(trained_weight)
    hidden = (torch.randn(2, 7, 48, generator=generator) * 3).to(dtype)
    grad_output = torch.randn(2, 7, 48, generator=generator)
    reference = norm_outputs_and_grads(norm, hidden, grad_output, autocast)
    assert use_fast_rms_norm(norm) == 1 and "forward" in vars(norm)
    fast = norm_outputs_and_grads(norm, hidden, grad_output, autocast)
    assert fast[0].dtype == reference[0].dtype and torch.equal(fast[0], reference[0])  # the forward is transformers'
    # float32: equal to float32 rounding; bf16: the gradient's float32 values may round to a neighbouring bf16
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(fast[1], reference[1], atol=tolerance, rtol=tolerance)
    assert (fast[2] is None) == (not trained_weight)
    if trained_weight:
        torch.testing.assert_close(fast[2], reference[2], atol=tolerance, rtol=tolerance)


def test_only_norms_that_compute_as_llama_get_the_fast_forward():
    llama, qwen, gemma = LlamaRMSNorm(8), Qwen2RMSNorm(8), GemmaRMSNorm(8)  # Gemma scales by 1 + weight
    container = torch.nn.ModuleList([llama, qwen, gemma, torch.nn.LayerNorm(8)])
    assert use_fast_rms_norm(container) == 2
    assert "forward" in vars(llama) and "forward" in vars(qwen) and "forward" not in vars(gemma)


def test_model_with_fast_norms_gives_the_same_logits_and_gradients(tiny_llama_dir):
    model = load_model(ModelConfig(name=str(tiny_llama_dir)), "sft").train()
    input_ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    results = []
    for fast in (False, True):
        if fast:  # every layer's two norms and the final one
            assert use_fast_rms_norm(model) == 2 * model.config.num_hidden_layers + 1
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=input_ids, use_cache=False).logits
        (logits.float() ** 2).mean().backward()
        grads = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
        results.append((logits.detach(), grads))
    (reference_logits, reference_grads), (fast_logits, fast_grads) = results
    assert torch.equal(fast_logits, reference_logits)
    assert any("norm" in name for name in fast_grads)
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-5, rtol=1e-4, msg=name)
