"""Two processes (gloo on CPU) reach the same weights as one process with the same global batch, and a
two-process checkpoint resumes on one process with that global batch to the same weights; with dropout, the
processes draw their own masks and resume to the weights of the uninterrupted run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_same_weights, chat_records, write_jsonl

from tunesmith.training.distributed import ProcessGroup


def write_config(tmp_path, model_dir, data, name: str, batch_size: int, output: str | None = None):
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"model: {{name: {model_dir}}}\n"
        f"data: {{train: {data}, eval_split: 0.2, max_length: 128, group_by_length: true}}\n"
        "method: {name: full}\n"
        f"train: {{max_steps: 4, batch_size: {batch_size}, lr: 1e-3, warmup: 0, eval_before: false, seed: 3, "
        "save_every: 2, eval_batch_size: 1}\n"
        f"output_dir: {tmp_path / (output or name)}\n"
    )
    return path


def train_one_process(config: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(config), *options],
                          capture_output=True, text=True)


def test_two_processes_equal_one_with_the_same_global_batch(tiny_llama_dir, tmp_path):
    # 13 training records: global micro-batches of 4, 4, 4 and 1 (in a shuffled order); the process left without
    # a record of the last runs a stand-in weighted 0 (that batch used to be skipped, and the 2 runs parted there).
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(16))
    single = write_config(tmp_path, tiny_llama_dir, data, "single", batch_size=4)
    double = write_config(tmp_path, tiny_llama_dir, data, "double", batch_size=2)
    one = train_one_process(single)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    two = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29533", "-m", "tunesmith.cli", "train", str(double)],
        capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, [line for line in two.stderr.splitlines() if "error" in line.lower()][:5]

    summary = json.loads((tmp_path / "double" / "summary.json").read_text())
    assert summary["processes"] == 2
    # The first process reports; the other trains silently (each printed every line).
    assert two.stdout.count("tokens in") == 1 and two.stderr.count("training") == 1, two.stderr
    rows = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    rows_two = [json.loads(line) for line in (tmp_path / "double" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert [row["loss"] for row in rows_two if "loss" in row] == pytest.approx(losses, rel=1e-5)
    # The final evaluation: 3 held-out records in batches of 1, 2 on one process and 1 on the other, the totals
    # added across them: one process's metrics.
    evaluation = json.loads((tmp_path / "single" / "summary.json").read_text())["eval"]
    assert evaluation["eval_tokens"] > 0 and summary["eval"] == pytest.approx(evaluation, rel=1e-5)
    expected = tmp_path / "single" / "model" / "model.safetensors"
    assert_same_weights(expected, tmp_path / "double" / "model" / "model.safetensors", rtol=1e-4)

    # Resume the two-process run from its step-2 checkpoint on ONE process with the same global batch
    # (batch 4 x 1): steps 3 and 4 replay the same data and end at the single run's weights.
    resumed = write_config(tmp_path, tiny_llama_dir, data, "resumed", batch_size=4, output="double")
    one_more = train_one_process(resumed, "--resume")
    assert one_more.returncode == 0, one_more.stderr[-2000:]
    assert_same_weights(expected, tmp_path / "double" / "model" / "model.safetensors", rtol=1e-4)
    # Another global batch would continue a different data order: refused before any step.
    wrong = write_config(tmp_path, tiny_llama_dir, data, "wrong", batch_size=2, output="double")
    refused = train_one_process(wrong, "--resume")
    assert refused.returncode == 2 and "set train.batch_size to 4" in refused.stderr + refused.stdout


def fake_group(rank: int, world: int) -> ProcessGroup:
    accelerator = SimpleNamespace(process_index=rank, num_processes=world, is_main_process=rank == 0,
                                  device=torch.device("cpu"))
    return ProcessGroup(accelerator)


def test_each_process_draws_its_own_numbers_and_the_generators_stay_equal():
    drawn, after = [], []
    for rank in (0, 1, 0):
        torch.manual_seed(5)
        with fake_group(rank, 2).own_random_draws():
            drawn.append(torch.rand(1000 + 500 * rank))  # the processes' steps draw different amounts
        after.append(torch.rand(3))
    assert not torch.equal(drawn[0], drawn[1][:1000])  # two processes, two streams
    assert torch.equal(drawn[0], drawn[2])  # the same process, the same stream again
    # After the step every process's generator is where one 64-bit draw leaves it, whatever the step drew.
    torch.manual_seed(5)
    torch.empty((), dtype=torch.int64).random_(-(1 << 63), None)
    one_draw_on = torch.rand(3)
    assert all(torch.equal(numbers, one_draw_on) for numbers in after)
    # One process: the step draws from the process's generator itself.
    torch.manual_seed(5)
    with fake_group(0, 1).own_random_draws():
        alone = torch.rand(1000)
    torch.manual_seed(5)
    assert torch.equal(alone, torch.rand(1000))


def test_two_processes_with_dropout_resume_to_the_uninterrupted_weights(tiny_bert_dir, tmp_path):
    """BERT's own dropout (0.1, hidden and attention) draws one number per element, so the processes' generators
    drifted apart on rows of different lengths, and resuming gave every process rank 0's state: the resumed run
    parted from the uninterrupted one at its first step."""
    words = ["good", "fine", "great", "nice", "bad", "poor", "dull", "awful"]
    records = [{"text": " ".join(words[(index + offset) % 8] for offset in range(1 + index % 9)),
                "label": "positive" if index % 2 else "negative"} for index in range(24)]
    data = write_jsonl(tmp_path / "labelled.jsonl", records)
    config = tmp_path / "dropout.yaml"
    config.write_text(
        f"model: {{name: {tiny_bert_dir}}}\n"
        f"data: {{train: {data}, eval_split: 0.0, max_length: 32}}\n"
        "task: classify\nmethod: {name: full}\n"
        "train: {max_steps: 4, batch_size: 3, lr: 1e-3, warmup: 0, eval_before: false, seed: 3, save_every: 2}\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    command = [torchrun, "--nproc_per_node", "2", "--master_port", "29534", "-m", "tunesmith.cli", "train", str(config)]
    whole = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    uninterrupted = tmp_path / "uninterrupted.safetensors"
    shutil.copy(tmp_path / "run" / "model" / "model.safetensors", uninterrupted)
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)  # from step 2
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_weights(uninterrupted, tmp_path / "run" / "model" / "model.safetensors", rtol=1e-6, atol=1e-7)
