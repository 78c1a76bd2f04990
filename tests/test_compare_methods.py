"""`tunesmith compare-methods` end to end on the tiny Llama: two methods x two steps, with an eval suite
(so learning and forgetting are filled in), through the real entry point."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import chat_records, run_cli, write_jsonl

from tunesmith.compare_methods import best_trial, parse_learning_rates, parse_methods, trial_learning_rates
from tunesmith.errors import ConfigError
from tunesmith.methods import METHODS

tunesmith = run_cli  # tunesmith(capsys, *args) -> (exit code, stdout, stderr)


def test_two_methods_two_steps(tiny_llama_dir, tmp_path, capsys):
    records = chat_records(24)
    train_file = write_jsonl(tmp_path / "train.jsonl", records[:16])
    eval_file = write_jsonl(tmp_path / "eval.jsonl", records[16:])
    target_text = tmp_path / "chats.txt"
    target_text.write_text("\n\n".join(f"{index} plus {index} is {2 * index}." for index in range(16, 24)))
    retain_text = tmp_path / "general.txt"
    retain_text.write_text("Natalia sold clips to 48 of her friends in April.\n\nWeng earns 12 an hour.\n")
    config = {
        "model": {"name": str(tiny_llama_dir)},
        "data": {"train": str(train_file), "eval": str(eval_file), "max_length": 128},
        "task": "sft",
        "method": {"name": "lora", "r": 4},
        "train": {"batch_size": 4, "max_steps": 50, "warmup": 0, "seed": 0},
        "output_dir": str(tmp_path / "unused"),
        "eval": {"name": "tiny", "tasks": [
            {"name": "chats", "type": "perplexity", "role": "target", "data": str(target_text), "window": 64},
            {"name": "general", "type": "perplexity", "role": "retain", "data": str(retain_text), "window": 64},
        ]},
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    output = tmp_path / "compare"

    code, out, err = tunesmith(
        capsys, "compare-methods", str(config_path), "--methods", "full,lora", "--steps", "2",
        "--lr", "full=1e-3", "--no-isolate", "--output", str(output),
    )
    assert code == 0, err

    rows = {row["method"]: row for row in json.loads((output / "results.json").read_text())["methods"]}
    assert list(rows) == ["full", "lora"]
    for name, row in rows.items():
        assert row["status"] == "ok"
        assert row["steps"] == 2  # --steps replaced the config's 50
        assert row["metric"] == "eval_loss"
        assert row["metric_before"] is not None and row["metric_after"] is not None
        assert row["learning"] is not None and row["forgetting"] is not None
        assert row["tokens_per_s"] > 0
        assert (output / name / "summary.json").is_file()
    assert rows["full"]["lr"] == 1e-3  # given
    assert rows["lora"]["lr"] == METHODS.get("lora").default_lr  # the method's own
    assert rows["lora"]["trainable_params"] < rows["full"]["trainable_params"]
    assert rows["full"]["trainable_params"] == rows["full"]["total_params"]
    # the config's own method keeps its settings (r 4); another method starts from its defaults
    assert yaml.safe_load((output / "lora" / "config.yaml").read_text())["method"]["r"] == 4
    # in one process, peak memory is comparable between methods on CUDA only (reset between runs)
    assert (rows["full"]["peak_memory_mb"] is None) == (not torch.cuda.is_available())
    assert "lora" in out and "full" in out  # the table
    report = (output / "report.html").read_text()
    assert "<table" in report and "data:image/png;base64," in report


def test_arguments_are_checked_in_one_line():
    with pytest.raises(ConfigError, match=r"--methods: unknown method 'lorra' \(did you mean 'lora'"):
        parse_methods("full,lorra")
    with pytest.raises(ConfigError, match="names a method twice"):
        parse_methods("lora,lora")
    with pytest.raises(ConfigError, match="'prefix' is not one of --methods"):
        parse_learning_rates(["prefix=1e-2"], ["full", "lora"])
    with pytest.raises(ConfigError, match="expected METHOD=VALUE"):
        parse_learning_rates(["1e-2"], ["lora"])


def test_learning_rate_trials_span_the_recommended_range_and_the_best_is_kept():
    low, high = METHODS.get("lora").lr_range
    rates = trial_learning_rates("lora", 3)
    assert rates[0] == pytest.approx(low) and rates[-1] == pytest.approx(high)
    assert rates[1] == pytest.approx((low * high) ** 0.5, rel=0.01)  # the geometric middle
    assert trial_learning_rates("lora", 1) == [METHODS.get("lora").default_lr]
    assert all(METHODS.get(name).lr_range is not None for name in METHODS.names())

    def trial(lr, metric, value, status="ok"):
        return {"method": "lora", "lr": lr, "metric": metric, "metric_after": value, "status": status}

    best = best_trial([trial(1e-4, "accuracy", 0.6), trial(3e-4, "accuracy", 0.8), trial(1e-3, "accuracy", 0.7)])
    assert best["lr"] == 3e-4 and [row["lr"] for row in best["lr_trials"]] == [1e-4, 3e-4, 1e-3]
    assert best_trial([trial(1e-4, "eval_loss", 2.0), trial(3e-4, "eval_loss", 1.5)])["lr"] == 3e-4
    assert best_trial([trial(1e-4, "accuracy", None, "failed (exit 1)"), trial(3e-4, "accuracy", 0.5)])["lr"] == 3e-4


def test_lr_trials_run_each_rate_in_its_own_run_directory(tiny_llama_dir, tmp_path, capsys):
    train_file = write_jsonl(tmp_path / "train.jsonl", chat_records(12))
    config = {
        "model": {"name": str(tiny_llama_dir)},
        "data": {"train": str(train_file), "eval_split": 0.25, "max_length": 96},
        "task": "sft", "method": {"name": "lora", "r": 4},
        "train": {"batch_size": 4, "max_steps": 2, "warmup": 0, "seed": 0},
        "output_dir": str(tmp_path / "unused"),
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    output = tmp_path / "compare"
    code, _, err = tunesmith(capsys, "compare-methods", str(config_path), "--methods", "lora",
                             "--lr-trials", "2", "--no-isolate", "--output", str(output))
    assert code == 0, err
    (row,) = json.loads((output / "results.json").read_text())["methods"]
    tried = [trial["lr"] for trial in row["lr_trials"]]
    assert tried == trial_learning_rates("lora", 2) and row["lr"] in tried
    assert all((output / "lora" / f"lr-{rate:g}" / "summary.json").is_file() for rate in tried)
    losses = [trial["metric_after"] for trial in row["lr_trials"]]
    assert row["metric_after"] == min(losses)
