"""Frozen float32 weights cast to autocast's dtype once per training run (training/weight_casts.py): the same
casts autocast makes, kept, so training gives the same losses and weights bit for bit."""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext

import torch
from helpers import chat_records, run_config, write_jsonl
from safetensors.torch import load_file

from tunesmith.training import weight_casts
from tunesmith.training.weight_casts import cached_weight_casts, cast_weight


def test_a_frozen_weight_is_cast_once_until_it_changes():
    frozen = torch.nn.Parameter(torch.randn(8, 4), requires_grad=False)
    trainable = torch.nn.Parameter(torch.randn(8, 4))
    assert cast_weight(frozen, torch.bfloat16) is not cast_weight(frozen, torch.bfloat16)  # no block: no cache
    with cached_weight_casts():
        first = cast_weight(frozen, torch.bfloat16)
        assert torch.equal(first, frozen.to(torch.bfloat16))
        assert cast_weight(frozen, torch.bfloat16) is first
        assert cast_weight(frozen, torch.float16).dtype == torch.float16  # each dtype its own cast
        with torch.no_grad():
            frozen.mul_(2)  # in place: a new version
        assert torch.equal(cast_weight(frozen, torch.bfloat16), frozen.to(torch.bfloat16))
        assert cast_weight(trainable, torch.bfloat16) is not cast_weight(trainable, torch.bfloat16)
        assert cast_weight(trainable, torch.bfloat16).requires_grad  # a trainable weight's cast stays in the graph
    assert weight_casts._casts is None  # dropped after the block


def test_lora_under_autocast_trains_the_same_with_the_casts_kept(tiny_llama_dir, tmp_path, monkeypatch):
    import tunesmith.training.loop as loop

    kept = []

    @contextmanager
    def counted():
        with cached_weight_casts():
            yield
            kept.append(len(weight_casts._casts))

    data = write_jsonl(tmp_path / "train.jsonl", chat_records(8))
    runs = {}
    for name, block in (("kept", counted), ("cast each call", nullcontext)):
        monkeypatch.setattr(loop, "cached_weight_casts", block)
        result = loop.train(run_config(
            tiny_llama_dir, data, tmp_path / name, method={"name": "lora", "r": 4, "dropout": 0.0},
            train={"max_steps": 3, "mixed_precision": "bf16"},  # float32 weights under bf16 autocast
        ))
        lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
        runs[name] = ([json.loads(line)["loss"] for line in lines],
                      load_file(result.run_dir / "adapter" / "adapter_model.safetensors"))
    # every LoRA linear's base weight (2 layers x q, k, v, o, gate, up, down) and the tied head of the loss
    assert kept == [2 * 7 + 1]
    (kept_losses, kept_adapter), (losses, adapter) = runs["kept"], runs["cast each call"]
    assert kept_losses == losses
    assert adapter.keys() == kept_adapter.keys()
    assert all(torch.equal(adapter[name], kept_adapter[name]) for name in adapter)
