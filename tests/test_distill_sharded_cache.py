"""distill's train.cache_reference pass in a sharded run: the teacher the loop sharded like the student runs the
one pass, every process on its share of the examples, so no process loads it whole. The stored top-k equal
those of one process that loads the teacher whole, training on them equals one process, and a second run reads
the store without running the teacher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same_weights, chat_records, run_config, write_jsonl
from safetensors import safe_open

from tunesmith.data import prepare_data
from tunesmith.models import load_tokenizer
from tunesmith.objectives import distill
from tunesmith.objectives.distill import cache_teacher_log_probs

SHARDED_PASS = "teacher log-probs: one pass of the teacher sharded across 2 processes"
WHOLE_PASS = "teacher log-probs: one pass of the teacher, loaded whole"
READ = "teacher log-probs: read from"


def stored_tensors(cache: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    """The one teacher cache file under $TUNESMITH_CACHE `cache`: its name (the key), tensors and metadata."""
    [path] = list((cache / "teacher_log_probs").glob("*.safetensors"))
    with safe_open(str(path), framework="pt") as handle:
        names = list(handle.keys())  # a safetensors handle is not a dict: no iteration over it
        return path.name, {name: handle.get_tensor(name) for name in names}, handle.metadata()


def assert_same_store(expected: tuple, actual: tuple) -> None:
    """Same key, metadata, ids and loss positions; log-probs equal to float32 tolerance."""
    (expected_name, expected_tensors, expected_metadata), (actual_name, actual_tensors, actual_metadata) = (
        expected, actual)
    assert actual_name == expected_name and actual_metadata == expected_metadata
    assert actual_tensors.keys() == expected_tensors.keys()
    assert torch.equal(actual_tensors["teacher_top_ids"], expected_tensors["teacher_top_ids"])
    assert torch.equal(actual_tensors["loss_positions"], expected_tensors["loss_positions"])
    torch.testing.assert_close(actual_tensors["teacher_top_log_probs"], expected_tensors["teacher_top_log_probs"],
                               rtol=1e-5, atol=1e-5)


def losses(run_dir: Path) -> list[float]:
    """The training steps' losses (metrics.jsonl also holds the final evaluation's line)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record]


def launch(config: Path, cache: Path, port: int | None = None) -> subprocess.CompletedProcess:
    """`tunesmith train config` with its own $TUNESMITH_CACHE, on one process or (port) two under torchrun."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    command = [*(torchrun if port else [sys.executable]), "-m", "tunesmith.cli", "train", str(config)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "TUNESMITH_CACHE": str(cache)})
    assert completed.returncode == 0, [line for line in completed.stderr.splitlines() if "rror" in line][:5]
    return completed


@pytest.fixture(scope="module")
def sharded_and_single(tiny_llama_dir, teacher_dir, tmp_path_factory):
    """One run on one process (batch 4, the teacher loaded whole) and one on 2 sharded processes (batch 2), each
    with its own cache folder. 8 train + 3 eval records in batches of 4: 3 teacher batches, so in the second
    round one process has none and runs a discarded one."""
    folder = tmp_path_factory.mktemp("sharded_cache")
    records = chat_records(11)
    train_file, eval_file = write_jsonl(folder / "train.jsonl", records[:8]), write_jsonl(folder / "eval.jsonl",
                                                                                        records[8:])

    def write(name: str, batch_size: int) -> Path:
        path = folder / f"{name}.yaml"
        path.write_text(
            f"model: {{name: {tiny_llama_dir}}}\n"
            f"data: {{train: {train_file}, eval: {eval_file}, max_length: 64, group_by_length: true}}\n"
            f"task: distill\nobjective: {{teacher: {teacher_dir}, teacher_top_k: 8, teacher_batch_size: 4}}\n"
            "method: {name: full}\n"
            f"train: {{max_steps: 2, batch_size: {batch_size}, lr: 1e-3, warmup: 0, eval_before: false, seed: 5, "
            "sharding: fsdp, cache_reference: true}\n"
            f"output_dir: {folder / name}\n")
        return path

    single = launch(write("single", 4), folder / "cache_single")
    sharded = launch(write("sharded", 2), folder / "cache_sharded", port=29600)
    return {"folder": folder, "write": write, "single": single, "sharded": sharded}


def test_sharded_cache_pass_stores_what_one_process_stores_and_trains_alike(sharded_and_single):
    folder = sharded_and_single["folder"]
    single, sharded = sharded_and_single["single"].stderr, sharded_and_single["sharded"].stderr
    # Seen from outside: the one process loaded the teacher whole; the sharded run ran the teacher the loop
    # sharded (process 0 says so once), and no process loaded it whole.
    assert WHOLE_PASS in single and SHARDED_PASS not in single
    assert sharded.count(SHARDED_PASS) == 1 and WHOLE_PASS not in sharded
    assert_same_store(stored_tensors(folder / "cache_single"), stored_tensors(folder / "cache_sharded"))

    summary = json.loads((folder / "sharded" / "summary.json").read_text())
    assert (summary["processes"], summary["sharding"]) == (2, "fsdp")
    assert losses(folder / "sharded") == pytest.approx(losses(folder / "single"), rel=1e-5)
    assert_same_weights(folder / "single" / "model", folder / "sharded" / "model", rtol=1e-4, atol=1e-5)


def test_second_sharded_run_reads_the_store_without_running_the_teacher(sharded_and_single):
    folder = sharded_and_single["folder"]
    [stored] = list((folder / "cache_sharded" / "teacher_log_probs").glob("*.safetensors"))
    written = stored.stat().st_mtime_ns
    again = launch(sharded_and_single["write"]("sharded_again", 2), folder / "cache_sharded", port=29601)
    # Every process follows process 0's finding: none waits in a collective of a pass the others skip.
    assert READ in again.stderr and SHARDED_PASS not in again.stderr and WHOLE_PASS not in again.stderr
    assert stored.stat().st_mtime_ns == written
    assert list((folder / "cache_sharded" / "teacher_log_probs").glob("*.safetensors")) == [stored]
    assert losses(folder / "sharded_again") == pytest.approx(losses(folder / "sharded"), rel=1e-6)


def test_sharded_pass_never_loads_the_teacher_and_equals_the_whole_teacher(
    one_process_group, tiny_llama_dir, teacher_dir, tmp_path, monkeypatch, capsys
):
    """In-process, on a world of one: the hook given a teacher sharded with `shard_layers` runs it and never
    calls `load_teacher`; the values it stores are those of the pass with the teacher loaded whole."""
    from tunesmith.training.sharding import place_unsharded, shard_layers, sharded_across_processes

    records = chat_records(10)
    config = run_config(tiny_llama_dir, write_jsonl(tmp_path / "train.jsonl", records[:7]), tmp_path / "run",
                        task="distill", data={"eval": str(write_jsonl(tmp_path / "eval.jsonl", records[7:]))},
                        objective={"teacher": str(teacher_dir), "teacher_top_k": 8, "teacher_batch_size": 3})
    settings = config.objective

    def examples() -> list[dict]:
        data = prepare_data(config, load_tokenizer(config.model))
        return data.train + data.eval

    teacher, _ = distill.load_teacher(str(teacher_dir), "cpu")
    shard_layers(teacher, reshard_after_forward=True)
    place_unsharded(teacher, torch.device("cpu"))
    assert sharded_across_processes(teacher)
    real_load_teacher = distill.load_teacher

    def no_whole_teacher(*args, **kwargs):
        raise AssertionError("the sharded pass loaded the teacher whole")

    monkeypatch.setattr(distill, "load_teacher", no_whole_teacher)
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "sharded"))
    from_sharded = examples()
    loads = []

    def load_sharded_teacher():
        loads.append(1)
        return teacher

    cache_teacher_log_probs(load_sharded_teacher, from_sharded, settings)
    assert "one pass of the teacher sharded across 1 processes" in capsys.readouterr().err
    assert len(loads) == 1
    again = examples()  # the same examples again: read from the store, the teacher not even loaded
    cache_teacher_log_probs(load_sharded_teacher, again, settings)
    assert READ in capsys.readouterr().err and len(loads) == 1
    assert all(torch.equal(first["teacher_top_ids"], second["teacher_top_ids"])
               for first, second in zip(from_sharded, again, strict=True))

    monkeypatch.setattr(distill, "load_teacher", real_load_teacher)
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "whole"))
    from_whole = examples()
    cache_teacher_log_probs(None, from_whole, settings)
    assert WHOLE_PASS in capsys.readouterr().err
    assert_same_store(stored_tensors(tmp_path / "whole"), stored_tensors(tmp_path / "sharded"))
    for whole, sharded in zip(from_whole, from_sharded, strict=True):  # what training reads, example by example
        assert sharded["teacher_top_log_probs"].shape == (sum(label != -100 for label in whole["labels"][1:]), 8)
        assert torch.equal(sharded["teacher_top_ids"], whole["teacher_top_ids"])
        torch.testing.assert_close(sharded["teacher_top_log_probs"], whole["teacher_top_log_probs"],
                                   rtol=1e-5, atol=1e-5)
