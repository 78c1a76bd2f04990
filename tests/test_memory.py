"""glibc malloc on CPU: freed tensor buffers kept in the process while training or evaluating (the default), or
given back to the system at once (`train.release_memory`)."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager

import pytest
from helpers import chat_records, run_config, write_jsonl

LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt; others are untouched")

RESIDENT_MB = """
def resident_mb():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20
"""

RELEASE_PROBE = RESIDENT_MB + """
import sys, torch
from contextlib import nullcontext
from tunesmith.training.memory import released_freed_memory


def freed_every_other_buffer_mb():
    torch.ones(2**21).sum()  # one 8 MiB buffer freed: glibc raises its threshold above that size by default
    tensors = [torch.ones(2**21) for _ in range(24)]  # 24 x 8 MiB, touched
    before = resident_mb()
    del tensors[::2]  # free every other one: holes in the middle of the heap unless each is its own mapping
    return before - resident_mb()


with released_freed_memory() if sys.argv[1] == "on" else nullcontext(True) as applied:
    assert applied
    inside = freed_every_other_buffer_mb()
print(inside, freed_every_other_buffer_mb())
"""

KEEP_PROBE = RESIDENT_MB + """
import sys, torch
from contextlib import nullcontext
from tunesmith.training.memory import kept_freed_memory

with kept_freed_memory() if sys.argv[1] == "kept" else nullcontext(True) as applied:
    assert applied
    # 8 x 24 MiB, touched: by default over glibc's mmap threshold (128 KiB, raised only by freeing a larger mapped
    # block), so each is a mapping of its own, unmapped when freed; when kept, under it: heap memory
    tensors = [torch.ones(6 * 2**20) for _ in range(8)]
    before = resident_mb()
    del tensors
    inside = before - resident_mb()
print(inside, before - resident_mb())
"""


def released_mb(probe: str, mode: str) -> list[float]:
    result = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True)
    return [float(value) for value in result.stdout.split()]


@LINUX_ONLY
def test_freed_buffers_leave_the_resident_set_only_while_released():
    inside, after = released_mb(RELEASE_PROBE, "on")
    assert inside > 80  # 12 x 8 MiB freed, each given back
    assert after < 40  # after the block, glibc keeps them in its heap again
    assert released_mb(RELEASE_PROBE, "off")[0] < 40  # glibc's default keeps them in the heap


@LINUX_ONLY
def test_freed_buffers_stay_for_reuse_while_kept_and_are_trimmed_after():
    inside, after = released_mb(KEEP_PROBE, "kept")
    assert inside < 20  # 192 MiB freed, all of it still the process's
    assert after > 150  # given back when the block ends
    inside, _ = released_mb(KEEP_PROBE, "default")
    assert inside > 150  # glibc's default: each buffer unmapped as it is freed


def test_cpu_training_keeps_or_releases_freed_memory_for_the_whole_run(tiny_llama_dir, tmp_path, monkeypatch):
    import tunesmith.training.loop as loop

    policies = []

    @contextmanager
    def spy(release: bool):
        policies.append({"release": release})
        yield True
        policies[-1]["exported"] = (run_dir / "model").is_dir()  # the run, its export included, ran inside

    monkeypatch.setattr(loop, "freed_memory", spy)
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(8))
    for release in (False, True):
        run_dir = tmp_path / f"release-{release}"
        loop.train(run_config(tiny_llama_dir, data, run_dir, train={"max_steps": 1, "release_memory": release}))
    assert policies == [{"release": False, "exported": True}, {"release": True, "exported": True}]


def test_evaluation_keeps_freed_memory_for_a_model_on_cpu(monkeypatch):
    import torch

    import tunesmith.evaluate.run as run
    from tunesmith.evaluate.config import EvalSuiteConfig
    from tunesmith.evaluate.tasks import System

    entered = []

    @contextmanager
    def spy():  # a stand-in for kept_freed_memory that records each entry
        entered.append(True)
        yield True

    monkeypatch.setattr(run, "kept_freed_memory", spy)
    suite = EvalSuiteConfig.model_construct(tasks=[], seed=0)
    run.run_suite(System("model", "causal_lm", model=torch.nn.Linear(2, 2)), suite)
    assert entered == [True]
    run.run_suite(System("outputs", "predictions", predictions=[]), suite)  # no model: nothing to keep
    assert entered == [True]
