"""The prepared-data cache: a hit returns exactly what preparing returns, and any input change misses."""

from __future__ import annotations

import pytest
from helpers import chat_records, run_config, write_jsonl

import tunesmith.data.cache as data_cache
from tunesmith.data import prepare_data
from tunesmith.models import load_tokenizer


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "prepared"


def counting_prepare(monkeypatch) -> list[int]:
    calls = []

    def prepare(config, tokenizer):
        calls.append(1)
        return prepare_data(config, tokenizer)

    monkeypatch.setattr(data_cache, "prepare_data", prepare)
    return calls


def test_second_prepare_is_a_hit_equal_to_preparing(tiny_llama_dir, tmp_path, isolated_cache, monkeypatch):
    train_file = write_jsonl(tmp_path / "chats.jsonl", chat_records(10) + [{"messages": []}])
    config = run_config(tiny_llama_dir, train_file, tmp_path / "run",
                        data={"cache": True, "eval_split": 0.2, "on_error": "skip"})
    calls = counting_prepare(monkeypatch)
    first = data_cache.prepare_data_cached(config, load_tokenizer(config.model))
    tokenizer = load_tokenizer(config.model)
    second = data_cache.prepare_data_cached(config, tokenizer)
    assert len(calls) == 1 and len(list(isolated_cache.glob("*.json"))) == 1
    assert (second.train, second.eval, second.rejects, second.stats) == (
        first.train, first.eval, first.rejects, first.stats)
    assert second.rejects and second.train
    assert tokenizer.chat_template  # the template preparing installs comes back with a hit


def test_changed_file_setting_or_seed_misses(tiny_llama_dir, tmp_path, isolated_cache, monkeypatch):
    train_file = write_jsonl(tmp_path / "chats.jsonl", chat_records(6))
    config = run_config(tiny_llama_dir, train_file, tmp_path / "run", data={"cache": True})
    tokenizer = load_tokenizer(config.model)
    calls = counting_prepare(monkeypatch)
    data_cache.prepare_data_cached(config, tokenizer)
    write_jsonl(train_file, chat_records(7))
    changed_file = data_cache.prepare_data_cached(config, tokenizer)
    assert len(changed_file.train) == 7
    data_cache.prepare_data_cached(config.model_copy(update={"data": config.data.model_copy(
        update={"max_length": 64})}), tokenizer)
    data_cache.prepare_data_cached(config.model_copy(update={"train": config.train.model_copy(
        update={"seed": 1})}), tokenizer)
    assert len(calls) == 4
    data_cache.prepare_data_cached(config, tokenizer)
    assert len(calls) == 4  # back to a prepared input: a hit


def test_cache_off_always_prepares(tiny_llama_dir, tmp_path, isolated_cache, monkeypatch):
    train_file = write_jsonl(tmp_path / "chats.jsonl", chat_records(4))
    config = run_config(tiny_llama_dir, train_file, tmp_path / "run")
    calls = counting_prepare(monkeypatch)
    tokenizer = load_tokenizer(config.model)
    data_cache.prepare_data_cached(config, tokenizer)
    data_cache.prepare_data_cached(config, tokenizer)
    assert len(calls) == 2 and not isolated_cache.exists()
