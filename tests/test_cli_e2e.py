"""The CLI end to end on the real built-in models and real data (a few steps each)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tunesmith(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.mark.e2e
def test_lora_sft_on_smollm2_then_generate_and_export(tmp_path):
    run_dir = tmp_path / "sft"
    result = tunesmith(
        "train", "examples/demo-sft-smollm2.yaml",
        "--set", f"output_dir={run_dir}", "--set", "data.limit=24", "--set", "data.max_length=160",
        "--set", "train.max_steps=2", "--set", "data.eval_split=0.25",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval"]["eval_loss"] > 0 and summary["eval_before"]["eval_loss"] > 0
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert Path(adapter_config["base_model_name_or_path"]).is_dir()  # plain peft can find the base

    answer = tunesmith("generate", str(run_dir), "--prompt", "What is 2 + 3?", "--max-new-tokens", "8")
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert answer.stdout.strip()

    merged = tunesmith("export", str(run_dir), "--merge", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert (tmp_path / "merged" / "model.safetensors").exists()


@pytest.mark.e2e
def test_lora_classify_on_minilm_with_sst2(tmp_path):
    run_dir = tmp_path / "cls"
    result = tunesmith(
        "train", "examples/demo-classify-minilm.yaml",
        "--set", f"output_dir={run_dir}", "--set", "data.limit=128", "--set", "data.eval_limit=64",
        "--set", "train.max_steps=3",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0 <= summary["eval"]["accuracy"] <= 1 and "f1_macro" in summary["eval"]
    assert json.loads((run_dir / "labels.json").read_text()) == ["0", "1"]


def test_bad_data_line_fails_with_file_and_line_or_goes_to_rejects(tmp_path, tiny_llama_dir):
    data = tmp_path / "data.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    data.write_text(f"{good}\n{good}\n{{not json\n{good}\n")
    common = [
        "--set", f"model.name={tiny_llama_dir}", "--set", f"data.train={data}", "--set", "data.eval_split=0",
        "--set", "method.name=full", "--set", "train.max_steps=1", "--set", "train.eval_before=false",
    ]
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{name: x}}\ndata: {{train: {data}}}\noutput_dir: {tmp_path / 'fail'}\n")

    failed = tunesmith("train", str(config), *common)
    assert failed.returncode == 2
    assert f"{data}:3:" in failed.stderr and "Traceback" not in failed.stderr

    skipped = tunesmith("train", str(config), *common, "--set", "data.on_error=skip",
                        "--set", f"output_dir={tmp_path / 'skip'}")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    rejects = [json.loads(line) for line in (tmp_path / "skip" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["source"] == f"{data}:3"
    stats = json.loads((tmp_path / "skip" / "summary.json").read_text())["data"]
    assert stats["read"] == 4 == stats["used_train"] + stats["used_eval"] + stats["rejected"]
