"""From `data:` in the config to tokenised train and eval examples, with every skipped record accounted for.

The stages, in order: read (readers.py) -> detect the format and check it suits the task ->
convert to canonical records (formats.py) -> hold out eval -> map class labels -> tokenise with loss
masks (tokenize.py). A bad record stops the run with `file:line: reason` (`on_error: fail`) or goes
to the rejects with its reason (`on_error: skip`); either way records read = used + rejected.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.data.formats import TASK_FORMATS, check_task_format, detect_format, to_canonical
from tunesmith.data.mixture import prepare_mixture
from tunesmith.data.preference import is_preference_task, prepare_preference_data
from tunesmith.data.readers import read_records
from tunesmith.data.templates import ensure_chat_template
from tunesmith.data.tokenize import (
    Rejection,
    TokenizedExample,
    tokenize_chats,
    tokenize_classifications,
    tokenize_texts,
)
from tunesmith.errors import ConfigError, DataError

if TYPE_CHECKING:
    from tunesmith.config import DataConfig, RunConfig

_TOKENIZE_BATCH = 1000


@dataclass
class PreparedData:
    """Examples ready for a collator: each a dict with `input_ids`, `labels` (sft, pretrain) or
    `label` (classify), and `source` (`file:line`)."""

    train: list[dict]
    eval: list[dict]
    rejects: list[dict] = field(default_factory=list)  # {"source", "reason", "record"}
    stats: dict = field(default_factory=dict)
    label_names: list[str] | None = None  # classify: label names in id order


@dataclass
class _Record:
    source: str
    canonical: dict
    raw: Any  # the fields as read, for the rejects file


Reject = Callable[[str, str, Any], None]


@dataclass(frozen=True)
class FormatRules:
    """How records of a family of tasks are recognised and made canonical."""

    detect: Callable[[dict, dict], str]
    """detect(fields, columns) -> format name, from the first readable record."""
    check: Callable[[str, str], None]
    """check(task, format) raises ValueError when the task cannot use the format."""
    convert: Callable[[dict, str, dict, str | None], dict]
    """convert(fields, format, columns, system_prompt) -> canonical record (ValueError: reject it)."""
    default_format: Callable[[str], str]
    """The format assumed for a task when no record was readable."""


SUPERVISED_FORMATS = FormatRules(detect_format, check_task_format, to_canonical, lambda task: TASK_FORMATS[task][0])


def prepare_data(config: RunConfig, tokenizer) -> PreparedData:
    """Read, check, split and tokenise `config.data` for `config.task` (sft, pretrain or classify)."""
    data, task = config.data, config.task
    if data.mixture is not None:
        return prepare_mixture(config, tokenizer)
    if is_preference_task(task):
        return prepare_preference_data(config, tokenizer)
    check_configured_format(data, task)
    rejects: list[dict] = []
    reject = _reject_policy(data.on_error, rejects)

    read = read_splits(config, reject)
    train, held_out = read.train, read.held_out

    label_names = None
    if task == "classify":
        label_names = class_label_names(train, data.labels)
        train = attach_label_ids(train, label_names, data.labels is not None, reject)
        held_out = attach_label_ids(held_out, label_names, data.labels is not None, reject)

    template_installed = False
    if any(records and "messages" in records[0].canonical for records in (train, held_out)):
        template_installed = ensure_chat_template(tokenizer)
    train_examples, train_truncated = _tokenize(train, task, tokenizer, data, reject)
    eval_examples, eval_truncated = _tokenize(held_out, task, tokenizer, data, reject)
    if data.sample_weights is not None:
        attach_sample_weights(train_examples, data.sample_weights)

    stats = data_stats(read, train_examples, eval_examples, rejects, train_truncated + eval_truncated,
                       template_installed)
    if label_names is not None:
        stats["num_labels"] = len(label_names)
    return PreparedData(train_examples, eval_examples, rejects, stats, label_names)


@dataclass
class ReadSplits:
    """Canonical train and held-out records, their formats, and how many records each file had."""

    train: list[_Record]
    held_out: list[_Record]
    train_format: str
    eval_format: str
    read_train: int
    read_eval: int


def read_splits(config: RunConfig, reject: Reject, rules: FormatRules = SUPERVISED_FORMATS) -> ReadSplits:
    """Read data.train and data.eval, or hold out data.eval_split of train (seeded)."""
    data, task = config.data, config.task
    train, train_format, read_train = read_canonical(data.train, data, task, data.limit, reject, rules)
    if data.eval is not None:
        held_out, eval_format, read_eval = read_canonical(data.eval, data, task, data.eval_limit, reject, rules)
    else:
        train, held_out = split_eval(train, data.eval_split, config.train.seed, data.eval_limit)
        eval_format, read_eval = train_format, 0
    return ReadSplits(train, held_out, train_format, eval_format, read_train, read_eval)


def data_stats(
    read: ReadSplits, train_examples: list[dict], eval_examples: list[dict], rejects: list[dict],
    truncated: int, template_installed: bool,
) -> dict:
    """The `data` block of summary.json; read = used_train + used_eval + rejected always holds."""
    return {
        "format": read.train_format,
        "eval_format": read.eval_format,
        "read": read.read_train + read.read_eval,
        "read_train": read.read_train,
        "read_eval": read.read_eval,
        "used_train": len(train_examples),
        "used_eval": len(eval_examples),
        "rejected": len(rejects),
        "truncated": truncated,
        # Preference examples also carry the rejected response's tokens.
        "train_tokens": sum(len(example["input_ids"]) + len(example.get("rejected_input_ids", ()))
                            for example in train_examples),
        "chat_template_fallback": template_installed,
    }


def check_configured_format(data: DataConfig, task: str) -> None:
    """ConfigError when `data.format` is set to a format the task cannot train on."""
    if data.format != "auto":
        try:
            check_task_format(task, data.format)
        except ValueError as error:
            raise ConfigError(f"data.format: {error}") from None


def _reject_policy(on_error: str, rejects: list[dict]) -> Reject:
    def reject(source: str, reason: str, record: Any) -> None:
        if on_error == "fail":
            raise DataError(f"{source}: {reason} (set data.on_error: skip to write such records to rejects)")
        rejects.append({"source": source, "reason": reason, "record": record})

    return reject


def read_canonical(
    path: Path, data: DataConfig, task: str, limit: int | None, reject: Reject,
    rules: FormatRules = SUPERVISED_FORMATS,
) -> tuple[list[_Record], str, int]:
    """Canonical records of one file or folder, its format, and how many records were read.

    With `format: auto` the first readable record decides the format; the task must accept it.
    """
    fmt = None if data.format == "auto" else data.format
    records, read = [], 0
    for raw in islice(read_records(path, data.header, data.columns.values()), limit):
        read += 1
        if raw.fields is None:
            reject(raw.source, raw.error, raw.raw)
            continue
        if fmt is None:
            try:
                fmt = rules.detect(raw.fields, data.columns)
                rules.check(task, fmt)
            except ValueError as error:
                raise DataError(f"{raw.source}: {error}") from None
        try:
            canonical = rules.convert(raw.fields, fmt, data.columns, data.system_prompt)
        except ValueError as error:
            reject(raw.source, str(error), raw.fields)
            continue
        records.append(_Record(raw.source, canonical, raw.fields))
    if fmt is None:
        fmt = rules.default_format(task)
    if read == 0:
        raise DataError(f"{path}: no records")
    return records, fmt, read


def split_eval(
    records: list, fraction: float, seed: int, limit: int | None = None
) -> tuple[list, list]:
    """Hold out `fraction` of the records (at least one, at most all but one; at most `limit`) chosen
    with `seed`; both parts keep file order."""
    count = len(records)
    held = round(count * fraction)
    if fraction > 0 and count >= 2:
        held = min(max(held, 1), count - 1)
    if limit is not None:
        held = min(held, limit)
    chosen = set(random.Random(seed).sample(range(count), held)) if held else set()
    train = [record for index, record in enumerate(records) if index not in chosen]
    held_out = [record for index, record in enumerate(records) if index in chosen]
    return train, held_out


# --- classification labels -------------------------------------------------------------------------


def class_label_names(train: list[_Record], configured: list[str] | None) -> list[str]:
    """Label names in id order: `data.labels` when set; else the training labels, in numeric order
    when all are integers (so labels 0..K-1 keep their ids) and in sorted order otherwise."""
    if configured is not None:
        return list(configured)
    names = {record.canonical["label"] for record in train}
    if names and all(_is_integer(name) for name in names):
        return sorted(names, key=int)
    return sorted(names)


def _is_integer(text: str) -> bool:
    return text.lstrip("-").isdigit()


def attach_label_ids(records: list[_Record], names: list[str], configured: bool, reject: Reject) -> list[_Record]:
    """Attach `label_id`. With `data.labels` set, an integer label that is not itself a name is an
    index into data.labels (so 0/1 files work with labels: [negative, positive])."""
    ids = {name: index for index, name in enumerate(names)}
    kept = []
    for record in records:
        label = record.canonical["label"]
        label_id = ids.get(label)
        if label_id is None and configured and _is_integer(label) and 0 <= int(label) < len(names):
            label_id = int(label)
        if label_id is None:
            where = "data.labels" if configured else "the training data"
            reject(record.source, f"label {label!r} is not in {where} ({', '.join(names)})", record.raw)
            continue
        record.canonical["label_id"] = label_id
        kept.append(record)
    return kept


# --- tokenisation --------------------------------------------------------------------------------


def _tokenize(
    records: list[_Record], task: str, tokenizer, data: DataConfig, reject: Reject
) -> tuple[list[dict], int]:
    """Examples for the records that tokenise, and how many of them were truncated."""
    examples, truncated = [], 0
    for start in range(0, len(records), _TOKENIZE_BATCH):
        batch = records[start:start + _TOKENIZE_BATCH]
        for record, result in zip(batch, tokenize_records(batch, task, tokenizer, data), strict=True):
            if isinstance(result, Rejection):
                reject(record.source, result.reason, record.raw)
                continue
            examples.append(_example(result, record.source))
            truncated += result.truncated
    return examples, truncated


def tokenize_records(
    batch: list[_Record], task: str, tokenizer, data: DataConfig
) -> list[TokenizedExample | Rejection]:
    """Tokenise canonical records (one format per batch) the way `task` trains on them."""
    canonical = [record.canonical for record in batch]
    if task == "classify":
        return tokenize_classifications(
            [record["text"] for record in canonical], [record["label_id"] for record in canonical],
            tokenizer, data.max_length,
        )
    if "messages" in canonical[0]:
        # pretrain on chats: the rendered conversation, every token trained.
        train_on_prompt = data.train_on_prompt or task == "pretrain"
        return tokenize_chats([record["messages"] for record in canonical], tokenizer, data.max_length,
                              train_on_prompt)
    return tokenize_texts([record["text"] for record in canonical], tokenizer, data.max_length)


def _example(result: TokenizedExample, source: str) -> dict:
    example = {"input_ids": result.input_ids}
    if result.labels is not None:
        example["labels"] = result.labels
    else:
        example["label"] = result.label
    example["source"] = source
    return example


def _source_key(source: str) -> tuple[str, str]:
    """(resolved file, line) so that '../data/x.jsonl:3' and '/abs/data/x.jsonl:3' match."""
    file, _, line = source.rpartition(":")
    return str(Path(file).resolve()), line


def attach_sample_weights(examples: list[dict], path: Path) -> None:
    """Give each training example the `weight` its source has in `path` (1.0 when it has none).

    Fairness reweighing (Kamiran & Calders 2012) writes weights that average to 1, so the loss
    keeps its scale; the loss functions multiply each record's terms by its weight.
    """
    weights: dict[tuple[str, str], float] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            weight = float(record["weight"])
            source = str(record["source"])
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"{path}:{number}: needs `source` and a numeric `weight` ({error})") from None
        if weight < 0:
            raise DataError(f"{path}:{number}: weight must be >= 0, got {weight}")
        weights[_source_key(source)] = weight
    for example in examples:
        example["weight"] = weights.get(_source_key(example["source"]), 1.0)


def write_rejects(rejects: list[dict], path: Path) -> None:
    """Write rejects as JSONL, one {"source", "reason", "record"} per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for entry in rejects:
            handle.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
