"""`tunesmith data inspect`: what a data file looks like to the model, before any training.

Shows the detected format, how many records read and rejected, token length percentiles, and the
first record exactly as the model will see it, with the text the loss is taken on in [[double
brackets]]. The result is plain text: print it with `print`, or with rich using `markup=False`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tunesmith.data.prepare import (
    attach_label_ids,
    check_configured_format,
    class_label_names,
    read_canonical,
    tokenize_records,
)
from tunesmith.data.templates import ensure_chat_template
from tunesmith.data.tokenize import IGNORE_INDEX, Rejection, TokenizedExample

# Token lengths are measured on about this many records, evenly spaced; counts cover the whole file.
LENGTH_SAMPLE = 2_000


def inspect_data(path: Path, tokenizer, data_config=None, task: str = "sft") -> str:
    """A plain-text report on `path` as `task` would train on it with `data_config` (a DataConfig;
    its format, columns, header, max_length, train_on_prompt and system_prompt apply)."""
    from tunesmith.config import DataConfig

    path = Path(path)
    data = data_config.model_copy(update={"train": path}) if data_config is not None else DataConfig(train=path)
    check_configured_format(data, task)
    rejects: list[tuple[str, str]] = []
    records, fmt, read = read_canonical(
        path, data, task, None, lambda source, reason, _: rejects.append((source, reason))
    )
    lines = [
        f"file:    {path}",
        f"task:    {task}",
        f"format:  {fmt}" + (" (detected)" if data.format == "auto" else ""),
        f"records: {read:,} read, {len(records):,} usable, {len(rejects):,} rejected",
    ]
    if rejects:
        lines.append(f"         first rejected: {rejects[0][0]}: {rejects[0][1]}")
    if not records:
        return "\n".join(lines)

    if "messages" in records[0].canonical and ensure_chat_template(tokenizer):
        lines.append("note:    the tokenizer has no chat template; the ChatML fallback is used")
    step = -(-len(records) // LENGTH_SAMPLE)  # ceil: every step-th record, the first one included
    sample = records[::step]
    if task == "classify":
        names = class_label_names(records, data.labels)
        sample = attach_label_ids(sample, names, data.labels is not None, lambda *_: None)
        lines.append(f"labels:  {len(names)}: {', '.join(names[:20])}" + (" ..." if len(names) > 20 else ""))
    # Measure full lengths (no truncation), then say what max_length would cut.
    unlimited = data.model_copy(update={"max_length": 2**62})
    results = [
        result
        for start in range(0, len(sample), 1000)
        for result in tokenize_records(sample[start:start + 1000], task, tokenizer, unlimited)
    ]
    examples = [result for result in results if isinstance(result, TokenizedExample)]
    if examples:
        lengths = np.array([len(example.input_ids) for example in examples])
        p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
        measured = f" (measured on 1 record in {step})" if step > 1 else ""
        longer = [example for example in examples if len(example.input_ids) > data.max_length]
        lines.append(
            f"tokens:  p50 {p50:.0f}, p90 {p90:.0f}, p99 {p99:.0f}, max {lengths.max()}{measured}; "
            f"{len(longer):,} longer than max_length={data.max_length}"
        )
        emptied = sum(_no_loss_within(example, data.max_length) for example in longer)
        if emptied:
            lines.append(f"         {emptied:,} of them keep no trained token once truncated, and are dropped")
    dropped = [result for result in results if isinstance(result, Rejection)]
    if dropped:
        lines.append(f"         {len(dropped):,} dropped at tokenisation, e.g. {dropped[0].reason}")

    first_record, first = sample[0] if sample else records[0], results[0] if results else None
    lines += ["", f"first record ({first_record.source}) as the model sees it:"]
    if first is None or isinstance(first, Rejection):
        lines.append(f"  (dropped: {first.reason if first else 'label not in data.labels'})")
        return "\n".join(lines)
    first.input_ids = first.input_ids[: data.max_length]
    if first.labels is not None:
        first.labels = first.labels[: data.max_length]
        lines += ["  trained text is in [[ ]]", "", marked_text(first, tokenizer)]
    else:
        name = names[first.label]
        shown = f"{first.label}" if name == str(first.label) else f"{first.label} ({name})"
        lines += [tokenizer.decode(first.input_ids), f"-> label {shown}"]
    return "\n".join(lines)


def _no_loss_within(example: TokenizedExample, max_length: int) -> bool:
    return example.labels is not None and all(label == IGNORE_INDEX for label in example.labels[:max_length])


def marked_text(example: TokenizedExample, tokenizer) -> str:
    """The decoded tokens with every run of loss-bearing tokens wrapped in [[ ]]."""
    pieces, run, run_trained = [], [], None
    for token, label in zip(example.input_ids, example.labels, strict=True):
        trained = label != IGNORE_INDEX
        if run and trained != run_trained:
            pieces.append(_decoded_run(run, run_trained, tokenizer))
            run = []
        run.append(token)
        run_trained = trained
    if run:
        pieces.append(_decoded_run(run, run_trained, tokenizer))
    return "".join(pieces)


def _decoded_run(tokens: list[int], trained: bool, tokenizer) -> str:
    text = tokenizer.decode(tokens)
    return f"[[{text}]]" if trained else text
