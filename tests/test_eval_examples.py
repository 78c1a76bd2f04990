"""Every eval example suite and built-in suite validates, and its data paths exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.evaluate import builtin_suites, load_suite

ROOT = Path(__file__).resolve().parents[1]
SUITES = sorted((ROOT / "examples").glob("eval-*.yaml"))


@pytest.mark.parametrize("path", SUITES + builtin_suites(), ids=[p.stem for p in SUITES] + builtin_suites())
def test_suite_validates_and_its_data_exists(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    suite = load_suite(path)
    assert suite.tasks
    for task in suite.tasks:
        for key in ("data", "data_dir"):
            if hasattr(task, key):
                assert Path(getattr(task, key)).exists(), f"{task.name}.{key}"
