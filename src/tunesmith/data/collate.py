"""Batches: dynamic padding, length-grouped order, and packing without attention across records.

Every causal example carries `input_ids` and `labels` of equal length, unshifted (labels[i] is
input_ids[i] or -100). Collators shift labels into `targets` WITHIN each record, so position i
predicts token i+1 of the same record and the last token of one packed record never predicts the
first token of the next. A packed row restarts `position_ids` at 0 for each record and is passed
without an attention mask: transformers then builds a block-diagonal causal mask from the
position ids (masking_utils.find_packed_sequence_indices), so records never attend to each other.
That detection only runs without a KV cache: packed batches must be run with `use_cache=False`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

IGNORE_INDEX = -100


def shift_labels(labels: list[int]) -> list[int]:
    """targets[i] = labels[i + 1]: position i predicts the next token; the last position predicts nothing."""
    return labels[1:] + [IGNORE_INDEX]


def collate_padded(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad causal examples to the longest in the batch."""
    longest = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)  # (B, T)
    targets = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    weights = torch.ones((len(examples), longest))  # (B, T): each record's sample weight on its tokens
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        attention_mask[row, :length] = 1
        targets[row, :length] = torch.tensor(shift_labels(example["labels"]))
        weights[row, :length] = example.get("weight", 1.0)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "targets": targets,
        "num_loss_tokens": int((targets != IGNORE_INDEX).sum()),
        "num_tokens": int(attention_mask.sum()),
    }
    return with_sample_weights(batch, examples, weights)


def with_sample_weights(batch: dict, examples: list[dict], weights: torch.Tensor) -> dict:
    """Add `sample_weights` only when some record carries a weight, so unweighted runs pay nothing."""
    if any("weight" in example for example in examples):
        batch["sample_weights"] = weights
    return batch


def collate_packed(rows: list[list[dict]], pad_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """Concatenate each row's records; position ids restart per record; no attention mask. Rows are padded
    to the longest row, or to `length` when given (compiled layers then see one shape for the whole run)."""
    flat_rows = []
    for row in rows:
        input_ids: list[int] = []
        targets: list[int] = []
        positions: list[int] = []
        row_weights: list[float] = []
        for example in row:
            input_ids += example["input_ids"]
            targets += shift_labels(example["labels"])
            positions += range(len(example["input_ids"]))
            row_weights += [example.get("weight", 1.0)] * len(example["input_ids"])
        flat_rows.append((input_ids, targets, positions, row_weights))
    # Never shorter than a row: a record longer than `length` keeps its own, longer row.
    longest = max(length or 0, *(len(input_ids) for input_ids, _, _, _ in flat_rows))
    batch_input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)  # (B, T)
    batch_targets = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    # The padding tail is its own "record" starting at position 0, so it attends to nothing real.
    batch_positions = torch.arange(longest).repeat(len(rows), 1)  # (B, T)
    batch_weights = torch.ones((len(rows), longest))  # (B, T)
    num_tokens = 0
    for index, (input_ids, targets, positions, row_weights) in enumerate(flat_rows):
        length = len(input_ids)
        num_tokens += length
        batch_input_ids[index, :length] = torch.tensor(input_ids)
        batch_targets[index, :length] = torch.tensor(targets)
        batch_positions[index, :length] = torch.tensor(positions)
        batch_positions[index, length:] = torch.arange(longest - length)
        batch_weights[index, :length] = torch.tensor(row_weights)
    batch = {
        "input_ids": batch_input_ids,
        "position_ids": batch_positions,
        "targets": batch_targets,
        "num_loss_tokens": int((batch_targets != IGNORE_INDEX).sum()),
        "num_tokens": num_tokens,
    }
    return with_sample_weights(batch, [example for row in rows for example in row], batch_weights)


def collate_classification(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)  # (B, T)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        attention_mask[row, :length] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "class_labels": torch.tensor([example["label"] for example in examples], dtype=torch.long),  # (B,)
        "num_loss_tokens": len(examples),
        "num_tokens": int(attention_mask.sum()),
    }
    weights = torch.tensor([example.get("weight", 1.0) for example in examples])  # (B,)
    return with_sample_weights(batch, examples, weights)


def pack_examples(examples: list[dict], max_length: int) -> list[list[dict]]:
    """First-fit-decreasing bin packing of records into rows of at most max_length tokens.

    Records keep their own identity inside a row (see collate_packed); the order of rows is
    shuffled later by the batch order, so sorting by length here does not bias training order.
    """
    order = sorted(range(len(examples)), key=lambda index: -len(examples[index]["input_ids"]))
    rows: list[list[dict]] = []
    space: list[int] = []
    for index in order:
        length = len(examples[index]["input_ids"])
        for row, free in enumerate(space):
            if length <= free:
                rows[row].append(examples[index])
                space[row] -= length
                break
        else:
            rows.append([examples[index]])
            space.append(max_length - length)
    return rows


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """The micro-batches of one epoch as lists of item indices; a pure function of (seed, epoch).

    Being pure makes resume exact: the loop recomputes an epoch's order and skips what it consumed.
    With group_by_length, items are shuffled, cut into mega-batches of 50 batches, sorted by length
    inside each (so batches hold similar lengths), and the batches are shuffled again
    (the scheme of transformers' LengthGroupedSampler).
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    permutation = torch.randperm(len(lengths), generator=generator).tolist()
    if not group_by_length:
        return [permutation[start : start + batch_size] for start in range(0, len(permutation), batch_size)]
    mega = batch_size * 50
    batches = []
    for start in range(0, len(permutation), mega):
        chunk = sorted(permutation[start : start + mega], key=lambda index: -lengths[index])
        batches += [chunk[offset : offset + batch_size] for offset in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[index] for index in shuffled]


def task_batch_order(
    lengths: list[int], tasks: list[str], batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """`batch_order` within each task, then every task's batches shuffled together (seeded): each
    micro-batch holds one task's items, so its loss can be logged per task (data.mixture)."""
    by_task: dict[str, list[int]] = {}
    for index, task in enumerate(tasks):
        by_task.setdefault(task, []).append(index)
    batches = []
    for position, task in enumerate(sorted(by_task)):
        indices = by_task[task]
        order = batch_order([lengths[index] for index in indices], batch_size, seed + position, epoch, group_by_length)
        batches += [[indices[index] for index in batch] for batch in order]
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[index] for index in shuffled]


def eval_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Evaluation order: longest first, so padding is small and memory peaks at once."""
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]
