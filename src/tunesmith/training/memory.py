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

`released_freed_memory` (`train.release_memory`) does the opposite: every buffer over 1 MiB is its own mapping,
given back to the system the moment the tensor is freed, so resident memory tracks the live tensors (heap
fragmentation otherwise lets it climb micro-batch after micro-batch) at the cost of a page fault per page of every
new buffer: peak RSS -38% (5,101 -> 3,225 MB for the SFT job, 4,885 -> 3,000 MB for DPO) at 15-20% fewer
tokens/s, measured on a 2-core CPU.

`freed_memory(release)` is the one a CPU training run enters, around the whole run: loading, the evaluation before
training, caching the reference, the steps and the export. Both leave the process, when they end, with the
thresholds glibc's own adjustment reaches once a 32 MiB block has been freed, and its heap trimmed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

RELEASE_MMAP_THRESHOLD = 1 << 20
KEPT_MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit), the most its adjustment reaches
KEPT_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: the heap's free top is never given back while training
KEPT_TOP_PAD = 64 << 20  # the heap grows in 64 MiB steps, not one system call per new buffer
# After training: the thresholds glibc's own adjustment reaches once a 32 MiB block has been freed, and no pad.
AFTER_TRIM_THRESHOLD = 2 * KEPT_MMAP_THRESHOLD
AFTER_TOP_PAD = 0


def _glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc (it has mallopt and malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None  # musl has neither


@contextmanager
def released_freed_memory() -> Iterator[bool]:
    """glibc gives every buffer over 1 MiB back to the system as soon as it is freed, while the block runs; after
    it, as `kept_freed_memory` leaves things. Yields False (and changes nothing) where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        yield False
        return
    libc.mallopt(M_MMAP_THRESHOLD, RELEASE_MMAP_THRESHOLD)
    try:
        yield True
    finally:
        _after(libc)


@contextmanager
def kept_freed_memory() -> Iterator[bool]:
    """glibc keeps freed buffers (up to 32 MiB each) in the process for reuse while the block runs. After it the
    mmap threshold stays at 32 MiB, where glibc's own adjustment ends, with the trim threshold that goes with it,
    and the heap's free memory is trimmed. Yields False (and changes nothing) where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        yield False
        return
    libc.mallopt(M_MMAP_THRESHOLD, KEPT_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, KEPT_TRIM_THRESHOLD)
    libc.mallopt(M_TOP_PAD, KEPT_TOP_PAD)
    try:
        yield True
    finally:
        _after(libc)


def freed_memory(release: bool) -> AbstractContextManager[bool]:
    """A CPU training run's policy for freed buffers: given back at once (`train.release_memory`) or kept."""
    return released_freed_memory() if release else kept_freed_memory()


def _after(libc: ctypes.CDLL) -> None:
    """glibc's thresholds as its own adjustment leaves them after a 32 MiB block is freed; the heap trimmed."""
    libc.mallopt(M_MMAP_THRESHOLD, KEPT_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, AFTER_TRIM_THRESHOLD)
    libc.mallopt(M_TOP_PAD, AFTER_TOP_PAD)
    libc.malloc_trim(0)
