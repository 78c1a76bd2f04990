"""glibc malloc on CPU: freed tensor buffers kept for the next step, or given back to the system at once.

glibc's malloc serves requests under its mmap threshold from the heap and maps larger ones on their own;
the threshold starts at 128 KiB and rises (up to 32 MiB) each time a mapped block is freed, and the heap's free
top goes back to the system once it passes the trim threshold (128 KiB, rising with the mmap threshold). A
training step allocates and frees the same activation buffers over and over, so by default many of them are
fresh mappings or freshly grown heap, page-faulted and zeroed by the kernel 4 KiB at a time, every step: a
`perf record` of the CPU benchmark job (bench/train_throughput.py, bf16) put 8% of its time in the kernel
(page clearing the most) and 9% in malloc itself.

`kept_freed_memory` (the default for CPU training, and for `tunesmith eval`'s suites on a CPU model) raises both
thresholds while it runs: buffers up to 32 MiB come from the heap and the heap never shrinks, so a step reuses the
memory the step before freed: 18% fewer page faults in an 8-step bf16 run, +2% bf16 tokens/s by the median of 8
before/after pairs (-3% to +10%, this machine's run-to-run spread), peak resident memory the same (float32: the
same speed, its steps GEMM-bound, and +2-4% peak; MMLU scoring 2.4-5% faster at 0-6% more peak; bench/README.md).
What the heap holds is trimmed when training (or an evaluated system's suite) ends.

`released_freed_memory` (`train.release_memory`) does the opposite: every buffer over 1 MiB is its own mapping, given
back to the system the moment the tensor is freed, and what the heaps hold free is given back every TRIM_SECONDS, so
resident memory tracks the live tensors at the cost of a page fault per page of every new buffer: peak RSS -38% (5,101
-> 3,225 MB for the SFT job, 4,885 -> 3,000 MB for DPO) at 15-20% fewer tokens/s, measured on a 2-core CPU (the LoRA job
in bf16 with its rows in two threads: -21%, 3,601-3,630 -> 2,839-2,864 MB, at -18%, 655-666 -> 529-554 tokens/s). The
trimming is needed because smaller buffers still come from the heaps, and a freed block in the middle of a heap stays
resident: the sharded gradients and AdamW moments of FSDP's smaller parameters, or the second row thread's arena
(`train.parallel_rows`), left hundreds of MB of freed heap resident per process (see bench/README.md, "FSDP memory per
process").

Kept buffers are a cache, and glibc's heap fragments: at long sequences the heap it keeps grows far past the live
tensors (SmolLM2-135M LoRA, one row of 4,096 tokens, every layer recomputed: 5.4 GB resident after one step and 9.2 GB
after two, where the released run peaks at 1.8 GB). So kept memory has a limit (`HeapTrimmer`): a thread reads the
process's resident memory every 20 ms, and once it passes 80% of what the process could take when the block began (its
own resident memory and the machine's available memory, or its cgroup's, shared among the node's processes), glibc
switches to releasing for the rest of the block and gives back what its heap holds free (again every 0.25 s from then
on, as release mode does). A run is fast while memory lasts and never runs out of it for the cache's sake.

`freed_memory(release)` is the one a CPU training run enters, around the whole run: loading, the evaluation before
training, caching the reference, the steps and the export: `train.release_memory` true releases, false keeps, null
(the default) keeps up to the limit. Each leaves the process, when it ends, with the thresholds glibc's own
adjustment reaches once a 32 MiB block has been freed, and its heap trimmed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

RELEASE_MMAP_THRESHOLD = 1 << 20
RELEASE_TRIM_THRESHOLD = 128 << 10  # glibc's defaults, which the kept policy raises
RELEASE_TOP_PAD = 0
KEPT_MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit), the most its adjustment reaches
KEPT_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: the heap's free top is never given back while training
KEPT_TOP_PAD = 64 << 20  # the heap grows in 64 MiB steps, not one system call per new buffer
# After training: the thresholds glibc's own adjustment reaches once a 32 MiB block has been freed, and no pad.
AFTER_TRIM_THRESHOLD = 2 * KEPT_MMAP_THRESHOLD
AFTER_TOP_PAD = 0
# Kept memory's limit: this share of what the process could take when the block began.
LIMIT_SHARE = 0.8
WATCH_SECONDS = 0.02
TRIM_SECONDS = 0.25  # releasing (past the limit, or from the start), how often the heaps are trimmed


def _glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc (it has mallopt and malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None  # musl has neither


@dataclass
class FreedMemory:
    """What a freed-memory block did: `applied` (False where the C library is not glibc: nothing changed), its
    resident-memory limit in MB (None: none), and the resident MB at which it switched to releasing (None: it did
    not)."""

    applied: bool
    limit_mb: float | None = None
    released_at_mb: float | None = None


@contextmanager
def released_freed_memory() -> Iterator[FreedMemory]:
    """glibc gives every buffer over 1 MiB back to the system as soon as it is freed, and what its heaps hold free
    every TRIM_SECONDS, while the block runs; after it, as `kept_freed_memory` leaves things."""
    libc = _glibc()
    if libc is None:
        yield FreedMemory(applied=False)
        return
    _release(libc)
    trimmer = HeapTrimmer(libc, FreedMemory(applied=True), limit_mb=None)
    try:
        yield trimmer.state
    finally:
        trimmer.stop()
        _after(libc)


@contextmanager
def kept_freed_memory(limit_mb: float | None = None) -> Iterator[FreedMemory]:
    """glibc keeps freed buffers (up to 32 MiB each) in the process for reuse while the block runs, until its
    resident memory passes `limit_mb` (None: no limit), when it switches to releasing them and gives back what its
    heap holds free. After the block the mmap threshold stays at 32 MiB, where glibc's own adjustment ends, with
    the trim threshold that goes with it, and the heap's free memory is trimmed."""
    libc = _glibc()
    if libc is None:
        yield FreedMemory(applied=False)
        return
    libc.mallopt(M_MMAP_THRESHOLD, KEPT_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, KEPT_TRIM_THRESHOLD)
    libc.mallopt(M_TOP_PAD, KEPT_TOP_PAD)
    state = FreedMemory(applied=True, limit_mb=limit_mb)
    watcher = HeapTrimmer(libc, state, limit_mb) if limit_mb is not None else None
    try:
        yield state
    finally:
        if watcher is not None:
            watcher.stop()
        _after(libc)


def freed_memory(release: bool | None, processes_on_node: int = 1) -> AbstractContextManager[FreedMemory]:
    """A CPU training run's policy for freed buffers (`train.release_memory`): given back at once (True), kept
    (False), or kept up to `memory_limit_mb` (None)."""
    if release:
        return released_freed_memory()
    return kept_freed_memory(None if release is False else memory_limit_mb(processes_on_node))


class HeapTrimmer:
    """A thread that gives back what glibc's heaps hold free, every TRIM_SECONDS once the process's resident memory
    passes `limit_mb` (read every WATCH_SECONDS until then); at that moment glibc switches to releasing freed
    buffers (each over 1 MiB its own mapping) and `state` records the resident MB of the switch. The
    heaps' free blocks stay theirs to reuse, paged in again as they are, and a block freed in the middle of a heap
    stays resident: so it is trimmed again and again. `limit_mb` None: releasing from the start (release mode)."""

    def __init__(self, libc: ctypes.CDLL, state: FreedMemory, limit_mb: float | None):
        self._libc, self.state, self._limit_mb = libc, state, limit_mb
        self._releasing = limit_mb is None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tunesmith-heap-trimmer", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopped.wait(TRIM_SECONDS if self._releasing else WATCH_SECONDS):
            if not self._releasing:
                resident = resident_mb()
                if resident <= self._limit_mb:
                    continue
                _release(self._libc)
                self._releasing = True
                self.state.released_at_mb = resident
            self._libc.malloc_trim(0)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


def resident_mb() -> float:
    """The process's resident memory (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_limit_mb(processes_on_node: int = 1) -> float | None:
    """LIMIT_SHARE of what this process could take now: its resident memory plus its share of the memory available
    to the node's processes (the machine's MemAvailable, or less where its cgroup allows less). None where that
    cannot be read (not Linux)."""
    available = available_mb()
    if available is None:
        return None
    return LIMIT_SHARE * (resident_mb() + available / max(processes_on_node, 1))


def available_mb() -> float | None:
    """Memory the system can give without swapping (/proc/meminfo's MemAvailable), or the cgroup's headroom
    (cgroup v2 memory.max - memory.current) where that is less; None off Linux."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in meminfo.splitlines() if ":" in line)
    if "MemAvailable" not in fields:  # kernels before 3.14
        return None
    available = int(fields["MemAvailable"].split()[0]) / 2**10
    cgroup = Path("/sys/fs/cgroup")
    try:
        ceiling = (cgroup / "memory.max").read_text().strip()
        if ceiling != "max":
            available = min(available, (int(ceiling) - int((cgroup / "memory.current").read_text())) / 2**20)
    except (OSError, ValueError):
        pass  # no cgroup v2 memory controller here
    return available


def _release(libc: ctypes.CDLL) -> None:
    """Every buffer over 1 MiB its own mapping, unmapped when freed; the heap's free top trimmed past glibc's
    default."""
    libc.mallopt(M_MMAP_THRESHOLD, RELEASE_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, RELEASE_TRIM_THRESHOLD)
    libc.mallopt(M_TOP_PAD, RELEASE_TOP_PAD)


def _after(libc: ctypes.CDLL) -> None:
    """glibc's thresholds as its own adjustment leaves them after a 32 MiB block is freed; the heap trimmed."""
    libc.mallopt(M_MMAP_THRESHOLD, KEPT_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, AFTER_TRIM_THRESHOLD)
    libc.mallopt(M_TOP_PAD, AFTER_TOP_PAD)
    libc.malloc_trim(0)
