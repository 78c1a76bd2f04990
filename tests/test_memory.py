"""train.release_memory: freed tensor buffers leave the process at once (glibc), instead of staying resident."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys, torch
from tunesmith.training.memory import return_large_buffers_to_the_os

def resident_mb():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20

if sys.argv[1] == "on":
    assert return_large_buffers_to_the_os()
torch.ones(2**21).sum()  # one 8 MiB buffer freed: glibc raises its threshold above that size when off
tensors = [torch.ones(2**21) for _ in range(24)]  # 24 x 8 MiB, touched
before = resident_mb()
del tensors[::2]  # free every other one: holes in the middle of the heap when off
print(before - resident_mb())
"""


def released_mb(mode: str) -> float:
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(result.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt; other platforms are untouched")
def test_freed_buffers_leave_the_resident_set_only_with_release_memory():
    assert released_mb("on") > 80  # 12 x 8 MiB freed
    assert released_mb("off") < 40  # glibc keeps them in the heap
