"""Preference formats: detection and canonical records for each source shape, masks on the final response only."""

from __future__ import annotations

import json

import pytest

from tunesmith.data.collate import IGNORE_INDEX
from tunesmith.data.preference import (
    detect_preference_format,
    to_preference_canonical,
    tokenize_preference_record,
    tokenize_response,
)
from tunesmith.models import load_tokenizer_from


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from tunesmith.config import ModelConfig

    return load_tokenizer_from(tiny_llama_dir, ModelConfig(name=str(tiny_llama_dir)))


@pytest.mark.parametrize(("name", "fmt", "count"), [("dpo_en_demo.json", "preference", 300),
                                                     ("kto_en_demo.json", "unpaired", 300)])
def test_real_files_convert_without_a_reject(shared_data, name, fmt, count):
    records = json.loads((shared_data / "preference" / name).read_text())
    assert detect_preference_format(records[0]) == fmt
    canonical = [to_preference_canonical(record, fmt) for record in records]
    assert len(canonical) == count
    if fmt == "preference":
        first = records[0]
        assert canonical[0]["prompt"] == [{"role": "user", "content": first["conversations"][0]["value"]}]
        assert canonical[0]["chosen"] == [{"role": "assistant", "content": first["chosen"]["value"]}]
    else:
        assert {record["label"] for record in canonical} == {True, False}
        assert all(record["completion"][0]["role"] == "assistant" for record in canonical)


def test_anthropic_hh_splits_at_the_last_assistant_turn():
    record = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine, thanks",
              "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: go away"}
    canonical = to_preference_canonical(record, detect_preference_format(record))
    assert [message["role"] for message in canonical["prompt"]] == ["user", "assistant", "user"]
    assert canonical["chosen"] == [{"role": "assistant", "content": "fine, thanks"}]
    assert canonical["rejected"] == [{"role": "assistant", "content": "go away"}]
    different = {**record, "rejected": "\n\nHuman: bye\n\nAssistant: go away"}
    with pytest.raises(ValueError, match="differ before their last assistant turn"):
        to_preference_canonical(different, "preference")


def test_strings_message_lists_and_columns():
    conversational = {"prompt": [{"role": "user", "content": "q"}],
                      "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
                      "rejected": [{"role": "assistant", "content": "bad"}]}
    assert to_preference_canonical(conversational, "preference")["chosen"] == [
        {"role": "assistant", "content": "good"}]
    renamed = {"question": "q", "better": "good", "worse": "bad"}
    columns = {"prompt": "question", "chosen": "better", "rejected": "worse"}
    assert detect_preference_format(renamed, columns) == "preference"
    assert to_preference_canonical(renamed, "preference", columns)["rejected"][0]["content"] == "bad"
    with pytest.raises(ValueError, match="empty"):
        to_preference_canonical({"prompt": "q", "chosen": " ", "rejected": "x"}, "preference")


def test_only_the_final_response_is_trained(tokenizer):
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
              {"role": "user", "content": "and now?"}]
    ids, labels, _ = tokenize_response(prompt, [{"role": "assistant", "content": "now 42"}], tokenizer, 256)
    trained = tokenizer.decode([token for token, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
    assert trained == "now 42<|im_end|>"
    pair = tokenize_preference_record(
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]}, "kto", tokenizer, 256)
    assert [example["desirable"] for example in pair] == [True, False]
