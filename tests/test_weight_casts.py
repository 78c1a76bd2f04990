"""Frozen float32 weights cast to autocast's dtype once per training run (training/weight_casts.py): the same
casts autocast makes, kept, so training gives the same losses and weights bit for bit."""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext

import pytest
import torch
from helpers import chat_records, preference_records, run_config, write_jsonl
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

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


@pytest.mark.parametrize("task", ["sft", "dpo"])  # dpo: the reference is the model with its adapters off
def test_lora_under_autocast_trains_the_same_with_the_casts_kept(task, tiny_llama_dir, tmp_path, monkeypatch):
    import tunesmith.training.loop as loop

    kept = []

    @contextmanager
    def counted():
        with cached_weight_casts():
            yield
            kept.append(len(weight_casts._casts))

    records = chat_records(8) if task == "sft" else preference_records(8)
    data = write_jsonl(tmp_path / "train.jsonl", records)
    runs = {}
    for name, block in (("kept", counted), ("cast each call", nullcontext)):
        monkeypatch.setattr(loop, "cached_weight_casts", block)
        result = loop.train(run_config(
            tiny_llama_dir, data, tmp_path / name, task=task, method={"name": "lora", "r": 4, "dropout": 0.0},
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


class WeightCasts(TorchDispatchMode):
    """Counts the casts, under this mode, of tensors whose storage is one of `weights`."""

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.storages, self.count = {weight.data_ptr() for weight in weights}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._to_copy and args[0].data_ptr() in self.storages:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("adapters", ["on", "off"])  # off: the reference of dpo, kto, ...
def test_a_lora_forward_under_autocast_casts_each_base_weight_once(adapters, tiny_llama_dir):
    from tunesmith.config import ModelConfig
    from tunesmith.methods import METHODS
    from tunesmith.models import load_model

    model = METHODS.get("lora").apply(load_model(ModelConfig(name=str(tiny_llama_dir)), "sft"),
                                      METHODS.get("lora").settings(r=4, dropout=0.0), "sft")
    bases = [module.base_layer.weight for name, module in model.named_modules() if name.endswith("q_proj")]
    ids = torch.arange(12).reshape(2, 6)
    adapters_off = model.disable_adapter() if adapters == "off" else nullcontext()
    with torch.no_grad(), adapters_off, torch.autocast("cpu", dtype=torch.bfloat16), cached_weight_casts():
        with WeightCasts(bases) as first:
            model(input_ids=ids)
        with WeightCasts(bases) as second:
            model(input_ids=ids)
    assert (first.count, second.count) == (len(bases), 0)


def test_the_casts_are_kept_for_the_whole_run_evaluations_included(tiny_llama_dir, tmp_path, monkeypatch):
    import tunesmith.methods.lora_forward as lora_forward
    import tunesmith.objectives.linear_cross_entropy as linear_cross_entropy
    import tunesmith.training.loop as loop

    scopes = []  # per call of cast_weight: whether it ran inside a cached_weight_casts block

    def recorded(weight, dtype):
        scopes.append(weight_casts._casts is not None)
        return cast_weight(weight, dtype)

    monkeypatch.setattr(lora_forward, "cast_weight", recorded)
    monkeypatch.setattr(linear_cross_entropy, "cast_weight", recorded)
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(8))
    loop.train(run_config(
        tiny_llama_dir, data, tmp_path / "run", method={"name": "lora", "r": 4, "dropout": 0.0},
        data={"eval": str(data)},
        train={"max_steps": 2, "eval_every": 1, "eval_before": True, "mixed_precision": "bf16"},
    ))
    assert scopes and all(scopes)  # the evaluation before training too
