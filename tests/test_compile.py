"""`train.compile` (regional torch.compile of the decoder layers) trains to the same weights as eager."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import chat_records, run_config, write_jsonl
from safetensors.torch import load_file

from tunesmith.errors import ConfigError
from tunesmith.training import train
from tunesmith.training.compile import check_compiler

needs_compiler = pytest.mark.skipif(
    not any(shutil.which(name) for name in ("g++", "c++", "clang++")),
    reason="torch.compile on CPU needs a C++ compiler",
)


@needs_compiler
def test_compiled_layers_train_to_the_eager_weights(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(8))
    weights = {}
    torch._dynamo.utils.counters.clear()
    for compiled in (False, True):
        config = run_config(tiny_llama_dir, data, tmp_path / f"compile-{compiled}", data={"packing": True},
                            method={"name": "lora", "r": 4}, train={"max_steps": 2, "batch_size": 2,
                                                                    "compile": compiled})
        result = train(config)
        assert result.exit_code == 0
        weights[compiled] = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the compiled run did compile
    assert weights[True].keys() == weights[False].keys()
    moved = False
    for name, value in weights[True].items():
        torch.testing.assert_close(value, weights[False][name], atol=1e-5, rtol=1e-4)
        moved |= "lora_B" in name and bool(value.abs().sum() > 0)
    assert moved  # the adapters trained (B starts at zero)


def test_no_compiler_is_a_config_error_before_any_work(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="train.compile"):
        check_compiler(torch.device("cpu"))
