"""Continual learning: starting from a previous run, replay, L2-SP / EWC / O-LoRA penalties, an adapter per task.

Every run here is a real `train()` on the tiny Llama (2 layers, hidden 64). Task A and task B are
small instruction sets with different answers, so training on B alone measurably forgets A.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_same_weights, classification_records, run_cli, run_config, write_jsonl
from safetensors.torch import load_file

from tunesmith.config import ModelConfig
from tunesmith.continual import ContinualConfig, prepare_continual
from tunesmith.continual.penalties import (
    AnchorPenalty,
    OrthogonalSubspacePenalty,
    anchors,
    diagonal_fisher,
    previous_lora_subspaces,
)
from tunesmith.data import prepare_data
from tunesmith.errors import ConfigError, ModelError
from tunesmith.models import load_model, load_run, load_tokenizer, read_run
from tunesmith.objectives import OBJECTIVES
from tunesmith.objectives.base import LossOutput
from tunesmith.training.loop import EXIT_INTERRUPTED, evaluate, train

# --- two tasks ---------------------------------------------------------------------------------------


def task_a_records(count: int = 16) -> list[dict]:
    return [{"prompt": f"Add {index} and {index}.", "response": f"The sum is {2 * index}."} for index in range(count)]


def task_b_records(count: int = 16) -> list[dict]:
    colours = ["red", "green", "blue", "yellow"]
    return [
        {"prompt": f"Which colour is box {index}?", "response": f"Box {index} is {colours[index % 4]}, friend."}
        for index in range(count)
    ]


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tasks")
    task_a = write_jsonl(folder / "task_a.jsonl", task_a_records())
    return task_a, write_jsonl(folder / "task_b.jsonl", task_b_records())


FULL_TRAIN = {"batch_size": 8, "max_steps": 30, "lr": 1e-3, "scheduler": "constant"}
LEARN_A = {**FULL_TRAIN, "max_steps": 60, "lr": 3e-3}
LORA = {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj", "up_proj"]}


@pytest.fixture(scope="module")
def full_run_a(tiny_llama_dir, task_files, tmp_path_factory) -> Path:
    """Task A learnt by full fine-tuning (eval loss on A about 0.3)."""
    config = run_config(tiny_llama_dir, task_files[0], tmp_path_factory.mktemp("runs") / "a-full", train=LEARN_A)
    assert train(config).exit_code == 0
    return config.output_dir


@pytest.fixture(scope="module")
def lora_run_a(tiny_llama_dir, task_files, tmp_path_factory) -> Path:
    """Task A learnt with LoRA."""
    config = run_config(
        tiny_llama_dir, task_files[0], tmp_path_factory.mktemp("runs") / "a-lora", method=LORA,
        train={**FULL_TRAIN, "lr": 1e-2, "max_steps": 10},
    )
    assert train(config).exit_code == 0
    return config.output_dir


def continued_config(previous: Path, train_file: Path, output_dir: Path, **sections):
    """A run config on `train_file` that starts from `previous` (its base model's name read from the run)."""
    return run_config(read_run(previous).model.name, train_file, output_dir, model={"from_run": str(previous)},
                      **sections)


def continue_on_b(previous: Path, task_files, output_dir: Path, continual: dict | None, **sections):
    """Task B from `previous`, evaluated on task A before and after (eval_loss = how much of A is left)."""
    task_a, task_b = task_files
    if continual is not None:
        sections["continual"] = continual
    train_section = {"eval_before": True, **sections.pop("train", FULL_TRAIN)}
    config = continued_config(previous, task_b, output_dir, data={"eval": str(task_a)}, train=train_section, **sections)
    result = train(config)
    assert result.exit_code == 0
    return result


def same_weights(left: torch.nn.Module, right: torch.nn.Module) -> bool:
    right_state = right.state_dict()
    return all(torch.equal(tensor, right_state[name]) for name, tensor in left.state_dict().items())


# --- starting from a previous run --------------------------------------------------------------------


def test_from_run_starts_from_the_full_runs_weights(full_run_a, tiny_llama_dir):
    started = load_model(ModelConfig(name=str(tiny_llama_dir), from_run=full_run_a), "sft")
    finished, _ = load_run(full_run_a, device="cpu")
    base = load_model(ModelConfig(name=str(tiny_llama_dir)), "sft")
    assert same_weights(started, finished)
    assert not same_weights(started, base)


def test_from_run_merges_the_lora_runs_adapter(lora_run_a, tiny_llama_dir):
    started = load_model(ModelConfig(name=str(tiny_llama_dir), from_run=lora_run_a), "sft")
    finished, _ = load_run(lora_run_a, device="cpu")
    assert not hasattr(started, "peft_config")  # a plain transformers model, ready for any method
    input_ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        expected = finished(input_ids=input_ids).logits
        merged = started.eval()(input_ids=input_ids).logits
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged, load_model(ModelConfig(name=str(tiny_llama_dir)), "sft")(input_ids).logits)


def test_from_run_keeps_a_classifiers_trained_head(tiny_bert_dir, tmp_path):
    train_file = write_jsonl(tmp_path / "sentiment.jsonl", classification_records(12))
    config = run_config(
        tiny_bert_dir, train_file, tmp_path / "a", task="classify", method={"name": "lora", "r": 4},
        train={**FULL_TRAIN, "max_steps": 3, "lr": 1e-2},
    )
    assert train(config).exit_code == 0
    labels = read_run(config.output_dir).label_names
    started = load_model(ModelConfig(name=str(tiny_bert_dir), from_run=config.output_dir), "classify", labels)
    finished, _ = load_run(config.output_dir, device="cpu")
    input_ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(started.eval()(input_ids).logits, finished(input_ids).logits)
    with pytest.raises(ModelError, match=r"model.from_run: .* classified into \['negative', 'positive'\]"):
        load_model(ModelConfig(name=str(tiny_bert_dir), from_run=config.output_dir), "classify", ["bad", "good"])


def test_from_run_refuses_another_model_kind(full_run_a, tiny_llama_dir):
    with pytest.raises(ModelError, match=r"model.from_run: .* was a sft run"):
        load_model(ModelConfig(name=str(tiny_llama_dir), from_run=full_run_a), "classify", ["neg", "pos"])


def test_a_continued_runs_base_is_the_previous_result(full_run_a, task_files, tmp_path):
    result = continue_on_b(full_run_a, task_files, tmp_path / "b", None, train={**FULL_TRAIN, "max_steps": 2})
    starting_point, _ = load_run(result.run_dir, base=True, device="cpu")
    previous, _ = load_run(full_run_a, device="cpu")
    assert same_weights(starting_point, previous)


# --- the penalties, on toy models ---------------------------------------------------------------------


def test_l2sp_is_zero_at_the_anchor_and_its_gradient_points_back():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    anchored = anchors(model)
    start = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    penalty = AnchorPenalty(anchored, weight=0.5)
    assert penalty(model).item() == 0.0

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    value = penalty(model)
    value.backward()
    for name, parameter in model.named_parameters():
        drift = parameter.detach() - start[name]
        torch.testing.assert_close(parameter.grad, 0.5 * drift)  # d/dtheta (w/2)|theta - theta*|^2
    expected = 0.25 * sum(((p.detach() - start[n]) ** 2).sum() for n, p in model.named_parameters())
    torch.testing.assert_close(value.detach(), expected)


def test_l2sp_on_lora_penalises_the_weight_update_scale_b_a(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model

    base = load_model(ModelConfig(name=str(tiny_llama_dir)), "sft")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    penalty = AnchorPenalty(anchors(model), weight=2.0)
    assert penalty(model).item() == 0.0  # B starts at zero: no update yet
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(0.1)
    expected = sum(
        (module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]).pow(2).sum()
        for module in (block.self_attn.q_proj for block in model.base_model.model.model.layers)
    )
    torch.testing.assert_close(penalty(model).detach(), expected.detach())  # 2.0 / 2 * |s B A|^2


@dataclass
class SquaredErrorObjective:
    """A toy objective for a linear model: loss_sum = sum over examples of (w.x + b - y)^2."""

    name: str = "toy"
    reference: None = None

    def collate(self, examples: list[dict], pad_id: int) -> dict:
        return {"x": torch.tensor([e["x"] for e in examples]), "y": torch.tensor([e["y"] for e in examples])}

    def loss(self, model, batch, settings) -> LossOutput:
        errors = model(batch["x"]).squeeze(-1) - batch["y"]
        return LossOutput(errors.pow(2).sum(), len(batch["y"]))


def test_ewc_fisher_equals_the_hand_computed_mean_squared_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    examples = [{"x": [1.0, 2.0, -1.0], "y": 0.5}, {"x": [0.0, -3.0, 2.0], "y": -1.0}, {"x": [2.0, 1.0, 1.0], "y": 2.0}]
    fisher_weight, fisher_bias = diagonal_fisher(
        model, [model.weight, model.bias], examples, SquaredErrorObjective(), None, 0, torch.device("cpu")
    )
    weight, bias = model.weight.detach()[0], model.bias.detach()[0]
    by_hand_weight, by_hand_bias = torch.zeros(3), torch.zeros(())
    for example in examples:
        x = torch.tensor(example["x"])
        residual = weight @ x + bias - example["y"]
        by_hand_weight += (2 * residual * x) ** 2  # d/dw (w.x + b - y)^2 = 2 (w.x + b - y) x
        by_hand_bias += (2 * residual) ** 2
    torch.testing.assert_close(fisher_weight[0], by_hand_weight / 3)
    torch.testing.assert_close(fisher_bias[0], by_hand_bias / 3)


def test_ewc_penalty_weighs_each_drift_by_its_fisher():
    model = torch.nn.Linear(2, 1, bias=False)
    anchored = anchors(model)
    fisher = [torch.tensor([[4.0, 0.0]])]
    penalty = AnchorPenalty(anchored, weight=1.0, importance=fisher)
    with torch.no_grad():
        model.weight.add_(torch.tensor([[1.0, 5.0]]))
    value = penalty(model)
    value.backward()
    assert value.item() == pytest.approx(0.5 * 4.0 * 1.0)  # the second weight's drift has no importance
    torch.testing.assert_close(model.weight.grad, torch.tensor([[4.0, 0.0]]))


def test_olora_penalty_is_zero_for_orthogonal_subspaces_and_sums_overlaps_otherwise():
    old = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])  # (R=2, in=4)
    orthogonal = torch.nn.Parameter(torch.tensor([[0.0, 0.0, 3.0, -1.0]]))  # (r=1, in=4)
    overlapping = torch.nn.Parameter(torch.tensor([[2.0, -1.0, 1.0, 0.0]]))
    assert OrthogonalSubspacePenalty([(old, orthogonal)], weight=0.5)(None).item() == 0.0
    value = OrthogonalSubspacePenalty([(old, overlapping)], weight=0.5)(None)
    assert value.item() == pytest.approx(0.5 * (2.0 + 1.0))  # |<a1, new>| + |<a2, new>|
    value.backward()
    torch.testing.assert_close(overlapping.grad, torch.tensor([[0.5, -0.5, 0.0, 0.0]]))


# --- config ----------------------------------------------------------------------------------------------


def test_continual_config_names_the_bad_key(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="did you mean 'ewc'"):
        ContinualConfig.model_validate({"regularizer": {"name": "ewk", "weight": 1.0}})
    with pytest.raises(ValidationError, match="file not found"):
        ContinualConfig.model_validate({"old_data": str(tmp_path / "missing.jsonl")})


def test_replay_without_a_previous_run_is_a_config_error(tiny_llama_dir, task_files, tmp_path):
    with pytest.raises(ConfigError, match="continual.old_data: needs model.from_run"):
        run_config(tiny_llama_dir, task_files[1], tmp_path / "x", continual={"replay": {"fraction": 0.5}})


def test_the_cli_trains_a_continued_run_and_names_a_bad_key(full_run_a, task_files, tmp_path, capsys):
    config = {
        "model": {"name": read_run(full_run_a).model.name, "from_run": str(full_run_a)},
        "data": {"train": str(task_files[1]), "eval_split": 0.0, "max_length": 128},
        "method": {"name": "full"},
        "train": {"batch_size": 4, "max_steps": 2, "lr": 1e-3, "warmup": 0, "eval_before": False},
        "continual": {"replay": {"fraction": 0.25}, "regularizer": {"name": "l2sp", "weight": 0.5}},
        "output_dir": str(tmp_path / "b"),
    }
    path = tmp_path / "continual.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    code, _, err = run_cli(capsys, "train", path)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    penalties = [row["continual_penalty"] for row in rows if "loss" in row]
    assert penalties[0] == 0.0 and penalties[1] > 0  # the first step starts at the anchor

    code, _, err = run_cli(capsys, "train", path, "--set", "continual.regularizer.name=ewk", "--overwrite")
    assert code == 2
    assert "continual.regularizer.name: unknown continual regularizer 'ewk' (did you mean 'ewc'?)" in err
    assert len(err.strip().splitlines()) == 1


# --- replay and the loop hook -------------------------------------------------------------------------


def test_replay_draws_a_fraction_of_the_previous_runs_training_examples(full_run_a, task_files, tmp_path):
    config = continued_config(full_run_a, task_files[1], tmp_path / "b", continual={"replay": {"fraction": 0.5}})
    tokenizer = load_tokenizer(config.model)
    objective = OBJECTIVES.get("sft")
    model = load_model(config.model, "sft")
    new_examples = [{"input_ids": [1, 2], "labels": [1, 2], "source": f"new:{i}"} for i in range(12)]
    continual = prepare_continual(config, model, tokenizer, new_examples, objective, torch.device("cpu"))
    assert len(continual.replay_examples) == 6
    assert all(example["source"].startswith(str(task_files[0])) for example in continual.replay_examples)
    assert len({example["source"] for example in continual.replay_examples}) == 6  # without replacement
    assert continual.penalty(model) is None


# --- forgetting: plain fine-tuning vs the guards ------------------------------------------------------


def test_ewc_l2sp_and_replay_each_forget_less_of_task_a_than_plain_fine_tuning(full_run_a, task_files, tmp_path):
    plain = continue_on_b(full_run_a, task_files, tmp_path / "plain", None)
    before, after_plain = plain.summary["eval_before"]["eval_loss"], plain.summary["eval"]["eval_loss"]
    # EWC's Fisher is small on a task the model fits well (its gradients are near zero): hence the large weight.
    guards = {
        "ewc": {"regularizer": {"name": "ewc", "weight": 1e6, "fisher_examples": 16}},
        "l2sp": {"regularizer": {"name": "l2sp", "weight": 0.5}},
        "replay": {"replay": {"fraction": 0.5}},
    }
    guarded = {name: continue_on_b(full_run_a, task_files, tmp_path / name, guard) for name, guard in guards.items()}
    assert after_plain > before + 0.5, (before, after_plain)  # training on B alone does forget A
    for name, result in guarded.items():
        after = result.summary["eval"]["eval_loss"]
        # Each guard saves at least a third of what plain fine-tuning loses on task A ...
        assert after < after_plain - (after_plain - before) / 3, (name, before, after_plain, after)

    # ... and still learns task B: most of plain fine-tuning's gain on B.
    config_b = continued_config(full_run_a, task_files[1], tmp_path / "unused")
    tokenizer = load_tokenizer(config_b.model)
    examples_b = prepare_data(config_b, tokenizer).train

    def loss_on_b(run_dir: Path) -> float:
        model, _ = load_run(run_dir, device="cpu")
        return evaluate(model, OBJECTIVES.get("sft"), config_b.objective, examples_b, tokenizer.pad_token_id, 8,
                        torch.device("cpu"))["eval_loss"]

    start_b, plain_b = loss_on_b(full_run_a), loss_on_b(plain.run_dir)
    for name, result in guarded.items():
        assert loss_on_b(result.run_dir) < start_b - 0.5 * (start_b - plain_b), name


def test_a_guarded_run_resumes_to_the_same_weights(full_run_a, task_files, tmp_path):
    """EWC's Fisher, its anchor and the replay buffer are rebuilt from the starting weights on resume."""
    sections = {
        "continual": {"regularizer": {"name": "ewc", "weight": 1e6, "fisher_examples": 4}, "replay": {"fraction": 0.5}},
        "train": {**FULL_TRAIN, "max_steps": 4, "save_every": 2},
    }
    straight = train(continued_config(full_run_a, task_files[1], tmp_path / "straight", **sections))
    config = continued_config(full_run_a, task_files[1], tmp_path / "resumed", **sections)
    assert train(config, should_stop=lambda step: step == 2).exit_code == EXIT_INTERRUPTED
    resumed = train(config, resume=True)
    assert resumed.exit_code == 0 and resumed.summary["steps"] == 4
    assert_same_weights(straight.run_dir / "model" / "model.safetensors",
                        resumed.run_dir / "model" / "model.safetensors")


# --- LoRA: an adapter per task, O-LoRA --------------------------------------------------------------


def test_adapter_per_task_keeps_the_old_adapter_frozen_and_active(lora_run_a, task_files, tmp_path):
    result = continue_on_b(
        lora_run_a, task_files, tmp_path / "b", {"adapter_per_task": True},
        method=LORA, train={**FULL_TRAIN, "lr": 1e-2, "max_steps": 5},
    )
    old_adapter = load_file(lora_run_a / "adapter" / "adapter_model.safetensors")
    new_adapter = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    model, _ = load_run(result.run_dir, device="cpu")
    assert set(model.base_model.active_adapters) == {"task_0", "default"}
    parameters = dict(model.named_parameters())
    for key, tensor in old_adapter.items():
        kept = parameters[key.replace(".weight", ".task_0.weight")]
        assert torch.equal(kept, tensor), key  # task A's adapter is exactly as task A left it
    assert any(not torch.equal(new_adapter[key], old_adapter[key]) for key in old_adapter if "lora_B" in key)


def test_adapter_per_task_starts_exactly_at_the_previous_result(lora_run_a, task_files, tmp_path):
    config = continued_config(
        lora_run_a, task_files[1], tmp_path / "b", method=LORA, continual={"adapter_per_task": True}
    )
    started = load_model(config.model, "sft", keep_adapters=True)
    from tunesmith.methods import METHODS

    started = METHODS.get("lora").apply(started, config.method, "sft")
    prepare_continual(config, started, load_tokenizer(config.model), [], OBJECTIVES.get("sft"), torch.device("cpu"))
    trainable = {name for name, parameter in started.named_parameters() if parameter.requires_grad}
    assert trainable and all(".default." in name for name in trainable)
    finished, _ = load_run(lora_run_a, device="cpu")
    input_ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(started.eval()(input_ids).logits, finished(input_ids).logits)


def test_olora_reads_the_previous_subspaces_and_penalises_overlap(lora_run_a, task_files, tmp_path):
    subspaces = previous_lora_subspaces(lora_run_a)
    assert subspaces and all(tensor.shape[0] == LORA["r"] for tensor in subspaces.values())
    config = continued_config(
        lora_run_a, task_files[1], tmp_path / "b", method=LORA,
        continual={"regularizer": {"name": "olora", "weight": 0.5}},
    )
    from tunesmith.methods import METHODS

    model = METHODS.get("lora").apply(load_model(config.model, "sft"), config.method, "sft")
    continual = prepare_continual(config, model, load_tokenizer(config.model), [], OBJECTIVES.get("sft"),
                                  torch.device("cpu"))
    value = continual.penalty(model)
    expected = 0.5 * sum(
        (subspaces[name].float() @ module.lora_A["default"].weight.T).abs().sum()
        for name, module in model.named_modules()
        if name in subspaces
    )
    torch.testing.assert_close(value.detach(), expected.detach())
    value.backward()
    assert all(
        parameter.grad is not None for name, parameter in model.named_parameters() if "lora_A.default" in name
    )


def test_olora_trains_and_logs_its_penalty(lora_run_a, task_files, tmp_path):
    guard = {"regularizer": {"name": "olora", "weight": 0.5}}
    result = continue_on_b(
        lora_run_a, task_files, tmp_path / "b", guard, method=LORA, train={**FULL_TRAIN, "max_steps": 3}
    )
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    penalties = [row["continual_penalty"] for row in rows if "continual_penalty" in row]
    assert len(penalties) == 3 and all(value > 0 for value in penalties)
