"""Method properties that need no training: start at the base output, clear errors, optimiser groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import chat_records, run_config, write_jsonl

from tunesmith.config import ModelConfig
from tunesmith.errors import ConfigError
from tunesmith.methods import METHODS
from tunesmith.models import load_model


def fresh(model_dir, folder: Path, method: dict, task: str = "sft"):
    """The validated config (as a user's YAML gives it) and a fresh base model."""
    data = write_jsonl(folder / "data.jsonl", chat_records(2))
    config = run_config(model_dir, data, folder / "run", task=task, method=method)
    model = load_model(ModelConfig(name=str(model_dir)), task, ["negative", "positive"] if task == "classify" else None)
    return config, model


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_adapter_starts_at_the_base_output_and_disables_cleanly(placement, tiny_llama_dir, tmp_path):
    config, base = fresh(tiny_llama_dir, tmp_path, {"name": "adapter", "placement": placement, "size": 4})
    input_ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        expected = base(input_ids=input_ids).logits
        model = METHODS.get("adapter").apply(base, config.method, "sft")
        torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=0, atol=0)
        for layer in model.adapted_layers():
            torch.nn.init.normal_(layer.adapter.up.weight)
        assert not torch.allclose(model(input_ids=input_ids).logits, expected)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=0, atol=0)
    per_block = {"houlsby": 2, "pfeiffer": 1}[placement]
    assert len(model.adapted_modules) == per_block * base.config.num_hidden_layers
    assert all(not parameter.requires_grad or ".adapter." in name for name, parameter in model.named_parameters())


def test_adapter_on_an_unknown_architecture_names_the_keys_to_set(tiny_llama_dir, tmp_path):
    from tunesmith.errors import ModelError

    config, base = fresh(tiny_llama_dir, tmp_path, {"name": "adapter", "mlp_modules": ["no_such_module"]})
    with pytest.raises(ModelError, match="method.mlp_modules"):
        METHODS.get("adapter").apply(base, config.method, "sft")


def test_adapter_settings_refuse_a_start_away_from_the_base(tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="residual"):
        fresh(tiny_llama_dir, tmp_path, {"name": "adapter", "residual": False})


def test_prompt_text_init_needs_text(tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="init_text"):
        fresh(tiny_llama_dir, tmp_path, {"name": "prompt", "init": "text"})


def test_prompt_text_init_starts_from_the_text_embeddings(tiny_llama_dir, tmp_path):
    method = {"name": "prompt", "num_virtual_tokens": 4, "init": "text", "init_text": "Hi"}
    config, base = fresh(tiny_llama_dir, tmp_path, method)
    embeddings = base.get_input_embeddings().weight.detach().clone()
    model = METHODS.get("prompt").apply(base, config.method, "sft")
    prompt = model.prompt_encoder["default"].embedding.weight  # (P, H)
    rows = {tuple(row.tolist()) for row in embeddings}
    assert all(tuple(row.tolist()) in rows for row in prompt)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU error path; the CUDA path is untested here")
def test_qlora_on_cpu_is_a_clear_config_error(tiny_llama_dir, tmp_path):
    config, base = fresh(tiny_llama_dir, tmp_path, {"name": "lora", "quantize": "4bit"})
    with pytest.raises(ConfigError, match=r"method.quantize: 4bit .*CUDA"):
        METHODS.get("lora").apply(base, config.method, "sft")


def test_lora_plus_gives_b_the_larger_learning_rate(tiny_llama_dir, tmp_path):
    config, base = fresh(tiny_llama_dir, tmp_path, {"name": "lora_plus", "r": 2, "lr_ratio": 16})
    spec = METHODS.get("lora_plus")
    model = spec.apply(base, config.method, "sft")
    groups = spec.optimizer_groups(model, config.method, 1e-4, 0.01)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    for group in groups:
        for parameter in group["params"]:
            is_b = "lora_B" in names[id(parameter)]
            assert group["lr"] == pytest.approx(1.6e-3 if is_b else 1e-4)
    grouped = sum(len(group["params"]) for group in groups)
    assert grouped == sum(parameter.requires_grad for parameter in model.parameters())


def test_pissa_refuses_dora(tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="dora"):
        fresh(tiny_llama_dir, tmp_path, {"name": "lora", "init": "pissa", "dora": True})


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_save_as_plain_lora_of_the_original_base(init, tiny_llama_dir, tmp_path):
    """save_lora's rank-2r form needs no re-initialisation: plain LoRA on the untouched base file."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.methods.lora import save_lora

    config, base = fresh(tiny_llama_dir, tmp_path, {"name": "lora", "r": 2, "init": init})
    model = METHODS.get("lora").apply(base, config.method, "sft")
    with torch.no_grad():  # stand-in for training: move A and B away from their start
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    save_lora(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["init_lora_weights"] is True

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "adapter")
    input_ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=input_ids).logits, model(input_ids=input_ids).logits,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "ia3", "loha", "lokr", "prompt", "prefix", "p_tuning"])
def test_a_peft_method_prints_no_warning_about_peft_itself(method, tiny_llama_dir, tmp_path):
    """peft reads transformers 5's deprecated `is_gradient_checkpointing` as it wraps a model, a FutureWarning on
    every run that the user can do nothing about: applying a method shows none."""
    import warnings

    config, base = fresh(tiny_llama_dir, tmp_path, {"name": method})
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        METHODS.get(method).apply(base, config.method, "sft")


def test_lora_on_a_mixture_of_experts_warns_nothing_and_names_the_settings_it_refuses(tiny_moe_dirs, tmp_path):
    """all-linear reaches a mixture of experts' 3-D expert weights and its router's (peft's ParamWrapper). peft
    warns that the ranks it sets for the fused gate_up_proj "did not match any targeted module", though they
    apply (2r there): tunesmith shows no such warning. Dropout and DoRA, which such LoRA cannot take, are config
    errors naming their key, not peft's traceback."""
    import warnings

    folder = tiny_moe_dirs["qwen3_moe"]
    config, base = fresh(folder, tmp_path, {"name": "lora", "r": 4})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model = METHODS.get("lora").apply(base, config.method, "sft")
    experts = model.base_model.model.model.layers[0].mlp.experts
    assert experts.base_layer.parameter_name == "gate_up_proj" and experts.parameter_name == "down_proj"
    assert experts.base_layer.lora_A["default"].weight.shape[0] == 2 * 4 * 8  # 2r per expert, 8 experts
    for setting, key in [({"dropout": 0.1}, "method.dropout"), ({"dora": True}, "method.dora")]:
        config, base = fresh(folder, tmp_path, {"name": "lora", "r": 4, **setting})
        with pytest.raises(ConfigError, match=f"^{key}: LoRA on a mixture of experts' expert and router weights"):
            METHODS.get("lora").apply(base, config.method, "sft")
    config, base = fresh(folder, tmp_path, {"name": "lora", "r": 4, "dropout": 0.1, "target_modules": ["q_proj"]})
    METHODS.get("lora").apply(base, config.method, "sft")  # on the linears alone dropout applies
