"""Record formats: detect which one a record is in, and convert it to the canonical record.

Canonical records, whatever the file looked like:

- `chat` and `instruction` -> {"messages": [{"role": ..., "content": ...}, ...]}
- `text`                   -> {"text": str}
- `classification`         -> {"text": str, "label": str}

`columns` (from `data.columns`) maps a tunesmith field name to the file's column name, e.g.
{"prompt": "question", "response": "answer"} or {"text": "0", "label": "1"}. A record that does
not fit its format raises ValueError with the reason; the caller names the file and line.
"""

from __future__ import annotations

from collections.abc import Mapping

FORMATS = ("chat", "instruction", "classification", "text")

# Which canonical formats each task can train on. pretrain takes chats and instructions too,
# rendered through the chat template and trained on every token.
TASK_FORMATS = {
    "sft": ("chat", "instruction"),
    "pretrain": ("text", "chat", "instruction"),
    "classify": ("classification",),
    "distill": ("chat", "instruction"),
}

# instruction-style field pairs, in the order they are tried: (prompt field, reply field).
INSTRUCTION_PAIRS = (("instruction", "output"), ("prompt", "response"), ("question", "answer"))

SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "system": "system",
    "tool": "tool", "observation": "tool",
}
CHAT_ROLES = ("system", "user", "assistant", "tool")


def _get(fields: Mapping, name: str, columns: Mapping[str, str]):
    return fields.get(columns.get(name, name))


def _has(fields: Mapping, name: str, columns: Mapping[str, str]) -> bool:
    return columns.get(name, name) in fields


def detect_format(fields: Mapping, columns: Mapping[str, str] | None = None) -> str:
    """The format of one record, from its field names (after the `columns` mapping).

    Tried in order: chat (`messages` or `conversations`), instruction (`instruction`, `prompt`/
    `response`, `question`/`answer`), classification (`text` or `sentence` with `label`), text.
    """
    columns = columns or {}
    if _has(fields, "messages", columns) or _has(fields, "conversations", columns):
        return "chat"
    if _has(fields, "instruction", columns) or any(
        _has(fields, prompt, columns) and _has(fields, reply, columns) for prompt, reply in INSTRUCTION_PAIRS
    ):
        return "instruction"
    if _has(fields, "label", columns) and (_has(fields, "text", columns) or _has(fields, "sentence", columns)):
        return "classification"
    if _has(fields, "text", columns):
        return "text"
    names = ", ".join(map(str, fields)) or "none"
    if fields and all(str(name).isdigit() for name in fields):
        example = "{text: '0', label: '1'}"  # a CSV/TSV without a header row: columns are numbered
    else:
        example = "{text: body} or {prompt: question, response: answer}"
    raise ValueError(
        f"cannot tell the record format from its fields ({names}); "
        f"name your columns with data.columns, e.g. {example}"
    )


def check_task_format(task: str, fmt: str) -> None:
    """ValueError when `task` cannot train on records of format `fmt`."""
    needed = TASK_FORMATS[task]
    if fmt not in needed:
        raise ValueError(
            f"task {task!r} needs {' or '.join(needed)} records, but the data is in {fmt!r} format"
        )


def to_canonical(
    fields: Mapping, fmt: str, columns: Mapping[str, str] | None = None, system_prompt: str | None = None
) -> dict:
    """Convert one record of format `fmt` to its canonical form (see the module docstring)."""
    columns = columns or {}
    if fmt == "chat":
        return {"messages": _with_system(_chat_messages(fields, columns), system_prompt)}
    if fmt == "instruction":
        return {"messages": _with_system(_instruction_messages(fields, columns), system_prompt)}
    if fmt == "classification":
        return _classification(fields, columns)
    if fmt == "text":
        return {"text": _string(_get(fields, "text", columns), "text")}
    raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


def _string(value, name: str, allow_empty: bool = False) -> str:
    if value is None:
        raise ValueError(f"missing field {name!r}")
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"field {name!r} is empty")
    return value


def _chat_messages(fields: Mapping, columns: Mapping[str, str]) -> list[dict]:
    if _has(fields, "messages", columns):
        raw, role_key, content_key, roles = _get(fields, "messages", columns), "role", "content", None
        name = "messages"
    else:
        raw, role_key, content_key, roles = _get(fields, "conversations", columns), "from", "value", SHAREGPT_ROLES
        name = "conversations"
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"field {name!r} must be a non-empty list of messages")
    messages = []
    for index, message in enumerate(raw, start=1):
        if not isinstance(message, Mapping):
            raise ValueError(f"{name}[{index}] must be an object with {role_key!r} and {content_key!r}")
        role, content = message.get(role_key), message.get(content_key)
        role = roles.get(role, role) if roles else role
        if role not in CHAT_ROLES:
            raise ValueError(f"{name}[{index}]: unknown role {message.get(role_key)!r}")
        if not isinstance(content, str):
            raise ValueError(f"{name}[{index}]: {content_key!r} must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise ValueError(f"{name}[{index}]: empty assistant reply")
        messages.append({"role": role, "content": content})
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"{name} has no assistant reply to learn from")
    return messages


def _instruction_messages(fields: Mapping, columns: Mapping[str, str]) -> list[dict]:
    pair = next((pair for pair in INSTRUCTION_PAIRS if _has(fields, pair[0], columns)), None)
    if pair is None:
        expected = " or ".join(f"{prompt}/{reply}" for prompt, reply in INSTRUCTION_PAIRS)
        raise ValueError(f"missing fields: an instruction record needs {expected} (see data.columns)")
    prompt_name, reply_name = pair
    prompt = _string(_get(fields, prompt_name, columns), prompt_name)
    if prompt_name == "instruction":
        # Alpaca: the optional `input` follows the instruction after a blank line.
        extra = _get(fields, "input", columns)
        if extra is not None and not isinstance(extra, str):
            raise ValueError(f"field 'input' must be a string, got {type(extra).__name__}")
        if extra and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
    reply = _get(fields, reply_name, columns)
    if isinstance(reply, str) and not reply.strip():
        raise ValueError(f"empty assistant reply (field {reply_name!r})")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _string(reply, reply_name)}]
    system = _get(fields, "system", columns)
    if isinstance(system, str) and system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _classification(fields: Mapping, columns: Mapping[str, str]) -> dict:
    text_name = "text" if _has(fields, "text", columns) else "sentence"
    text = _string(_get(fields, text_name, columns), text_name)
    label = _get(fields, "label", columns)
    if isinstance(label, bool) or label is None:
        raise ValueError(f"field 'label' must be a string or an integer, got {label!r}")
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if isinstance(label, int):
        label = str(label)
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"field 'label' must be a non-empty string or an integer, got {label!r}")
    return {"text": text, "label": label.strip()}
