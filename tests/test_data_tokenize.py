"""Loss masks: exactly the assistant replies and their end-of-turn token, on every turn."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tunesmith.data.templates import ensure_chat_template
from tunesmith.data.tokenize import (
    IGNORE_INDEX,
    Rejection,
    tokenize_chat,
    tokenize_chats,
    tokenize_classification,
    tokenize_text,
)

# SmolLM2-135M-Instruct's own template: it injects a default system message when there is none.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHAT = [
    {"role": "system", "content": "You answer arithmetic."},
    {"role": "user", "content": "What is 48 divided by 2?"},
    {"role": "assistant", "content": "48/2 = 24.\n#### 24"},
    {"role": "user", "content": "And plus 48?"},
    {"role": "assistant", "content": "24 + 48 = 72. She sold 72 clips."},
]


@pytest.fixture
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def labelled_runs(example, tokenizer) -> list[str]:
    """The decoded text of each maximal run of loss-bearing tokens."""
    runs, run = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token  # unshifted: a label is the token at its own position
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    if run:
        runs.append(tokenizer.decode(run))
    return runs


def replies(messages) -> list[str]:
    return [message["content"] + "<|im_end|>" for message in messages if message["role"] == "assistant"]


def test_loss_on_every_assistant_reply_and_its_end_of_turn(tokenizer):
    example = tokenize_chat(CHAT, tokenizer, max_length=512)
    assert len(example.labels) == len(example.input_ids)
    assert labelled_runs(example, tokenizer) == replies(CHAT)
    assert not example.truncated
    # every <|im_end|> closing a reply is trained, although it is also the pad token
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end == tokenizer.pad_token_id == tokenizer.eos_token_id
    ends = [index for index, token in enumerate(example.input_ids) if token == end]
    assert [example.labels[index] == end for index in ends] == [False, False, True, False, True]


def test_unlabelled_tokens_are_exactly_the_prompt_side(tokenizer):
    example = tokenize_chat(CHAT, tokenizer, max_length=512)
    prompt_side = tokenizer.decode(
        [token for token, label in zip(example.input_ids, example.labels, strict=True) if label == IGNORE_INDEX]
    )
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    for reply in replies(CHAT):
        text = text.replace(reply, "", 1)
    assert prompt_side == text
    assert "<|im_start|>assistant\n" in prompt_side  # the header belongs to the prompt


def test_template_that_injects_a_default_system_message(tokenizer):
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    chat = CHAT[1:]
    example = tokenize_chat(chat, tokenizer, max_length=512)
    assert labelled_runs(example, tokenizer) == replies(chat)
    assert "SmolLM" in tokenizer.decode(example.input_ids)


def test_template_that_trims_content(tokenizer):
    tokenizer.chat_template = tokenizer.chat_template.replace("message['content']", "(message['content'] | trim)")
    chat = [{"role": "user", "content": "hi "}, {"role": "assistant", "content": "  hello there \n"}]
    example = tokenize_chat(chat, tokenizer, max_length=512)
    assert labelled_runs(example, tokenizer) == ["hello there<|im_end|>"]


def test_train_on_prompt_labels_every_token(tokenizer):
    example = tokenize_chat(CHAT, tokenizer, max_length=512, train_on_prompt=True)
    assert example.labels == example.input_ids


def test_truncation_keeps_the_beginning_and_flags_it(tokenizer):
    full = tokenize_chat(CHAT, tokenizer, max_length=512)
    first_reply_end = max(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX and i < 60) + 1
    cut = tokenize_chat(CHAT, tokenizer, max_length=first_reply_end)
    assert cut.truncated
    assert cut.input_ids == full.input_ids[:first_reply_end]
    assert cut.labels == full.labels[:first_reply_end]


def test_no_loss_token_left_after_truncation_is_rejected(tokenizer):
    full = tokenize_chat(CHAT, tokenizer, max_length=512)
    first_label = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    result = tokenize_chat(CHAT, tokenizer, max_length=first_label)
    assert result == Rejection(f"no loss token left after truncation to max_length={first_label}")


def test_batch_equals_one_by_one_and_template_errors_are_rejections(tokenizer):
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    )
    bad = [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]
    results = tokenize_chats([CHAT, bad, CHAT[:3]], tokenizer, max_length=512)
    assert results[0] == tokenize_chat(CHAT, tokenizer, max_length=512)
    assert isinstance(results[1], Rejection) and "no tools" in results[1].reason
    # `assistant: 48`: BPE merges the space before the reply into its first token, which is trained
    assert labelled_runs(results[2], tokenizer) == [" " + reply for reply in replies(CHAT[:3])]


def test_fallback_template_is_installed_and_saved(tokenizer, tmp_path):
    assert not ensure_chat_template(tokenizer)
    tokenizer.chat_template = None
    assert ensure_chat_template(tokenizer)
    assert "<|im_end|>" in tokenizer.chat_template
    assert not ensure_chat_template(tokenizer)
    example = tokenize_chat(CHAT, tokenizer, max_length=512)
    assert labelled_runs(example, tokenizer) == replies(CHAT)
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == tokenizer.chat_template


def test_text_ends_with_eos_and_trains_on_every_token(tokenizer):
    example = tokenize_text("Natalia sold clips to 48 of her friends.", tokenizer, max_length=512)
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert example.labels == example.input_ids
    short = tokenize_text("Natalia sold clips to 48 of her friends.", tokenizer, max_length=4)
    assert short.truncated and short.input_ids == example.input_ids[:4]


def test_classification_keeps_the_label_and_truncates(tokenizer):
    example = tokenize_classification("a fine film", 1, tokenizer, max_length=64)
    assert example.label == 1 and example.labels is None and not example.truncated
    long = tokenize_classification("word " * 100, 0, tokenizer, max_length=16)
    assert long.truncated and len(long.input_ids) == 16
