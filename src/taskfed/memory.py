"""The process's heap, for a training loop that allocates and frees gigabytes of activations per step.

glibc's malloc serves large blocks with mmap, but raises that threshold (up to 32 MiB) each time such a
block is freed, so after the first step the activations of a LoRA step come from the brk heap, where they
fragment: with SmolLM2 and packs of 16 rows x 64 tokens the peak of one pack swings between 2.7 and 3.0 GB
from pack to pack, and a round of many packs keeps its worst one. `TASKFED_MMAP_THRESHOLD=1048576` fixes the
threshold at 1 MiB: every block of at least that size gets its own mapping, returned to the system when
freed, and the same packs peak at 2.27-2.39 GB. The price is a page fault per fresh page: nothing measurable
on those narrow packs, but on packs of 64 rows x 192 tokens training ran at 61 tokens/s against 78-88 with
glibc's own setting, for a peak of 7.4 GB against 11.9 GB (benchmarks/engine.py). Speed is the default;
the variable trades it for memory. Nothing here changes a computed value.

Unset or 0: glibc's own dynamic threshold. Outside glibc both functions do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _mallopt, _malloc_trim = _libc.mallopt, _libc.malloc_trim
except (OSError, AttributeError):
    _mallopt = _malloc_trim = None

_tuned = False


def tune_heap() -> None:
    """Fixes glibc's mmap threshold once per process where TASKFED_MMAP_THRESHOLD asks (module doc)."""
    global _tuned
    if _tuned or _mallopt is None:
        return
    _tuned = True
    threshold = int(os.environ.get("TASKFED_MMAP_THRESHOLD") or 0)
    if threshold > 0:
        _mallopt(M_MMAP_THRESHOLD, threshold)


def release_memory() -> None:
    """glibc's malloc_trim: hands the heap's free pages back, so that a round of many packs does not
    ratchet the process's peak memory up through fragmentation."""
    if _malloc_trim is not None:
        _malloc_trim(0)
