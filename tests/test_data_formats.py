"""Format detection and conversion to canonical records."""

from __future__ import annotations

import pytest

from tunesmith.data.formats import check_task_format, detect_format, to_canonical


@pytest.mark.parametrize(
    ("fields", "columns", "expected"),
    [
        ({"messages": []}, {}, "chat"),
        ({"conversations": []}, {}, "chat"),
        ({"instruction": "a", "input": "", "output": "b"}, {}, "instruction"),
        ({"prompt": "a", "response": "b"}, {}, "instruction"),
        ({"question": "a", "answer": "b"}, {}, "instruction"),
        ({"text": "a", "label": 1}, {}, "classification"),
        ({"sentence": "a", "label": "pos"}, {}, "classification"),
        ({"text": "a"}, {}, "text"),
        ({"q": "a", "a": "b"}, {"prompt": "q", "response": "a"}, "instruction"),
        ({"0": "a", "1": "Sports"}, {"text": "0", "label": "1"}, "classification"),
        ({"body": "a"}, {"text": "body"}, "text"),
        ({"dialog": []}, {"messages": "dialog"}, "chat"),
    ],
)
def test_detect_format(fields, columns, expected):
    assert detect_format(fields, columns) == expected


def test_undetectable_record_says_how_to_fix_it():
    with pytest.raises(ValueError, match=r"fields \(foo, bar\).*data.columns"):
        detect_format({"foo": 1, "bar": 2}, {})
    with pytest.raises(ValueError, match="text: '0', label: '1'"):
        detect_format({"0": "x", "1": "y"}, {})


def test_openai_chat_with_system_prompt_added_only_when_missing():
    fields = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert to_canonical(fields, "chat", {}, "Be brief.")["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    with_system = {"messages": [{"role": "system", "content": "own"}, *fields["messages"]]}
    assert to_canonical(with_system, "chat", {}, "Be brief.")["messages"][0]["content"] == "own"


def test_sharegpt_roles_map_to_openai_roles_multi_turn():
    fields = {
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "a1"},
            {"from": "human", "value": "q2"},
            {"from": "gpt", "value": "a2"},
        ]
    }
    messages = to_canonical(fields, "chat")["messages"]
    assert [message["role"] for message in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [message["content"] for message in messages] == ["s", "q1", "a1", "q2", "a2"]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant reply"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}, "empty assistant"),
        ({"messages": [{"role": "user", "content": ["a"]}]}, "must be a string"),
        ({"messages": [{"role": "robot", "content": "a"}]}, "unknown role 'robot'"),
        ({"messages": "hello"}, "non-empty list"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown role 'alien'"),
    ],
)
def test_bad_chats_raise_with_a_reason(fields, reason):
    with pytest.raises(ValueError, match=reason):
        to_canonical(fields, "chat")


def test_instruction_with_input_and_gsm8k_columns():
    alpaca = {"instruction": "Translate.", "input": "bonjour", "output": "hello"}
    assert to_canonical(alpaca, "instruction")["messages"] == [
        {"role": "user", "content": "Translate.\n\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]
    no_input = {"instruction": "Say hi.", "input": "", "output": "hi"}
    assert to_canonical(no_input, "instruction")["messages"][0]["content"] == "Say hi."
    gsm8k = {"question": "1+1?", "answer": "#### 2"}
    assert to_canonical(gsm8k, "instruction")["messages"][1]["content"] == "#### 2"
    mapped = {"q": "1+1?", "a": "2"}
    columns = {"prompt": "q", "response": "a"}
    assert to_canonical(mapped, "instruction", columns)["messages"][0] == {"role": "user", "content": "1+1?"}


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"prompt": "q", "response": ""}, "empty assistant reply"),
        ({"prompt": "q"}, "missing field 'response'"),
        ({"prompt": 3, "response": "a"}, "must be a string"),
        ({"other": "x"}, "needs instruction/output or prompt/response or question/answer"),
    ],
)
def test_bad_instructions_raise_with_a_reason(fields, reason):
    with pytest.raises(ValueError, match=reason):
        to_canonical(fields, "instruction")


def test_classification_labels_become_strings():
    assert to_canonical({"sentence": "good", "label": 1}, "classification") == {"text": "good", "label": "1"}
    assert to_canonical({"0": "x", "1": "Sports"}, "classification", {"text": "0", "label": "1"}) == {
        "text": "x",
        "label": "Sports",
    }
    for bad in (None, True, "", 1.5):
        with pytest.raises(ValueError, match="label"):
            to_canonical({"text": "x", "label": bad}, "classification")


def test_text_records():
    assert to_canonical({"text": "hello"}, "text") == {"text": "hello"}
    with pytest.raises(ValueError, match="missing field 'text'"):
        to_canonical({"body": "hello"}, "text")


def test_task_compatibility():
    check_task_format("sft", "chat")
    check_task_format("sft", "instruction")
    check_task_format("pretrain", "text")
    check_task_format("pretrain", "chat")
    check_task_format("classify", "classification")
    with pytest.raises(ValueError, match="task 'classify' needs classification records.*'instruction'"):
        check_task_format("classify", "instruction")
    with pytest.raises(ValueError, match="task 'sft' needs chat or instruction"):
        check_task_format("sft", "text")
