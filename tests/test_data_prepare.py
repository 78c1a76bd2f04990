"""prepare_data end to end on real data: counts add up, bad records fail or are rejected, splits are seeded."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from tunesmith.config import build_config
from tunesmith.data import inspect_data, prepare_data, write_rejects
from tunesmith.data.tokenize import IGNORE_INDEX
from tunesmith.errors import ConfigError, DataError


@pytest.fixture
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def config_for(train, task="sft", seed=42, **data):
    return build_config(
        {"model": {"name": "unused"}, "data": {"train": str(train), **data}, "task": task, "train": {"seed": seed}}
    )


def assert_counts_add_up(prepared):
    stats = prepared.stats
    assert stats["read"] == stats["used_train"] + stats["used_eval"] + stats["rejected"]
    assert stats["used_train"] == len(prepared.train) and stats["used_eval"] == len(prepared.eval)
    assert stats["rejected"] == len(prepared.rejects)


def test_gsm8k_sft(shared_data, tokenizer):
    path = shared_data / "sft" / "gsm8k_train.jsonl"
    prepared = prepare_data(config_for(path, limit=200, eval_split=0.1), tokenizer)
    assert prepared.stats["format"] == "instruction"
    assert prepared.stats["read"] == 200
    assert (len(prepared.train), len(prepared.eval)) == (180, 20)
    assert_counts_add_up(prepared)
    example = prepared.train[0]
    assert set(example) == {"input_ids", "labels", "source"}
    assert example["source"] == f"{path}:1"
    assert len(example["labels"]) == len(example["input_ids"])
    trained = [token for token in example["labels"] if token != IGNORE_INDEX]
    assert tokenizer.decode(trained).endswith("#### 72<|im_end|>")
    assert prepared.label_names is None


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


CHAT_LINE = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


@pytest.fixture
def corrupt_jsonl(tmp_path):
    return write_lines(
        tmp_path / "chats.jsonl",
        [
            CHAT_LINE,
            CHAT_LINE,
            '{"messages": [broken',
            json.dumps({"messages": [{"role": "user", "content": "no reply"}]}),
            json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}),
            CHAT_LINE,
        ],
    )


def test_on_error_fail_names_file_and_line(corrupt_jsonl, tokenizer):
    with pytest.raises(DataError, match=rf"^{corrupt_jsonl}:3: not valid JSON"):
        prepare_data(config_for(corrupt_jsonl), tokenizer)


def test_on_error_skip_keeps_every_bad_record_with_its_reason(corrupt_jsonl, tokenizer, tmp_path):
    prepared = prepare_data(config_for(corrupt_jsonl, on_error="skip", eval_split=0), tokenizer)
    assert_counts_add_up(prepared)
    assert prepared.stats["read"] == 6 and len(prepared.train) == 3 and prepared.eval == []
    assert [reject["source"] for reject in prepared.rejects] == [f"{corrupt_jsonl}:{line}" for line in (3, 4, 5)]
    assert prepared.rejects[0]["record"] == '{"messages": [broken'  # the raw line, when it does not parse
    assert "no assistant reply" in prepared.rejects[1]["reason"]
    assert "empty assistant reply" in prepared.rejects[2]["reason"]
    assert prepared.rejects[1]["record"] == json.loads(corrupt_jsonl.read_text().splitlines()[3])

    out = tmp_path / "run" / "rejects.jsonl"
    write_rejects(prepared.rejects, out)
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == prepared.rejects


def test_eval_split_is_determined_by_the_seed(shared_data, tokenizer):
    path = shared_data / "sft" / "gsm8k_train.jsonl"

    def eval_sources(seed):
        prepared = prepare_data(config_for(path, seed=seed, limit=60, eval_split=0.2), tokenizer)
        return [example["source"] for example in prepared.eval]

    assert len(eval_sources(1)) == 12
    assert eval_sources(1) == eval_sources(1)
    assert eval_sources(1) != eval_sources(2)


def test_eval_file_and_eval_limit(shared_data, tokenizer):
    path = shared_data / "sft" / "gsm8k_train.jsonl"
    prepared = prepare_data(config_for(path, limit=20, eval=str(path), eval_limit=5), tokenizer)
    assert (len(prepared.train), len(prepared.eval)) == (20, 5)
    assert prepared.stats["read"] == 25
    assert_counts_add_up(prepared)
    held = prepare_data(config_for(path, limit=40, eval_split=0.5, eval_limit=3), tokenizer)
    assert (len(held.train), len(held.eval)) == (37, 3)


def test_truncation_count_and_no_loss_token_rejects(shared_data, tokenizer):
    path = shared_data / "sft" / "gsm8k_train.jsonl"
    prepared = prepare_data(config_for(path, limit=50, eval_split=0, max_length=64, on_error="skip"), tokenizer)
    assert_counts_add_up(prepared)
    assert all(len(example["input_ids"]) <= 64 for example in prepared.train)
    assert prepared.stats["truncated"] == len(prepared.train) > 0
    reasons = {reject["reason"] for reject in prepared.rejects}
    assert reasons == {"no loss token left after truncation to max_length=64"}
    with pytest.raises(DataError, match="no loss token left after truncation to max_length=64"):
        prepare_data(config_for(path, limit=50, eval_split=0, max_length=64), tokenizer)


def test_sst2_labels_keep_their_numeric_ids(shared_data, tokenizer):
    path = shared_data / "classification" / "sst2_test.tsv"
    prepared = prepare_data(config_for(path, task="classify", limit=100, eval_split=0.1), tokenizer)
    assert prepared.label_names == ["0", "1"]
    assert prepared.stats["format"] == "classification"
    assert set(prepared.train[0]) == {"input_ids", "label", "source"}
    rows = path.read_text(encoding="utf-8").splitlines()
    for example in prepared.train[:10]:
        line = int(example["source"].rsplit(":", 1)[1])
        assert example["label"] == int(rows[line - 1].split("\t")[1])
    assert_counts_add_up(prepared)


def test_agnews_without_header_via_columns_and_configured_labels(shared_data, tokenizer):
    path = shared_data / "classification" / "agnews_test.tsv"
    columns = {"text": "0", "label": "1"}
    prepared = prepare_data(config_for(path, task="classify", limit=200, columns=columns), tokenizer)
    assert prepared.label_names == ["Business", "Sci/Tech", "Sports", "World"]
    assert prepared.train[0]["label"] == 0  # the first record is Business

    names = ["World", "Sports", "Business", "Sci/Tech"]
    ordered = prepare_data(config_for(path, task="classify", limit=200, columns=columns, labels=names), tokenizer)
    assert ordered.label_names == names
    assert ordered.train[0]["label"] == 2


def test_integer_labels_index_configured_label_names(shared_data, tokenizer):
    path = shared_data / "classification" / "sst2_test.tsv"
    config = config_for(path, task="classify", limit=30, eval_split=0, labels=["negative", "positive"])
    prepared = prepare_data(config, tokenizer)
    assert prepared.label_names == ["negative", "positive"]
    assert {example["label"] for example in prepared.train} == {0, 1}


def test_eval_label_unseen_in_train_is_rejected(tmp_path, tokenizer):
    train = write_lines(tmp_path / "train.jsonl", [json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(6)])
    held = write_lines(tmp_path / "eval.jsonl", [json.dumps({"text": "e", "label": label}) for label in (0, 7)])
    prepared = prepare_data(config_for(train, task="classify", eval=str(held), on_error="skip"), tokenizer)
    assert len(prepared.eval) == 1
    assert prepared.rejects[0]["source"] == f"{held}:2"
    assert "label '7' is not in the training data" in prepared.rejects[0]["reason"]
    assert_counts_add_up(prepared)
    with pytest.raises(DataError, match=rf"{held}:2: label '7'"):
        prepare_data(config_for(train, task="classify", eval=str(held)), tokenizer)


def test_task_and_format_mismatch(shared_data, tokenizer):
    path = shared_data / "sft" / "gsm8k_train.jsonl"
    with pytest.raises(DataError, match=rf"^{path}:1: task 'classify' needs classification records.*'instruction'"):
        prepare_data(config_for(path, task="classify"), tokenizer)
    with pytest.raises(ConfigError, match="data.format: task 'sft' needs chat or instruction"):
        prepare_data(config_for(path, format="text"), tokenizer)


def test_pretrain_on_text_and_on_chats(tmp_path, shared_data, tokenizer):
    texts = write_lines(tmp_path / "docs.jsonl", [json.dumps({"text": f"document number {i}"}) for i in range(5)])
    prepared = prepare_data(config_for(texts, task="pretrain", eval_split=0), tokenizer)
    assert prepared.stats["format"] == "text"
    for example in prepared.train:
        assert example["labels"] == example["input_ids"]
        assert example["input_ids"][-1] == tokenizer.eos_token_id

    path = shared_data / "sft" / "gsm8k_train.jsonl"
    chats = prepare_data(config_for(path, task="pretrain", limit=5, eval_split=0), tokenizer)
    assert chats.train[0]["labels"] == chats.train[0]["input_ids"]
    assert tokenizer.decode(chats.train[0]["input_ids"]).startswith("<|im_start|>user\nNatalia")


def test_train_on_prompt_and_system_prompt(shared_data, tokenizer):
    path = shared_data / "sft" / "gsm8k_train.jsonl"
    config = config_for(path, limit=5, eval_split=0, train_on_prompt=True, system_prompt="Solve it.")
    example = prepare_data(config, tokenizer).train[0]
    assert example["labels"] == example["input_ids"]
    assert tokenizer.decode(example["input_ids"]).startswith("<|im_start|>system\nSolve it.<|im_end|>")


def test_missing_template_gets_the_fallback(shared_data, tokenizer):
    tokenizer.chat_template = None
    prepared = prepare_data(config_for(shared_data / "sft" / "gsm8k_train.jsonl", limit=5), tokenizer)
    assert prepared.stats["chat_template_fallback"] is True
    assert tokenizer.chat_template


def test_inspect_shows_format_lengths_and_trained_text(shared_data, tokenizer):
    path = shared_data / "sft" / "gsm8k_train.jsonl"
    report = inspect_data(path, tokenizer, None, "sft")
    assert "instruction (detected)" in report
    assert "7,473 read" in report
    assert "p50" in report and "p99" in report
    assert "[[Natalia sold 48/2" in report and "#### 72<|im_end|>]]" in report
    classify = inspect_data(shared_data / "classification" / "sst2_test.tsv", tokenizer, None, "classify")
    assert "labels:  2: 0, 1" in classify
