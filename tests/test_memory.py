"""glibc malloc on CPU: freed tensor buffers kept in the process while training or evaluating (the default), up to
a resident-memory limit past which they go back to the system, or given back at once (`train.release_memory`)."""

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


with released_freed_memory() if sys.argv[1] == "on" else nullcontext() as state:
    assert state is None or state.applied
    inside = freed_every_other_buffer_mb()
print(inside, freed_every_other_buffer_mb())
"""

KEEP_PROBE = RESIDENT_MB + """
import sys, torch
from contextlib import nullcontext
from tunesmith.training.memory import kept_freed_memory

with kept_freed_memory() if sys.argv[1] == "kept" else nullcontext() as state:
    assert state is None or state.applied
    # 8 x 24 MiB, touched: by default over glibc's mmap threshold (128 KiB, raised only by freeing a larger mapped
    # block), so each is a mapping of its own, unmapped when freed; when kept, under it: heap memory
    tensors = [torch.ones(6 * 2**20) for _ in range(8)]
    before = resident_mb()
    del tensors
    inside = before - resident_mb()
print(inside, before - resident_mb())
"""


HOLES_PROBE = RESIDENT_MB + """
import time, torch
from tunesmith.training.memory import TRIM_SECONDS, released_freed_memory

with released_freed_memory():
    # 400 x 512 KiB, touched: under the release mode's 1 MiB threshold, so heap memory (as FSDP's sharded gradients
    # and AdamW moments of its smaller parameters are)
    tensors = [torch.ones(2**17) for _ in range(400)]
    before = resident_mb()
    del tensors[::2]  # 100 MiB freed in holes between live blocks: the heap's top cannot shrink
    time.sleep(3 * TRIM_SECONDS)
    print(before - resident_mb())
"""


LIMIT_PROBE = RESIDENT_MB + """
import sys, time, torch
from tunesmith.training.memory import kept_freed_memory


def wait_for(state):
    deadline = time.monotonic() + 5
    while state.released_at_mb is None and time.monotonic() < deadline:
        time.sleep(0.01)


start = resident_mb()
with kept_freed_memory(start + 250 if sys.argv[1] == "limit" else None) as state:
    tensors = [torch.ones(2**21) for _ in range(24)]  # 24 x 8 MiB, touched, then freed: kept in the heap
    del tensors
    held = resident_mb()
    big = torch.ones(75 * 2**20)  # 300 MiB live, its own mapping: past the limit
    time.sleep(0.2)
    wait_for(state)
    after_switch = resident_mb()  # the limit gave back the heap's free 192 MiB, the 300 MiB still live
    tensors = [torch.ones(2**21) for _ in range(24)]  # the heap's free blocks again, paged in
    del tensors
    time.sleep(0.6)  # past the limit, the heap is trimmed again
    print(held - start, after_switch - held, resident_mb() - after_switch, state.released_at_mb or 0,
          state.limit_mb or 0)
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
def test_released_memory_gives_back_the_heaps_holes_too():
    (given_back,) = released_mb(HOLES_PROBE, "on")
    assert given_back > 80  # of the 100 MiB freed between live blocks: resident until the heap is trimmed


@LINUX_ONLY
def test_freed_buffers_stay_for_reuse_while_kept_and_are_trimmed_after():
    inside, after = released_mb(KEEP_PROBE, "kept")
    assert inside < 20  # 192 MiB freed, all of it still the process's
    assert after > 150  # given back when the block ends
    inside, _ = released_mb(KEEP_PROBE, "default")
    assert inside > 150  # glibc's default: each buffer unmapped as it is freed


@LINUX_ONLY
def test_kept_buffers_go_back_once_resident_memory_passes_the_limit():
    held, growth, regrowth, released_at, limit = released_mb(LIMIT_PROBE, "limit")
    assert held > 150  # 192 MiB freed and kept
    assert growth < 300 - 120  # 300 MiB more live, and the kept 192 MiB given back at the switch
    assert released_at > limit > 0
    assert regrowth < 60  # 192 MiB used and freed again after the switch: given back again
    held, growth, regrowth, released_at, limit = released_mb(LIMIT_PROBE, "no-limit")
    assert held > 150 and growth > 280 and released_at == 0  # kept throughout


def test_a_run_past_the_limit_says_so_and_records_it(tiny_llama_dir, tmp_path, monkeypatch):
    import io

    from rich.console import Console

    import tunesmith.training.memory as memory
    from tunesmith.training import train

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt; others are untouched")
    monkeypatch.setattr(memory, "memory_limit_mb", lambda processes_on_node: 1.0)  # less than the process holds
    output = io.StringIO()
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(8))
    result = train(run_config(tiny_llama_dir, data, tmp_path / "run", train={"max_steps": 2}),
                   console=Console(file=output, width=200))
    assert result.summary["released_memory_at_mb"] > 1.0
    assert output.getvalue().count("the limit for freed buffers kept for reuse") == 1
    kept = train(run_config(tiny_llama_dir, data, tmp_path / "kept", train={"max_steps": 2, "release_memory": False}),
                 console=Console(file=io.StringIO()))
    assert kept.summary["released_memory_at_mb"] is None  # false: no limit


def test_cpu_training_keeps_or_releases_freed_memory_for_the_whole_run(tiny_llama_dir, tmp_path, monkeypatch):
    import tunesmith.training.loop as loop
    from tunesmith.training.memory import FreedMemory

    policies = []

    @contextmanager
    def spy(release: bool | None, processes_on_node: int):
        policies.append({"release": release})
        yield FreedMemory(applied=True)
        policies[-1]["exported"] = (run_dir / "model").is_dir()  # the run, its export included, ran inside

    monkeypatch.setattr(loop, "freed_memory", spy)
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(8))
    for release in (None, False, True):
        run_dir = tmp_path / f"release-{release}"
        loop.train(run_config(tiny_llama_dir, data, run_dir, train={"max_steps": 1, "release_memory": release}))
    assert policies == [{"release": release, "exported": True} for release in (None, False, True)]


def test_evaluation_keeps_freed_memory_for_a_model_on_cpu(monkeypatch):
    import torch

    import tunesmith.evaluate.run as run
    from tunesmith.evaluate.config import EvalSuiteConfig
    from tunesmith.evaluate.tasks import System
    from tunesmith.training.memory import FreedMemory

    entered = []

    @contextmanager
    def spy(limit_mb):  # a stand-in for kept_freed_memory that records each entry
        entered.append(limit_mb is not None)
        yield FreedMemory(applied=True)

    monkeypatch.setattr(run, "kept_freed_memory", spy)
    suite = EvalSuiteConfig.model_construct(tasks=[], seed=0)
    run.run_suite(System("model", "causal_lm", model=torch.nn.Linear(2, 2)), suite)
    assert entered == [True]
    run.run_suite(System("outputs", "predictions", predictions=[]), suite)  # no model: nothing to keep
    assert entered == [True]
