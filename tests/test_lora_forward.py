"""The fused LoRA forward (scale on the rank side, update added by addmm) equals peft's forward."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from tunesmith.config import ModelConfig
from tunesmith.methods import METHODS
from tunesmith.methods.lora_forward import fast_adapter
from tunesmith.models import load_model
from tunesmith.training.keyed_dropout import dropout_seed


def lora_model(tiny_llama_dir, **settings):
    lora = METHODS.get("lora")
    torch.manual_seed(0)
    model = lora.apply(load_model(ModelConfig(name=str(tiny_llama_dir)), "sft"), lora.settings(r=4, **settings), "sft")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; move it so the update is not trivially zero
                parameter.normal_(std=0.1)
    return model.train()


def lora_layers(model) -> list[LoraLinear]:
    return [module for module in model.modules() if isinstance(module, LoraLinear)]


def logits_and_grads(model, input_ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids, use_cache=False).logits
    (logits.float() ** 2).mean().backward()
    grads = {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}
    return logits.detach().float(), grads


def peft_forward(model):
    """Drop the per-instance fused forward: every layer runs peft's class forward again."""
    for layer in lora_layers(model):
        del layer.forward


@pytest.mark.parametrize(("autocast", "tolerance"), [(False, 1e-5), (True, 3e-2)])
def test_fused_forward_equals_peft_values_and_gradients(tiny_llama_dir, autocast, tolerance):
    model = lora_model(tiny_llama_dir)
    layers = lora_layers(model)
    assert layers and all("forward" in vars(layer) for layer in layers)  # every LoRA linear got the fused forward
    input_ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    results = []
    for use_peft in (False, True):
        if use_peft:
            peft_forward(model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            results.append(logits_and_grads(model, input_ids))
    (fused_logits, fused_grads), (peft_logits, peft_grads) = results
    torch.testing.assert_close(fused_logits, peft_logits, atol=tolerance, rtol=tolerance)
    assert fused_grads.keys() == peft_grads.keys() and any("lora_A" in name for name in fused_grads)
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad.float(), peft_grads[name].float(), atol=tolerance, rtol=tolerance, msg=name)


def test_disabled_adapters_give_the_base_model(tiny_llama_dir):
    model = lora_model(tiny_llama_dir).eval()
    base = load_model(ModelConfig(name=str(tiny_llama_dir)), "sft").eval()
    input_ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), model.disable_adapter():
        assert all(fast_adapter(layer) is None for layer in lora_layers(model))
        torch.testing.assert_close(model(input_ids=input_ids).logits, base(input_ids=input_ids).logits)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=input_ids).logits, base(input_ids=input_ids).logits, atol=1e-4)


def test_dora_keeps_peft_forward(tiny_llama_dir):
    model = lora_model(tiny_llama_dir, dora=True)
    assert all(fast_adapter(layer) is None for layer in lora_layers(model))


@pytest.mark.parametrize(("autocast", "tolerance"), [(False, 1e-5), (True, 3e-2)])
@pytest.mark.parametrize("seed", [None, 123])
def test_fused_forward_with_dropout_draws_peft_masks(tiny_llama_dir, seed, autocast, tolerance):
    """Without a part seed the masks come from the process's generator, with one from the seed and each module's
    number (training/keyed_dropout.py): either way peft's forward, through the same modules, draws the same."""
    model = lora_model(tiny_llama_dir, dropout=0.3)
    assert all(fast_adapter(layer) is not None for layer in lora_layers(model))
    input_ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    results = []
    for use_peft in (False, True):
        if use_peft:
            peft_forward(model)
        torch.manual_seed(5)  # the same random draws: the same dropout masks, layer by layer
        with dropout_seed(seed), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            results.append(logits_and_grads(model, input_ids))
    (fused_logits, fused_grads), (peft_logits, peft_grads) = results
    torch.testing.assert_close(fused_logits, peft_logits, atol=tolerance, rtol=tolerance)
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad.float(), peft_grads[name].float(), atol=tolerance, rtol=tolerance, msg=name)
    torch.manual_seed(6)  # other masks: other outputs (the dropout is not skipped)
    with dropout_seed(None if seed is None else seed + 1):
        assert not torch.allclose(logits_and_grads(model, input_ids)[0], fused_logits, atol=1e-4)


def test_merged_layers_keep_peft_forward(tiny_llama_dir):
    model = lora_model(tiny_llama_dir).eval()
    input_ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
        model.merge_adapter()
        assert all(fast_adapter(layer) is None for layer in lora_layers(model))
        torch.testing.assert_close(model(input_ids=input_ids).logits, before, atol=1e-5, rtol=1e-4)
