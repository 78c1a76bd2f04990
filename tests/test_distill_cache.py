"""distill with train.cache_reference: the teacher's top-k log-probs are computed once, stored as safetensors
and reused; the loss on them equals the loss with the teacher run on the fly, a second run never loads the
teacher, and the key changes with the data."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import chat_records, run_config, write_jsonl
from safetensors import safe_open

from tunesmith.data import prepare_data
from tunesmith.data.collate import collate_padded
from tunesmith.errors import ConfigError
from tunesmith.models import load_model, load_tokenizer
from tunesmith.objectives import distill
from tunesmith.objectives.distill import (
    cache_key,
    cache_teacher_log_probs,
    collate_distill,
    distill_loss,
    teacher_logits,
    teacher_rows,
)
from tunesmith.training import train


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distill_cache_data")
    records = chat_records(24)
    return write_jsonl(folder / "train.jsonl", records[:20]), write_jsonl(folder / "eval.jsonl", records[20:])


@pytest.fixture
def teacher_cache(tmp_path, monkeypatch):
    """An empty $TUNESMITH_CACHE for each test; the teacher log-probs go to its teacher_log_probs/."""
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "teacher_log_probs"


@pytest.fixture
def teacher_loads(monkeypatch):
    """How many times the teacher's weights were loaded (the on-the-fly path's per-process cache cleared)."""
    calls = []
    real_load_teacher = distill.load_teacher

    def counting_load_teacher(*args, **kwargs):
        calls.append(args)
        return real_load_teacher(*args, **kwargs)

    distill.cached_teacher.cache_clear()
    monkeypatch.setattr(distill, "load_teacher", counting_load_teacher)
    return calls


def _config(student_dir, teacher_dir, data_files, output_dir, objective=None, data=None, **sections):
    train_file, eval_file = data_files
    return run_config(
        student_dir, train_file, output_dir, task="distill",
        objective={"teacher": str(teacher_dir), "teacher_top_k": 16, **(objective or {})},
        data={"eval": str(eval_file), **(data or {})}, **sections,
    )


def _fresh_examples(config):
    data = prepare_data(config, load_tokenizer(config.model))
    return data.train + data.eval


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_loss_with_stored_top_k_equals_loss_with_teacher_on_the_fly(
    divergence, tiny_llama_dir, teacher_dir, data_files, tmp_path, teacher_cache
):
    config = _config(tiny_llama_dir, teacher_dir, data_files, tmp_path / "run",
                     {"divergence": divergence, "temperature": 2.0, "alpha": 0.2})
    settings = config.objective
    examples = _fresh_examples(config)
    cache_teacher_log_probs(None, examples, settings)
    student = load_model(config.model, "distill")
    pad_id = load_tokenizer(config.model).pad_token_id
    # batches of other examples than the one pass grouped them with (other padding)
    for start in (0, 5, 17):
        chunk = examples[start : start + 5]
        stored = collate_distill(chunk, pad_id)
        plain = collate_padded(chunk, pad_id)
        on_the_fly = {**plain, **teacher_logits(None, plain, settings)}
        assert stored["teacher_top_ids"].shape == (stored["num_loss_tokens"], 16)
        # on the fly the top k are picked a loss chunk at a time, here all at once
        assert torch.equal(stored["teacher_top_ids"], teacher_rows(on_the_fly, settings)["teacher_top_ids"])
        from_cache, live = distill_loss(student, stored, settings), distill_loss(student, on_the_fly, settings)
        tokens = stored["num_loss_tokens"]
        assert from_cache.num_loss_tokens == live.num_loss_tokens == tokens
        assert abs(from_cache.loss_sum.item() - live.loss_sum.item()) / tokens < 1e-5
        assert live.loss_sum.item() / tokens > 1e-2  # a real difference between teacher and student to match


def test_second_run_reads_the_cache_without_loading_the_teacher(
    tiny_llama_dir, teacher_dir, data_files, tmp_path, teacher_cache, teacher_loads, monkeypatch
):
    config = _config(tiny_llama_dir, teacher_dir, data_files, tmp_path / "run")
    first = _fresh_examples(config)
    cache_teacher_log_probs(None, first, config.objective)
    assert len(teacher_loads) == 1
    [stored] = list(teacher_cache.glob("*.safetensors"))
    assert not list(teacher_cache.glob(".*.tmp"))  # written under a temporary name, then renamed
    with safe_open(str(stored), framework="pt") as handle:  # plain safetensors, readable by any tool
        assert handle.metadata()["teacher"] == str(teacher_dir)
        assert handle.get_tensor("loss_positions").tolist() == [
            sum(label != -100 for label in example["labels"][1:]) for example in first
        ]

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded although its log-probs are cached")

    monkeypatch.setattr(distill, "load_teacher", no_teacher)
    second = _fresh_examples(config)
    cache_teacher_log_probs(None, second, config.objective)
    for before, after in zip(first, second, strict=True):
        assert torch.equal(before["teacher_top_log_probs"], after["teacher_top_log_probs"])
        assert torch.equal(before["teacher_top_ids"], after["teacher_top_ids"])


def test_changed_data_file_or_k_changes_the_key(tiny_llama_dir, teacher_dir, tmp_path, teacher_cache):
    records = chat_records(6)
    train_file = write_jsonl(tmp_path / "train.jsonl", records)
    config = run_config(tiny_llama_dir, train_file, tmp_path / "run", task="distill",
                        objective={"teacher": str(teacher_dir), "teacher_top_k": 8})
    device = torch.device("cpu")
    examples = _fresh_examples(config)
    key = cache_key(str(teacher_dir), examples, 8, device)
    assert cache_key(str(teacher_dir), _fresh_examples(config), 8, device) == key  # stable
    assert cache_key(str(teacher_dir), _fresh_examples(config), 4, device) != key
    records[3]["messages"][1]["content"] = "3 plus 3 is 7."  # one answer of one record edited
    write_jsonl(train_file, records)
    assert cache_key(str(teacher_dir), _fresh_examples(config), 8, device) != key
    # a shorter max_length truncates the longest examples
    max_length = max(len(example["input_ids"]) for example in examples) - 3
    shorter = config.model_copy(update={"data": config.data.model_copy(update={"max_length": max_length})})
    assert cache_key(str(teacher_dir), _fresh_examples(shorter), 8, device) != key


def test_cache_needs_teacher_top_k(tiny_llama_dir, teacher_dir, data_files, tmp_path, teacher_cache):
    config = _config(tiny_llama_dir, teacher_dir, data_files, tmp_path / "run", {"teacher_top_k": None})
    with pytest.raises(ConfigError, match=r"^objective.teacher_top_k: required with train.cache_reference"):
        cache_teacher_log_probs(None, _fresh_examples(config), config.objective)
    # and the config itself is refused, before any model or teacher is loaded
    with pytest.raises(ConfigError, match=r"objective.teacher_top_k: required with train.cache_reference"):
        _config(tiny_llama_dir, teacher_dir, data_files, tmp_path / "run", {"teacher_top_k": None},
                train={"cache_reference": True})


def test_training_on_stored_log_probs_loads_the_teacher_once_and_learns(
    tiny_llama_dir, teacher_dir, data_files, tmp_path, teacher_cache, teacher_loads, monkeypatch
):
    def no_per_batch_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran per batch although train.cache_reference is set")

    monkeypatch.setattr(distill, "cached_teacher", no_per_batch_teacher)  # what the `reference` hook runs
    config = _config(tiny_llama_dir, teacher_dir, data_files, tmp_path / "run",
                     train={"max_steps": 12, "lr": 3e-3, "eval_before": True, "cache_reference": True})
    result = train(config)
    before, after = result.summary["eval_before"], result.summary["eval"]
    assert after["teacher_kl"] < 0.8 * before["teacher_kl"]
    assert len(teacher_loads) == 1
    # a second run (same teacher, data, tokenizer, max_length, k) reuses the store: the teacher is not loaded
    again = train(config.model_copy(update={"output_dir": tmp_path / "again"}))
    assert len(teacher_loads) == 1
    assert again.summary["eval"]["teacher_kl"] == pytest.approx(after["teacher_kl"], rel=1e-4)
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(record["teacher_kl"] >= 0 for record in metrics if "teacher_kl" in record)


def test_packing_with_stored_log_probs_is_refused_in_one_line(
    tiny_llama_dir, teacher_dir, data_files, tmp_path, teacher_cache
):
    config = _config(tiny_llama_dir, teacher_dir, data_files, tmp_path / "run",
                     data={"packing": True}, train={"cache_reference": True})
    with pytest.raises(ConfigError, match=r"^data.packing: .*set data.packing: false$"):
        train(config)
