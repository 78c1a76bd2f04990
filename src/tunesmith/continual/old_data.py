"""The old task's examples (for replay and EWC's Fisher), tokenised exactly as training examples are."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from tunesmith.errors import ConfigError, UserError
from tunesmith.settings import parse_yaml

if TYPE_CHECKING:
    from tunesmith.config import RunConfig


def old_examples(config: RunConfig, tokenizer, label_names: list[str] | None) -> list[dict]:
    """Tokenised training examples of the old task, per `continual.old_data`.

    `previous`: the training examples of `model.from_run`, rebuilt from its config.yaml (same
    files, limit, held-out split and seed, so the same examples it trained on). A path: that file,
    read with this run's data settings and no held-out split. Classification examples use this
    run's label ids (`label_names`), which `model.from_run` checks agree with the previous run's.
    """
    from tunesmith.config import build_config
    from tunesmith.data import prepare_data

    source = config.continual.old_data
    if source == "previous":
        if config.model.from_run is None:
            raise ConfigError("continual.old_data: `previous` needs model.from_run (the run whose data it reads)")
        config_path = config.model.from_run / "config.yaml"
        if not config_path.is_file():
            raise ConfigError(f"continual.old_data: {config_path} not found; model.from_run must be a run directory")
        raw = parse_yaml(config_path.read_text(encoding="utf-8")) or {}
        try:
            old_config = build_config(raw)
        except ConfigError as error:
            raise ConfigError(f"continual.old_data: {config_path}: {error}") from None
        if old_config.task != config.task:
            raise ConfigError(
                f"continual.old_data: {config_path} trained task {old_config.task}, this run {config.task}; "
                "give continual.old_data a data file in this task's format instead"
            )
        old_data = old_config.data
    else:
        old_config = config
        old_data = config.data.model_copy(
            update={"train": source, "eval": None, "eval_split": 0.0, "limit": None, "sample_weights": None}
        )
    if label_names is not None:
        old_data = old_data.model_copy(update={"labels": label_names})
    try:
        prepared = prepare_data(old_config.model_copy(update={"data": old_data}), tokenizer)
    except UserError as error:
        raise type(error)(f"continual.old_data: {error}") from None
    if not prepared.train:
        raise ConfigError(f"continual.old_data: no usable old training record in {old_data.train}")
    return prepared.train


def draw_examples(examples: list[dict], count: int, seed: int) -> list[dict]:
    """`count` examples (at most all of them) drawn without replacement with `seed`, in drawn order."""
    return random.Random(seed).sample(examples, min(count, len(examples)))
