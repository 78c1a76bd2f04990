"""Multi-task data: several datasets, each prepared on its own, tagged with its task, mixed by weight.

Each mixture dataset is read, checked, split and tokenised exactly as a single `data.train` would be
(its own format and columns), then every example carries `task` = the dataset's name. The training
set is drawn once, seeded, with task i's share of the epoch proportional to w_i^(1/T): w_i is the
dataset's `weight`, or its record count when unset (examples-proportional mixing, Raffel et al. 2020,
"Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer", sec. 3.5.2),
and T is `data.mixture_temperature` (temperature-scaled mixing of the same section; mT5 uses
p ~ n^(1/T) with T = 1/0.3). An epoch holds as many examples as the datasets together; a task whose
share exceeds its size is repeated (every record once before any twice), a smaller share is a
seeded subset. Drawing once keeps the epoch a fixed list, so batching, resume and the step count
work as for one dataset; the loop then keeps each micro-batch to one task (`task_batch_order`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tunesmith.errors import ConfigError

if TYPE_CHECKING:
    from tunesmith.data.prepare import PreparedData


def mixture_probabilities(weights: list[float], temperature: float) -> list[float]:
    """p_i = w_i^(1/T) / sum_j w_j^(1/T)."""
    scaled = [weight ** (1 / temperature) for weight in weights]
    total = sum(scaled)
    return [value / total for value in scaled]


def draw_counts(probabilities: list[float], total: int) -> list[int]:
    """Whole example counts per task summing to `total`, by largest remainder."""
    exact = [probability * total for probability in probabilities]
    counts = [int(value) for value in exact]
    by_remainder = sorted(range(len(exact)), key=lambda index: counts[index] - exact[index])
    for index in by_remainder[: total - sum(counts)]:
        counts[index] += 1
    return counts


def draw_examples(examples: list[dict], count: int, generator: torch.Generator) -> list[dict]:
    """`count` examples: whole seeded passes over `examples`, then a seeded subset for the remainder."""
    passes, remainder = divmod(count, len(examples))
    drawn = examples * passes
    subset = torch.randperm(len(examples), generator=generator)[:remainder].tolist()
    return drawn + [examples[index] for index in sorted(subset)]


def prepare_mixture(config, tokenizer) -> PreparedData:
    """`prepare_data` for `data.mixture`: prepare each dataset, tag its examples, draw the training mix."""
    from tunesmith.data.prepare import PreparedData, prepare_data

    data = config.data
    parts: dict[str, PreparedData] = {}
    for component in data.mixture:
        part = prepare_data(config.model_copy(update={"data": data.component(component)}), tokenizer)
        for example in part.train + part.eval:
            example["task"] = component.name
        parts[component.name] = part

    label_names = {name: part.label_names for name, part in parts.items()}
    if len({tuple(names) for names in label_names.values() if names is not None}) > 1:
        raise ConfigError(f"data.mixture: the datasets have different label sets {label_names}; "
                          "set data.labels to the full list in id order")

    weights = [component.weight or len(parts[component.name].train) for component in data.mixture]
    if any(not parts[component.name].train for component in data.mixture):
        empty = [component.name for component in data.mixture if not parts[component.name].train]
        raise ConfigError(f"data.mixture: no usable training record in {', '.join(empty)} (see rejects.jsonl)")
    probabilities = mixture_probabilities(weights, data.mixture_temperature)
    total = sum(len(part.train) for part in parts.values())
    generator = torch.Generator().manual_seed(config.train.seed)
    train: list[dict] = []
    stats: dict = {"tasks": {}}
    for component, probability, count in zip(data.mixture, probabilities, draw_counts(probabilities, total),
                                              strict=True):
        part = parts[component.name]
        train += draw_examples(part.train, count, generator)
        stats["tasks"][component.name] = {
            **part.stats, "mixture_probability": round(probability, 4), "examples_per_epoch": count
        }
    # Totals over the datasets (read = used_train + used_eval + rejected holds for each and for the sum).
    for key in ("read", "read_train", "read_eval", "used_train", "used_eval", "rejected", "truncated"):
        stats[key] = sum(part.stats[key] for part in parts.values())
    stats["mixed_train"] = len(train)
    stats["train_tokens"] = sum(len(example["input_ids"]) + len(example.get("rejected_input_ids", ()))
                                for example in train)
    return PreparedData(
        train=train,
        eval=[example for part in parts.values() for example in part.eval],
        rejects=[reject for part in parts.values() for reject in part.rejects],
        stats=stats,
        label_names=next((names for names in label_names.values() if names is not None), None),
    )
