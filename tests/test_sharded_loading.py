"""A sharded run whose `model.dtype` differs from the files' loads the weights as stored (mapped, shared by the
node's processes) and converts each decoder layer just before sharding it, instead of every process converting
the whole model into memory of its own: the same parameters, in the same dtypes, as loading them converted.
On 2 processes: tests/test_sharding.py's DPO full fine-tuning from bfloat16 files in float32."""

from __future__ import annotations

import pytest
import torch
from helpers import preference_records, write_jsonl

from tunesmith.config import build_config
from tunesmith.methods import METHODS
from tunesmith.models import stored_dtype
from tunesmith.objectives import OBJECTIVES
from tunesmith.training.sharding import load_as_stored


def test_the_stored_dtype_is_read_from_the_file_headers(tiny_llama_dir, bf16_llama_dir, tmp_path):
    assert stored_dtype(tiny_llama_dir) == torch.float32
    assert stored_dtype(bf16_llama_dir) == torch.bfloat16
    assert stored_dtype(tmp_path) is None  # no safetensors files


@pytest.mark.parametrize("method, task, dtype, continual, expected", [
    ("full", "sft", "float32", None, torch.bfloat16),  # converted layer by layer
    ("freeze", "dpo", "float32", None, torch.bfloat16),
    ("full", "sft", "bfloat16", None, torch.bfloat16),  # the files' dtype already: loaded as stored, not converted
    ("lora", "sft", "float32", None, None),  # the method adds parameters in the dtype it sees
    ("full", "ppo", "float32", None, None),  # ppo adds a value head
    ("full", "sft", "float32", {"regularizer": {"name": "l2sp", "weight": 0.1}}, None),  # anchors: loaded weights
])
def test_weights_are_loaded_as_stored_only_where_converting_them_all_is_the_same(
    bf16_llama_dir, tmp_path, method, task, dtype, continual, expected
):
    data = write_jsonl(tmp_path / "data.jsonl", preference_records(2))
    raw = {"model": {"name": str(bf16_llama_dir), "dtype": dtype}, "data": {"train": str(data)}, "task": task,
           "method": {"name": method}, "output_dir": str(tmp_path / "run")}
    if continual is not None:
        raw["continual"] = {"old_data": str(data), **continual}
    config = build_config(raw)
    assert load_as_stored(config, METHODS.get(config.method.name), OBJECTIVES.get(config.task)) == expected


def test_layers_converted_as_they_are_sharded_equal_the_model_loaded_converted(one_process_group, bf16_llama_dir,
                                                                               monkeypatch):
    """bfloat16 files, float32 training: every parameter ends in the dtype and with the values loading in float32
    gives (buffers such as the rotary table keep theirs), and each layer is converted only once every earlier
    layer is sharded and no later one has been touched: one converted whole layer at a time."""
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from tunesmith.models import decoder_layers
    from tunesmith.training import sharding

    expected = AutoModelForCausalLM.from_pretrained(bf16_llama_dir, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(bf16_llama_dir, dtype=torch.bfloat16)
    layers = decoder_layers(model)
    seen = []
    convert = sharding.convert_parameters

    def watched(layer, dtype):
        index = next(i for i, candidate in enumerate(layers) if candidate is layer)
        earlier_sharded = all(isinstance(p, DTensor) for earlier in layers[:index] for p in earlier.parameters())
        later_as_stored = all(p.dtype == torch.bfloat16 for later in layers[index + 1:] for p in later.parameters())
        seen.append((index, earlier_sharded, later_as_stored))
        convert(layer, dtype)

    monkeypatch.setattr(sharding, "convert_parameters", watched)
    sharding.shard_layers(model, reshard_after_forward=True, dtype=torch.float32)
    sharding.place_unsharded(model, torch.device("cpu"), torch.float32)

    assert seen == [(index, True, True) for index in range(len(layers))]
    converted = dict(model.named_parameters())
    for name, parameter in expected.named_parameters():
        whole = converted[name].full_tensor() if isinstance(converted[name], DTensor) else converted[name]
        assert whole.dtype == parameter.dtype, name
        assert torch.equal(whole, parameter), name
    assert {name: buffer.dtype for name, buffer in model.named_buffers()} == {
        name: buffer.dtype for name, buffer in expected.named_buffers()}
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied

