"""Preference data: paired (chosen / rejected), unpaired (one response with a good/bad label), prompts.

Canonical records, whatever the file looked like (`data.columns` renames fields as for sft):

- `preference` -> {"prompt": [messages], "chosen": [assistant messages], "rejected": [assistant messages]}
  from any of
  * `prompt` / `chosen` / `rejected`, each a string or a list of messages (trl's standard and
    conversational forms; a chosen list that repeats the prompt has it removed);
  * ShareGPT pairs: `conversations` (the prompt) + `chosen` / `rejected` as one `{from, value}`
    message or a list of them (LLaMA-Factory's dpo_en_demo.json);
  * Anthropic HH: `chosen` / `rejected` whole dialogues (`\\n\\nHuman: ... \\n\\nAssistant: ...` strings
    or message lists) sharing a prefix: split at the last assistant turn.
- `unpaired` -> {"prompt": [...], "completion": [assistant messages], "label": bool}
  from `messages` (or `conversations`) whose last assistant turn is the response + a boolean `label`
  (kto_en_demo.json), or `prompt` / `completion` + `label`.
- `prompt` -> {"prompt": [...], "answer": str | None} for online RL (grpo, ppo): `prompt` / `question` /
  `instruction` (a string or messages) or `messages` without a final reply, with an optional
  reference `answer` / `solution` for reward functions.

Tokenisation renders prompt + response through the chat template exactly as sft does and takes the
loss only on the response's assistant turn(s), each with its end-of-turn token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from tunesmith.data.formats import SHAREGPT_ROLES, _chat_messages
from tunesmith.data.templates import ensure_chat_template, render_chat
from tunesmith.data.tokenize import (
    IGNORE_INDEX,
    Rejection,
    _encode_with_offsets,
    _reply_labels,
    assistant_spans,
)
from tunesmith.errors import ConfigError

if TYPE_CHECKING:
    from tunesmith.config import RunConfig

# Which preference formats each task trains on (the first is the default for an empty file).
PREFERENCE_TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "dpo": ("preference",),
    "simpo": ("preference",),
    "orpo": ("preference",),
    "reward": ("preference",),
    # KTO learns from unpaired labels; a pair gives one desirable and one undesirable example (trl does the same).
    "kto": ("unpaired", "preference"),
    "grpo": ("prompt",),
    "ppo": ("prompt",),
}

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def is_preference_task(task: str) -> bool:
    return task in PREFERENCE_TASK_FORMATS


# --- detection and canonical records ----------------------------------------------------------------


def _name(columns: Mapping[str, str], name: str) -> str:
    return columns.get(name, name)


def detect_preference_format(fields: Mapping, columns: Mapping[str, str] | None = None) -> str:
    """'preference', 'unpaired' or 'prompt', from the field names; ValueError when none fits."""
    columns = columns or {}
    has = {name for name in ("prompt", "chosen", "rejected", "label", "messages", "conversations", "completion",
                             "question", "instruction") if _name(columns, name) in fields}
    if {"chosen", "rejected"} <= has:
        return "preference"
    if "label" in has and ({"messages", "conversations"} & has or {"prompt", "completion"} <= has):
        return "unpaired"
    if {"prompt", "question", "instruction", "messages", "conversations"} & has:
        return "prompt"
    names = ", ".join(map(str, fields)) or "none"
    raise ValueError(
        f"cannot tell the preference format from the fields ({names}); expected prompt/chosen/rejected, "
        "conversations + chosen/rejected, messages + label, or a prompt; name columns with data.columns"
    )


def check_preference_task_format(task: str, fmt: str) -> None:
    needed = PREFERENCE_TASK_FORMATS[task]
    if fmt not in needed:
        raise ValueError(f"task {task!r} needs {' or '.join(needed)} records, but the data is in {fmt!r} format")


def to_preference_canonical(
    fields: Mapping, fmt: str, columns: Mapping[str, str] | None = None, system_prompt: str | None = None
) -> dict:
    """One record of format `fmt` in canonical form (see the module docstring); ValueError if it does not fit."""
    columns = columns or {}
    if fmt == "preference":
        record = _paired(fields, columns)
    elif fmt == "unpaired":
        record = _unpaired(fields, columns)
    elif fmt == "prompt":
        record = _prompt_only(fields, columns)
    else:
        raise ValueError(f"unknown preference format {fmt!r}")
    if system_prompt and (not record["prompt"] or record["prompt"][0]["role"] != "system"):
        record["prompt"] = [{"role": "system", "content": system_prompt}, *record["prompt"]]
    return record


def _as_messages(value, name: str, default_role: str) -> list[dict]:
    """A string, one message ({role, content} or ShareGPT {from, value}) or a list of them, as messages."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"field {name!r} is empty")
        return [{"role": default_role, "content": value}]
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"field {name!r} must be a string, a message or a non-empty list of messages")
    if all(isinstance(message, Mapping) and "from" in message for message in value):
        return _sharegpt_messages(value, name)
    messages = []
    for index, message in enumerate(value, start=1):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise ValueError(f"{name}[{index}] must be an object with 'role' and a string 'content'")
        messages.append({"role": message.get("role", default_role), "content": message["content"]})
    return messages


def _sharegpt_messages(value: list, name: str) -> list[dict]:
    messages = []
    for index, message in enumerate(value, start=1):
        role = SHAREGPT_ROLES.get(message.get("from"))
        if role is None or not isinstance(message.get("value"), str):
            raise ValueError(f"{name}[{index}]: unknown role {message.get('from')!r} or non-string value")
        messages.append({"role": role, "content": message["value"]})
    return messages


def _hh_dialogue(text: str, name: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> messages."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3:
        raise ValueError(f"field {name!r} is a string without Human:/Assistant: turns and there is no prompt")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": content} for speaker, content in zip(parts[1::2], parts[2::2],
                                                                                        strict=True)]


def _split_at_last_assistant(messages: list[dict], name: str) -> tuple[list[dict], list[dict]]:
    last = max((index for index, message in enumerate(messages) if message["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError(f"field {name!r} has no assistant reply")
    return messages[:last], messages[last:last + 1]


def _check_reply(messages: list[dict], name: str) -> list[dict]:
    if not messages or any(message["role"] != "assistant" for message in messages):
        raise ValueError(f"field {name!r} must hold assistant replies only")
    if not all(message["content"].strip() for message in messages):
        raise ValueError(f"field {name!r} holds an empty reply")
    return messages


def _paired(fields: Mapping, columns: Mapping[str, str]) -> dict:
    chosen_raw, rejected_raw = fields.get(_name(columns, "chosen")), fields.get(_name(columns, "rejected"))
    prompt_field = next(
        (name for name in ("prompt", "conversations", "messages") if _name(columns, name) in fields), None
    )
    if prompt_field is not None:
        prompt = _as_messages(fields[_name(columns, prompt_field)], prompt_field, "user")
        chosen = _as_messages(chosen_raw, "chosen", "assistant")
        rejected = _as_messages(rejected_raw, "rejected", "assistant")
        # trl's conversational form sometimes repeats the prompt at the head of each response.
        if chosen[: len(prompt)] == prompt and len(chosen) > len(prompt):
            chosen = chosen[len(prompt):]
        if rejected[: len(prompt)] == prompt and len(rejected) > len(prompt):
            rejected = rejected[len(prompt):]
    else:
        # Anthropic HH: two whole dialogues that differ in the final assistant turn.
        chosen_dialogue = _hh_dialogue(chosen_raw, "chosen") if isinstance(chosen_raw, str) else _as_messages(
            chosen_raw, "chosen", "user")
        rejected_dialogue = _hh_dialogue(rejected_raw, "rejected") if isinstance(rejected_raw, str) else (
            _as_messages(rejected_raw, "rejected", "user"))
        prompt, chosen = _split_at_last_assistant(chosen_dialogue, "chosen")
        rejected_prompt, rejected = _split_at_last_assistant(rejected_dialogue, "rejected")
        if rejected_prompt != prompt:
            raise ValueError("chosen and rejected dialogues differ before their last assistant turn")
    if not prompt or prompt[-1]["role"] == "assistant":
        raise ValueError("the prompt must end with a user (or tool) turn")
    return {"prompt": prompt, "chosen": _check_reply(chosen, "chosen"), "rejected": _check_reply(rejected, "rejected")}


def _unpaired(fields: Mapping, columns: Mapping[str, str]) -> dict:
    label = fields.get(_name(columns, "label"))
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):
        label = label.strip().lower() == "true"
    if not isinstance(label, bool):
        raise ValueError(f"field 'label' must be true or false, got {label!r}")
    if _name(columns, "completion") in fields:
        prompt = _as_messages(fields.get(_name(columns, "prompt")), "prompt", "user")
        completion = _as_messages(fields[_name(columns, "completion")], "completion", "assistant")
    else:
        name = "messages" if _name(columns, "messages") in fields else "conversations"
        messages = _chat_messages(fields, columns)
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{name} must end with the assistant reply that is labelled")
        prompt, completion = _split_at_last_assistant(messages, name)
    if not prompt:
        raise ValueError("the labelled reply has no prompt before it")
    return {"prompt": prompt, "completion": _check_reply(completion, "completion"), "label": label}


def _prompt_only(fields: Mapping, columns: Mapping[str, str]) -> dict:
    for name in ("prompt", "question", "instruction", "messages", "conversations"):
        if _name(columns, name) in fields:
            prompt = _as_messages(fields[_name(columns, name)], name, "user")
            break
    if prompt[-1]["role"] == "assistant":  # a chat with its reply: the reply becomes the reference answer
        prompt, reply = prompt[:-1], prompt[-1]["content"]
    else:
        reply = None
    answer = next((fields[_name(columns, name)] for name in ("answer", "solution", "response")
                   if _name(columns, name) in fields), reply)
    if answer is not None and not isinstance(answer, str):
        answer = str(answer)
    if not prompt:
        raise ValueError("empty prompt")
    return {"prompt": prompt, "answer": answer}


# --- tokenisation -------------------------------------------------------------------------------------


def tokenize_response(
    prompt: list[dict], response: list[dict], tokenizer, max_length: int
) -> tuple[list[int], list[int], bool] | Rejection:
    """(input_ids, labels, truncated) of prompt + response, labels on the response's assistant turns only.

    Earlier assistant turns inside the prompt are context here, not targets (unlike sft, which trains
    every reply): a preference is about the final response.
    """
    messages = [*prompt, *response]
    try:
        text, spans = assistant_spans(messages, tokenizer)
    except Exception as error:  # jinja raises its own errors for conversations a template refuses
        return Rejection(f"chat template: {error}")
    spans = spans[-len(response):]
    (ids,), (offsets,) = _encode_with_offsets([text], [spans], tokenizer)
    labels = _reply_labels(ids, offsets, spans)
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return Rejection(f"no response token left after truncation to max_length={max_length}")
    return list(ids), labels, truncated


def tokenize_preference_record(record: dict, task: str, tokenizer, max_length: int) -> list[dict] | Rejection:
    """The examples one canonical record gives for `task` (a pair for kto gives two)."""
    if "answer" in record:  # prompt-only, for online RL: the ids end with the assistant turn's opening
        text = render_chat(record["prompt"], tokenizer, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_length:
            return Rejection(f"prompt longer than max_length={max_length}")
        return [{"input_ids": ids, "prompt": record["prompt"], "answer": record["answer"]}]
    if "label" in record:
        result = tokenize_response(record["prompt"], record["completion"], tokenizer, max_length)
        if isinstance(result, Rejection):
            return result
        ids, labels, truncated = result
        return [{"input_ids": ids, "labels": labels, "desirable": record["label"], "truncated": truncated}]
    chosen = tokenize_response(record["prompt"], record["chosen"], tokenizer, max_length)
    rejected = tokenize_response(record["prompt"], record["rejected"], tokenizer, max_length)
    for result, side in ((chosen, "chosen"), (rejected, "rejected")):
        if isinstance(result, Rejection):
            return Rejection(f"{side}: {result.reason}")
    if task == "kto":
        return [
            {"input_ids": chosen[0], "labels": chosen[1], "desirable": True, "truncated": chosen[2]},
            {"input_ids": rejected[0], "labels": rejected[1], "desirable": False, "truncated": rejected[2]},
        ]
    # `input_ids` / `labels` hold the chosen side, so the loop's length grouping and token counts work as for sft.
    return [{
        "input_ids": chosen[0], "labels": chosen[1],
        "rejected_input_ids": rejected[0], "rejected_labels": rejected[1],
        "truncated": chosen[2] or rejected[2],
    }]


# --- the whole preparation -------------------------------------------------------------------------------


def prepare_preference_data(config: RunConfig, tokenizer):
    """`prepare_data` for preference tasks: read, detect, canonicalise, hold out eval, tokenise."""
    from tunesmith.data.prepare import FormatRules, PreparedData, _reject_policy, data_stats, read_splits

    rules = FormatRules(
        detect_preference_format, check_preference_task_format, to_preference_canonical,
        lambda task: PREFERENCE_TASK_FORMATS[task][0],
    )

    data, task = config.data, config.task
    if data.format != "auto":
        raise ConfigError(f"data.format: task {task!r} detects its preference format itself; use format: auto")
    rejects: list[dict] = []
    reject = _reject_policy(data.on_error, rejects)

    read = read_splits(config, reject, rules)
    template_installed = ensure_chat_template(tokenizer)
    train_examples, train_truncated = _tokenize(read.train, task, tokenizer, data.max_length, reject)
    eval_examples, eval_truncated = _tokenize(read.held_out, task, tokenizer, data.max_length, reject)
    stats = data_stats(read, train_examples, eval_examples, rejects, train_truncated + eval_truncated,
                       template_installed)
    # reward: a sequence classifier with one output, the scalar reward.
    label_names = ["reward"] if task == "reward" else None
    return PreparedData(train_examples, eval_examples, rejects, stats, label_names)


def _tokenize(records, task: str, tokenizer, max_length: int, reject) -> tuple[list[dict], int]:
    examples, truncated = [], 0
    for record in records:
        result = tokenize_preference_record(record.canonical, task, tokenizer, max_length)
        if isinstance(result, Rejection):
            reject(record.source, result.reason, record.raw)
            continue
        for example in result:
            truncated += example.pop("truncated", False)
            examples.append({**example, "source": record.source})
    return examples, truncated
