"""The loop, end to end on tiny models: learning, what trains, accumulation, resume, early stopping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import assert_same_weights, chat_records, classification_records, run_config, write_jsonl
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tunesmith.data.collate import batch_order, collate_padded
from tunesmith.methods import METHODS
from tunesmith.models import load_model
from tunesmith.objectives import OBJECTIVES
from tunesmith.training import EXIT_INTERRUPTED, train
from tunesmith.training.loop import accumulate_gradients, run_accelerator


@pytest.fixture
def chat_file(tmp_path):
    return write_jsonl(tmp_path / "chats.jsonl", chat_records(8))


def losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


def test_memorises_eight_records(tiny_llama_dir, chat_file, tmp_path):
    schedule = {"max_steps": 150, "batch_size": 8, "lr": 5e-3, "scheduler": "constant"}
    config = run_config(tiny_llama_dir, chat_file, tmp_path / "run", train=schedule)
    result = train(config)
    history = losses(result.run_dir)
    assert result.exit_code == 0
    assert history[-1] < 0.25 * history[0], history


def trained_names(config, model_dir) -> set[str]:
    """Names the method makes trainable, read off a fresh model (the expectation, not the result)."""
    model = load_model(config.model, config.task, ["negative", "positive"] if config.task == "classify" else None)
    model = METHODS.get(config.method.name).apply(model, config.method, config.task)
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


@pytest.mark.parametrize(
    ("task", "method"),
    [
        ("sft", {"name": "full"}),
        ("sft", {"name": "freeze", "layers": 1}),
        ("classify", {"name": "freeze", "bitfit": True}),
        ("classify", {"name": "full"}),
    ],
)
def test_every_trainable_parameter_changes_and_no_frozen_one(
    task, method, tiny_llama_dir, tiny_bert_dir, tmp_path
):
    model_dir = tiny_llama_dir if task == "sft" else tiny_bert_dir
    records = chat_records(8) if task == "sft" else classification_records(4)
    data = write_jsonl(tmp_path / "data.jsonl", records)
    config = run_config(model_dir, data, tmp_path / "run", task=task, method=method, train={"max_steps": 3})
    expected = trained_names(config, model_dir)
    result = train(config)

    base = load_model(config.model, task, ["negative", "positive"] if task == "classify" else None)
    before = {name: parameter.detach() for name, parameter in base.named_parameters()}
    after = load_file(result.run_dir / "model" / "model.safetensors")
    changed = {name for name, tensor in after.items() if name in before and not torch.equal(tensor, before[name])}
    head = {name for name in before if name.startswith(("classifier.", "score."))}
    # A new head starts random, so "unchanged" cannot be read off a second fresh copy of it.
    assert changed - head == expected - head
    assert head <= expected if task == "classify" else not head
    assert result.summary["trainable_params"] < result.summary["total_params"] or method["name"] == "full"


def test_lora_trains_adapters_only_and_reloads_in_plain_peft(tiny_llama_dir, chat_file, tmp_path):
    config = run_config(
        tiny_llama_dir, chat_file, tmp_path / "run", method={"name": "lora", "r": 4}, train={"max_steps": 3}
    )
    result = train(config)
    adapter = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert all(tensor.abs().sum() > 0 for name, tensor in adapter.items() if "lora_B" in name)

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    original = {name: parameter.detach().clone() for name, parameter in base.named_parameters()}
    tuned = PeftModel.from_pretrained(base, result.run_dir / "adapter")
    for name, parameter in tuned.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(parameter, original[name.replace(".base_layer", "")]), name
    assert result.summary["trainable_params"] == sum(tensor.numel() for tensor in adapter.values())


def test_gradient_is_split_invariant(tiny_llama_dir):
    """Normalising by the step's token count: 8 x 1 and 2 x 4 give the same gradient; mean-of-means does not."""
    from tunesmith.config import ModelConfig

    objective = OBJECTIVES.get("sft")
    model = load_model(ModelConfig(name=str(tiny_llama_dir)), "sft")
    examples = [
        {"input_ids": list(range(5, 5 + length)), "labels": [-100] * 2 + list(range(7, 5 + length))}
        for length in (4, 9, 17, 30, 6, 12, 25, 8)
    ]
    accelerator = run_accelerator("no")

    def gradient(batch_size: int) -> torch.Tensor:
        model.zero_grad()
        batches = [[collate_padded(examples[i : i + batch_size], 0)] for i in range(0, 8, batch_size)]
        accumulate_gradients(model, objective, None, batches, accelerator)  # fills .grad
        return torch.cat([parameter.grad.flatten() for parameter in model.parameters()])

    whole, split = gradient(8), gradient(2)
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-7)

    model.zero_grad()  # the bug this guards against: averaging per-micro-batch means
    for start in range(0, 8, 2):
        output = objective.loss(model, collate_padded(examples[start : start + 2], 0), None)
        (output.loss_sum / output.num_loss_tokens / 4).backward()
    mean_of_means = torch.cat([parameter.grad.flatten() for parameter in model.parameters()])
    assert not torch.allclose(mean_of_means, whole, rtol=1e-2, atol=1e-6)


def test_batch8_equals_batch2_times_accumulation4(tiny_llama_dir, chat_file, tmp_path):
    common = {"max_steps": 2, "max_grad_norm": None, "seed": 5}
    data = {"group_by_length": False}
    one = train(run_config(tiny_llama_dir, chat_file, tmp_path / "a", data=data,
                           train={**common, "batch_size": 8, "grad_accum": 1}))
    four = train(run_config(tiny_llama_dir, chat_file, tmp_path / "b", data=data,
                            train={**common, "batch_size": 2, "grad_accum": 4}))
    assert losses(one.run_dir) == pytest.approx(losses(four.run_dir), rel=1e-5)
    weights_one = load_file(one.run_dir / "model" / "model.safetensors")
    weights_four = load_file(four.run_dir / "model" / "model.safetensors")
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_four[name], tensor, rtol=1e-5, atol=1e-6)


def test_resume_gives_the_same_weights(tiny_llama_dir, chat_file, tmp_path):
    """Train 6 steps == train 3, stop, resume to 6 (LoRA dropout on, so RNG state matters)."""
    sections = {
        "method": {"name": "lora", "r": 4, "dropout": 0.1},
        "train": {"max_steps": 6, "batch_size": 3, "save_every": 3},
    }
    straight = train(run_config(tiny_llama_dir, chat_file, tmp_path / "straight", **sections))

    config = run_config(tiny_llama_dir, chat_file, tmp_path / "resumed", **sections)
    stopped = train(config, should_stop=lambda step: step == 3)
    assert stopped.exit_code == EXIT_INTERRUPTED
    assert (tmp_path / "resumed" / "checkpoints" / "step-000003").is_dir()
    resumed = train(config, resume=True)
    assert resumed.exit_code == 0 and resumed.summary["steps"] == 6

    assert losses(resumed.run_dir) == pytest.approx(losses(straight.run_dir), rel=1e-5)
    assert_same_weights(straight.run_dir / "adapter" / "adapter_model.safetensors",
                        resumed.run_dir / "adapter" / "adapter_model.safetensors")


def test_early_stopping_exports_the_best_checkpoint(tiny_llama_dir, chat_file, tmp_path):
    config = run_config(
        tiny_llama_dir, chat_file, tmp_path / "run",
        data={"eval": str(chat_file)},
        train={"max_steps": 20, "eval_every": 1, "early_stopping": {"patience": 1, "min_delta": 100.0}},
    )
    result = train(config)
    assert result.summary["stopped_early"] is True
    assert result.summary["steps"] == 2
    assert result.summary["exported_step"] == 1 == result.summary["best_step"]
    assert result.summary["best"]["eval_loss"] == pytest.approx(
        json.loads((result.run_dir / "checkpoints" / "best" / "best.json").read_text())["metrics"]["eval_loss"]
    )


def test_classify_reports_accuracy_and_f1(tiny_bert_dir, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", classification_records(16))
    config = run_config(
        tiny_bert_dir, data, tmp_path / "run", task="classify", method={"name": "lora", "r": 4},
        data={"eval_split": 0.25}, train={"max_steps": 4, "eval_before": True},
    )
    result = train(config)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    for part in ("eval_before", "eval", "best"):
        assert {"eval_loss", "accuracy", "f1_macro"} <= set(summary[part])
    for key in ("steps", "train_tokens", "train_seconds", "trainable_params", "total_params", "peak_memory_mb"):
        assert summary[key] > 0
    assert json.loads((result.run_dir / "labels.json").read_text()) == ["negative", "positive"]
    adapter = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    assert any("classifier" in name for name in adapter)  # the new head is trained in full and saved


def test_existing_run_dir_is_refused_before_work(tiny_llama_dir, chat_file, tmp_path):
    from tunesmith.errors import ConfigError

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds files"):
        train(run_config(tiny_llama_dir, chat_file, tmp_path / "run"))
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        train(run_config(tiny_llama_dir, chat_file, tmp_path / "other"), resume=True)


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tiny_llama_dir, chat_file, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{name: {tiny_llama_dir}}}\n"
        f"data: {{train: {chat_file}, eval_split: 0.0, max_length: 128}}\n"
        "method: {name: full}\ntrain: {max_steps: 100000, batch_size: 2, eval_before: false}\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )
    command = [sys.executable, "-m", "tunesmith.cli", "train", str(config)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr
    checkpoints = list((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1
    stopped_at = int(checkpoints[0].name.split("-")[1])

    resumed = subprocess.run(
        [*command, "--resume", "--set", f"train.max_steps={stopped_at + 2}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == stopped_at + 2


def test_order_covers_every_record_once_per_epoch():
    order = batch_order([5] * 10, 3, seed=1, epoch=0, group_by_length=True)
    assert sorted(index for batch in order for index in batch) == list(range(10))


def test_sample_weights_file_reaches_the_loss(tiny_bert_dir, tmp_path):
    """Weighting one class 0 makes the run learn only the other: the weighted class's records do not count."""
    data = write_jsonl(tmp_path / "data.jsonl", classification_records(8))
    weights = tmp_path / "weights.jsonl"
    weights.write_text("".join(
        json.dumps({"source": f"{data}:{line}", "weight": 0.0 if record["label"] == "negative" else 1.0}) + "\n"
        for line, record in enumerate(classification_records(8), start=1)
    ))
    config = run_config(tiny_bert_dir, data, tmp_path / "run", task="classify",
                        data={"sample_weights": str(weights), "eval": str(data)},
                        train={"max_steps": 15, "batch_size": 16, "lr": 5e-3, "eval_before": False})
    result = train(config)
    assert result.summary["eval"]["accuracy"] == pytest.approx(0.5)  # everything predicted positive
