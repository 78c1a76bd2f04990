"""`train.checkpoint_layers`: recomputing only the first N decoder layers keeps less than no checkpointing,
more than checkpointing every layer, and changes no gradient."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from helpers import assert_same_weights, chat_records, run_config, write_jsonl
from transformers import AutoModelForCausalLM

from tunesmith.errors import ConfigError
from tunesmith.models import decoder_layers
from tunesmith.plan import GIB, plan_memory
from tunesmith.training.recompute import enable_recompute


def saved_bytes_and_grads(model, ids) -> tuple[int, list[torch.Tensor]]:
    """Bytes of the distinct storages autograd keeps for the backward of one forward (those a checkpointed
    layer recomputes are not among them), and the gradients of every parameter."""
    storages = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return sum(storages.values()), [parameter.grad.clone() for parameter in model.parameters()]


def test_recomputing_the_first_layers_saves_between_none_and_all_with_the_same_gradients(tiny_llama_dir):
    ids = torch.randint(3, 100, (2, 48), generator=torch.Generator().manual_seed(0))
    saved, grads = {}, {}
    for layers in (0, 1, 2):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).train()
        if layers:
            with warnings.catch_warnings():  # transformers 5's own switch, not its deprecated name
                warnings.simplefilter("error", FutureWarning)
                assert enable_recompute(model, None if layers == 2 else layers) == layers
            assert [layer.gradient_checkpointing for layer in decoder_layers(model)] == [True, layers == 2]
        saved[layers], grads[layers] = saved_bytes_and_grads(model, ids)
    assert saved[0] > saved[1] > saved[2]
    for layers in (1, 2):
        for ours, reference in zip(grads[layers], grads[0], strict=True):
            torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-7)


def test_a_run_recomputing_one_layer_trains_to_the_same_weights(tiny_llama_dir, tmp_path):
    from tunesmith.training import train

    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(8))
    runs = {}
    for name, settings in {"plain": {}, "one": {"gradient_checkpointing": True, "checkpoint_layers": 1}}.items():
        config = run_config(tiny_llama_dir, data, tmp_path / name, train={"max_steps": 2, **settings})
        runs[name] = train(config).run_dir / "model"
    assert_same_weights(runs["plain"], runs["one"])


def test_checkpoint_layers_is_checked_against_the_config_and_the_model(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(2))
    with pytest.raises(ConfigError, match="checkpoint_layers: needs gradient_checkpointing: true"):
        run_config(tiny_llama_dir, data, tmp_path / "a", train={"checkpoint_layers": 1})
    too_many = run_config(tiny_llama_dir, data, tmp_path / "b",
                          train={"gradient_checkpointing": True, "checkpoint_layers": 3})
    message = "train.checkpoint_layers: 3, but the model has 2 decoder layers"
    with pytest.raises(ConfigError, match=message):
        plan_memory(too_many, on_gpu=False)
    with pytest.raises(ConfigError, match=message):
        enable_recompute(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), 3)


def test_the_plan_counts_the_recomputed_layers_and_names_the_fewest_that_fit(tiny_llama_dir, tmp_path):
    # The plan reads the model's config only: the tiny model with 6 layers.
    six_layers = tmp_path / "six-layers"
    shutil.copytree(tiny_llama_dir, six_layers)
    config_file = six_layers / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"num_hidden_layers": 6}))
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(2))

    def plan(budget=None, **train):
        config = run_config(six_layers, data, tmp_path / "run", train={"batch_size": 8, **train},
                            data={"max_length": 512}, method={"name": "lora", "r": 4})
        return plan_memory(config, budget_gib=budget, on_gpu=False)

    none, every = plan(), plan(gradient_checkpointing=True)
    recomputing = [plan(gradient_checkpointing=True, checkpoint_layers=count) for count in range(1, 6)]
    activations = [one.parts_gib["activations"] for one in [none, *recomputing]]
    assert activations == sorted(activations, reverse=True) and len(set(activations)) == 6
    tokens, layer = 8 * 512, activations[0] / 6  # one layer's activations (GiB); its input: 64 float32 values a token
    layer_input = tokens * 64 * 4 / GIB
    # Every layer: 6 inputs and the one layer being recomputed.
    assert every.parts_gib["activations"] == pytest.approx(6 * layer_input + layer)
    # 5 layers kept whole and one layer's input, against 6 layers without checkpointing
    assert recomputing[0].parts_gib["activations"] == pytest.approx(5 * layer + layer_input)
    # A budget that two recomputed layers meet: the advice names 2; one that none meets: every layer (the most
    # recomputation can save, with the other advice after it).
    advice = plan(budget=recomputing[1].total_gib * 1.0001).advice
    assert any("train.checkpoint_layers: 2 (recompute the first 2 of 6 layers" in line for line in advice)
    advice = plan(budget=recomputing[4].total_gib * 0.999).advice
    assert any(line.startswith("train.gradient_checkpointing: true (recompute every layer") for line in advice)
    # Recomputing one layer and still over: the advice raises it.
    advice = plan(budget=recomputing[3].total_gib * 1.0001, gradient_checkpointing=True, checkpoint_layers=1).advice
    assert any("train.checkpoint_layers: 4 (" in line for line in advice)
