"""Records as curation sees them: the user's fields untouched, plus where they came from.

Steps never convert a record to another format: kept.jsonl holds the fields as they were read (after
the text edits steps made), so a curated file trains exactly like the raw one did. Steps read and
edit the *text* of a record through `text_slots`, which knows every format `data.formats` knows:
top-level string fields (text, sentence, prompt/response, instruction/input/output, question/answer)
and the message contents of chats (OpenAI `messages` and ShareGPT `conversations`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunesmith.data.readers import RawRecord, data_files, read_records
from tunesmith.errors import DataError

# Fields that hold identifiers or labels, not text a filter should judge or a redaction should touch.
NON_TEXT_FIELDS = frozenset({"label", "id", "source", "source_before", "augmented"})
# The reply a model learns to produce, for steps that look at responses only (`part: response`).
REPLY_FIELDS = frozenset({"output", "response", "answer", "chosen", "completion"})
REPLY_ROLES = frozenset({"assistant", "gpt", "chatgpt", "bard"})
MESSAGE_LISTS = (("messages", "role", "content"), ("conversations", "from", "value"))

Part = Literal["all", "prompt", "response"]


@dataclass
class Record:
    """One readable record. `index` is its position in the whole input (0-based), the tie-breaker
    that makes "keep the earliest" deterministic; `file` is the input file it came from."""

    fields: dict
    source: str
    index: int
    file: str

    def slots(self, part: Part = "all") -> list[tuple[Any, Any]]:
        return text_slots(self.fields, part)

    def texts(self, part: Part = "all") -> list[str]:
        return [container[key] for container, key in self.slots(part)]

    def text(self, part: Part = "all") -> str:
        """The record's text as one document: its text fields joined by newlines, in field order."""
        return "\n".join(self.texts(part))

    def edit_texts(self, edit: Callable[[str], str], part: Part = "all") -> int:
        """Apply `edit` to every text slot in place; returns how many slots changed."""
        changed = 0
        for container, key in self.slots(part):
            new = edit(container[key])
            if new != container[key]:
                container[key] = new
                changed += 1
        return changed

    def output(self) -> dict:
        """The record as written to kept.jsonl / rejected.jsonl: its fields plus `source`.

        A record that already had a `source` (e.g. re-curating an earlier kept.jsonl) keeps that
        value as `source_before`, so nothing the user had is lost.
        """
        fields = dict(self.fields)
        if "source" in fields:
            fields["source_before"] = fields.pop("source")
        return {**fields, "source": self.source}


@dataclass
class Reject:
    """A removed record with the step that removed it, why, and the evidence (value vs threshold,
    matched text, ...). `record` is None for a line that could not be read; `raw` then holds it."""

    source: str
    step: str
    reason: str
    evidence: dict = field(default_factory=dict)
    record: Record | None = None
    raw: str | None = None
    duplicate_of: str | None = None
    similarity: float | None = None

    def output(self) -> dict:
        line: dict[str, Any] = {"source": self.source, "step": self.step, "reason": self.reason,
                                "evidence": self.evidence}
        if self.duplicate_of is not None:
            line["duplicate_of"] = self.duplicate_of
            line["similarity"] = round(self.similarity, 4) if self.similarity is not None else None
        line["record"] = self.record.output() if self.record is not None else None
        if self.raw is not None:
            line["raw"] = self.raw
        return line


def text_slots(fields: dict, part: Part = "all") -> list[tuple[Any, Any]]:
    """(container, key) pairs for every text in a record, so steps can read and edit them in place."""
    slots = []
    for name, value in fields.items():
        if name in NON_TEXT_FIELDS:
            continue
        if isinstance(value, str):
            is_reply = name in REPLY_FIELDS
            if part == "all" or (part == "response") == is_reply:
                slots.append((fields, name))
        elif (isinstance(value, dict) and isinstance(value.get("value"), str) and name in REPLY_FIELDS
              and part in ("all", "response")):
            slots.append((value, "value"))  # preference data: {"chosen": {"from": "gpt", "value": ...}}
    for list_name, role_key, content_key in MESSAGE_LISTS:
        messages = fields.get(list_name)
        if not isinstance(messages, list):
            continue
        for message in messages:
            if isinstance(message, dict) and isinstance(message.get(content_key), str):
                is_reply = message.get(role_key) in REPLY_ROLES
                if part == "all" or (part == "response") == is_reply:
                    slots.append((message, content_key))
    return slots


# --- reading -------------------------------------------------------------------------------------


def read_inputs(paths: list[Path], header: str, max_record_bytes: int) -> Iterator[RawRecord]:
    """Every raw record of every input, in order. JSONL is read here, line by line as bytes, so a
    line in a wrong encoding or a huge line becomes one bad record instead of ending the file;
    other formats go through `data.readers`, where a decoding error names the file and stops."""
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: file not found")
        for file in data_files(path):
            if file.suffix.lower() == ".jsonl":
                yield from _read_jsonl_bytes(file, max_record_bytes)
                continue
            try:
                yield from read_records(file, header)
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{file}: not valid UTF-8 (byte {error.start}: {error.reason}); re-encode the file as UTF-8"
                ) from None
            except OSError as error:
                raise DataError(f"{file}: cannot be read ({error.strerror})") from None


def _read_jsonl_bytes(file: Path, max_record_bytes: int) -> Iterator[RawRecord]:
    import json

    try:
        handle = open(file, "rb")  # noqa: SIM115 - closed in the finally below, the generator may stop early
    except OSError as error:
        raise DataError(f"{file}: cannot be read ({error.strerror})") from None
    try:
        number = 0
        while True:
            line = handle.readline(max_record_bytes + 1)
            if not line:
                return
            number += 1
            source = f"{file}:{number}"
            if len(line) > max_record_bytes and not line.endswith(b"\n"):
                # Skip the rest of the huge line without holding it in memory.
                while (rest := handle.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                yield RawRecord(None, source, f"line longer than max_record_bytes ({max_record_bytes:,} bytes)",
                                line[:200].decode("utf-8", "replace"))
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                yield RawRecord(None, source, f"not valid UTF-8 (byte {error.start} of the line)",
                                line[:200].decode("utf-8", "replace").rstrip("\n"))
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                reason = f"not valid JSON ({error.msg} at column {error.colno})"
                yield RawRecord(None, source, reason, text.rstrip("\n"))
                continue
            if not isinstance(value, dict):
                yield RawRecord(None, source, f"expected a JSON object, got {type(value).__name__}", text.rstrip("\n"))
                continue
            yield RawRecord(value, source)
    finally:
        handle.close()
