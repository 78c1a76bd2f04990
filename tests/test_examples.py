"""Every example config loads and validates (paths resolve against ../shared/data from the repo root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# eval-*.yaml are evaluation suites, checked in test_eval_examples.py; distill-sequence-*.yaml train on the
# output of `tunesmith distill-data` (checked in test_distill_data.py) and continual-*.yaml start from another
# example's run (checked in test_continual.py); the rest are run configs.
EXAMPLES = sorted(
    path for path in (ROOT / "examples").glob("*.yaml")
    if not path.stem.startswith(("eval-", "distill-sequence-", "continual-"))
)


def test_there_are_examples_for_every_task_and_method():
    configs = [load_config(path) for path in EXAMPLES]
    assert {config.task for config in configs} >= {"sft", "pretrain", "classify"}
    assert {config.method.name for config in configs} >= {"full", "freeze", "lora"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config(path)
    paths = [config.data.train] if config.data.mixture is None else [part.train for part in config.data.mixture]
    assert all(path.exists() for path in paths)
    assert str(config.output_dir).startswith("runs/")


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_data_prepares(path, monkeypatch):
    """Every example's data reads and tokenises as its run would, so a newcomer's first run does not stop on a
    record: one the example cannot use (a prompt that fills max_length) must be set to go to the rejects file."""
    from tunesmith.data import prepare_data
    from tunesmith.models import load_tokenizer

    monkeypatch.chdir(ROOT)
    config = load_config(path)
    data = prepare_data(config, load_tokenizer(config.model))
    assert data.train and len(data.rejects) < len(data.train)
