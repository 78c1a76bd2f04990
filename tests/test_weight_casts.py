"""Frozen float32 weights cast to autocast's dtype once per training run (training/weight_casts.py): the same
casts autocast makes, kept, so training gives the same losses and weights bit for bit."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch
from helpers import chat_records, preference_records, record_kept_casts, run_config, write_jsonl
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


# Each with the frozen weights whose casts the run keeps: the tiny model's 2 layers x 7 linears (LoRA's, IA3's,
# LoHa's and the bottleneck adapters' base linears; every linear of prompt and prefix tuning), and the tied head of
# the loss. Freeze: layer 1 trains, so its linears have no casts to keep, and layer 0 below it takes no gradient:
# its casts are transient, not kept (nor any block's where only the final norm trains). dpo: the reference is the
# model with its adapters off.
@pytest.mark.parametrize(("task", "method", "kept_casts"), [
    ("sft", {"name": "lora", "r": 4, "dropout": 0.0}, 2 * 7 + 1),
    ("dpo", {"name": "lora", "r": 4, "dropout": 0.0}, 2 * 7 + 1),
    ("sft", {"name": "lora", "r": 4, "dropout": 0.1}, 2 * 7 + 1),
    ("sft", {"name": "ia3"}, 2 * 7 + 1),
    ("sft", {"name": "loha", "r": 4}, 2 * 7 + 1),
    ("sft", {"name": "adapter"}, 2 * 7 + 1),
    ("sft", {"name": "prompt", "num_virtual_tokens": 4}, 2 * 7 + 1),
    ("sft", {"name": "prefix", "num_virtual_tokens": 4}, 2 * 7 + 1),
    ("sft", {"name": "freeze", "layers": 1}, 1),
    ("sft", {"name": "freeze", "modules": [r"^model\.norm\."]}, 1),  # the final norm alone: no block takes gradients
])
def test_under_autocast_training_is_the_same_with_the_casts_kept(task, method, kept_casts, tiny_llama_dir, tmp_path,
                                                                 monkeypatch):
    import tunesmith.training.loop as loop

    kept = record_kept_casts(monkeypatch)
    records = chat_records(8) if task == "sft" else preference_records(8)
    data = write_jsonl(tmp_path / "train.jsonl", records)
    runs = {}
    for name in ("kept", "cast each call"):
        if name == "cast each call":
            monkeypatch.setattr(loop, "cached_weight_casts", nullcontext)
        result = loop.train(run_config(
            tiny_llama_dir, data, tmp_path / name, task=task, method=method,
            train={"max_steps": 3, "mixed_precision": "bf16"},  # float32 weights under bf16 autocast
        ))
        lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
        runs[name] = ([json.loads(line)["loss"] for line in lines], trained_weights(result.run_dir))
    assert [len(casts) for casts in kept] == [kept_casts]
    (kept_losses, kept_weights), (losses, weights) = runs["kept"], runs["cast each call"]
    assert kept_losses == losses
    assert weights.keys() == kept_weights.keys() and weights
    assert all(torch.equal(weights[name], kept_weights[name]) for name in weights)


def trained_weights(run_dir) -> dict[str, torch.Tensor]:
    """The exported weights of a run: its adapter, or its model."""
    files = sorted(run_dir.glob("adapter/*.safetensors")) or sorted(run_dir.glob("model/*.safetensors"))
    return {name: tensor for file in files for name, tensor in load_file(file).items()}


class WeightCasts(TorchDispatchMode):
    """Counts the casts, under this mode, of tensors whose storage is one of `weights`."""

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.storages, self.count = {weight.data_ptr() for weight in weights}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._to_copy and args[0].data_ptr() in self.storages:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_training_forward_under_autocast_casts_each_frozen_weight_once(tiny_llama_dir):
    from tunesmith.config import ModelConfig
    from tunesmith.methods import METHODS
    from tunesmith.models import load_model

    model = METHODS.get("lora").apply(load_model(ModelConfig(name=str(tiny_llama_dir)), "sft"),
                                      METHODS.get("lora").settings(r=4, dropout=0.0), "sft")
    weight_casts.use_kept_casts(model)
    bases = [module.base_layer.weight for name, module in model.named_modules() if name.endswith("q_proj")]
    ids = torch.arange(12).reshape(2, 6)

    def casts(grad: bool, adapters: bool = True) -> int:
        with (torch.set_grad_enabled(grad), nullcontext() if adapters else model.disable_adapter(),
              WeightCasts(bases) as counted):
            model(input_ids=ids)
        return counted.count

    with torch.autocast("cpu", dtype=torch.bfloat16), cached_weight_casts():
        # a no-grad pass keeps no cast (a frozen reference copy's would be held for nothing) ...
        assert [casts(grad=False), casts(grad=False)] == [len(bases)] * 2
        # ... a training forward keeps them, and every later pass reuses them: the reference (adapters off) too
        assert [casts(grad=True), casts(grad=True), casts(grad=False, adapters=False)] == [len(bases), 0, 0]


def test_the_casts_are_kept_for_the_whole_run_evaluations_included(tiny_llama_dir, tmp_path, monkeypatch):
    import tunesmith.objectives.linear_cross_entropy as linear_cross_entropy
    import tunesmith.training.loop as loop

    scopes = []  # per call of cast_weight: whether it ran inside a cached_weight_casts block

    def recorded(weight, dtype, keep=True):
        scopes.append(weight_casts._casts is not None)
        return cast_weight(weight, dtype, keep)

    monkeypatch.setattr(weight_casts, "cast_weight", recorded)
    monkeypatch.setattr(linear_cross_entropy, "cast_weight", recorded)
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(8))
    loop.train(run_config(
        tiny_llama_dir, data, tmp_path / "run", method={"name": "lora", "r": 4, "dropout": 0.0},
        data={"eval": str(data)},
        train={"max_steps": 2, "eval_every": 1, "eval_before": True, "mixed_precision": "bf16"},
    ))
    assert scopes and all(scopes)  # the evaluation before training too
