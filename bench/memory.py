"""Memory: measuring an edit's or a fit's peak (CUDA's allocator, else the process's resident high-water mark)
and keeping the CPU allocator from handing freed memory back between steps (glibc tuning)."""

from __future__ import annotations

import ctypes
import gc
import logging
import re
import resource
import time
from typing import Any

import torch

log = logging.getLogger(__name__)


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+)", f.read(), re.M)
    return int(m.group(1)) if m else 0


def _libc() -> Any:
    """glibc, or None where the C library is another (macOS, musl): its heap calls are then skipped."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _trim_heap() -> None:
    """Return freed memory to the OS (glibc) so the next allocations show up in the resident set."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


#: glibc's ``mallopt`` parameters (malloc.h) and the values :func:`keep_freed_memory` gives them: serve requests up
#: to 32 MiB (the most glibc accepts) from its heap instead of a fresh mmap each, never serve one by mmap while the
#: heap can grow (larger blocks: SmolLM2's 113 MB embedding gradient, ENN's at every step), and hand free memory at
#: the heap's top back to the OS only above 2 GiB (the most an ``int`` holds) instead of 2x the largest freed block.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4


MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES = 32 * 2**20, 2**31 - 1


#: Environment of a process whose work runs outside its main thread (a Tune trial runs in a ``RunnerThread`` of its
#: Ray worker): with one malloc arena every thread allocates from the main heap, the one :func:`keep_freed_memory`
#: keeps. glibc reads it at process start, so it is given to the Ray workers' environment (``bench.run``).
ONE_ARENA_ENV = {"MALLOC_ARENA_MAX": "1"}


def keep_freed_memory() -> bool:
    """Make glibc reuse freed memory instead of returning it to the OS after every training step or edit.

    With glibc's defaults a process that frees and allocates gigabytes per step (ENN's dense gradients of every
    base weight, each edit's deltas) gets its pages back from the kernel each time, zero-filled on first touch:
    measured on SmolLM2-135M at one thread, 435k page faults and 1.5 s of the 4.6 s of an ENN training step in the
    kernel (MEND 0.08 s of 1.1 s, KE 0.22 of 1.3 s); with this setting 0.4-0.7 s (ENN), 0.00 (MEND), 0.05 (KE).
    Training steps, each setting in its own process, alternated: ENN 6.7 / 6.4 s -> 4.9 / 5.0 s, MEND 2.6 / 3.7 /
    3.1 s -> 2.3 / 2.1 / 2.3 s, KE 2.0 / 2.1 s -> 1.8 / 1.9 s; FT's evaluation unchanged (PeakMemory trims the heap
    before every edit). Blocks above 32 MiB come from the heap too (``M_MMAP_MAX`` 0; glibc still maps one when
    the heap cannot grow): a fresh 113 MB ``torch.zeros`` took 66 ms mapped, 7.5 ms from the heap; ENN steps
    2.38 -> 2.03 s, KE 0.80 -> 0.74 s, MEND unchanged (2026-12-06, one thread, alternated processes).

    The settings only reach the main heap: a thread with an arena of its own (a Tune trial's ``RunnerThread``)
    still maps and faults in every large block (ENN 3.4 s per step there; 2.1 s with :data:`ONE_ARENA_ENV` in the
    process's environment at start, KE 0.87 -> 0.73 s). Values are bit-identical: only where memory comes from
    changes. Memory measurements keep their meaning: :class:`PeakMemory` trims the heap before it resets the
    high-water mark. Applies to the whole process, from the call on; returns False (and changes nothing) where the
    C library is not glibc.
    """
    libc = _libc()
    if libc is None:
        return False
    ok = (bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
          and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) and bool(libc.mallopt(M_MMAP_MAX, 0)))
    if not ok:
        log.debug("mallopt refused the heap settings; glibc's defaults stay")
    return ok


class PeakMemory:
    """Context manager measuring peak memory in MB above the level at entry.

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak. CPU: the process's resident high-water
    mark (VmHWM), reset at entry by writing 5 to /proc/self/clear_refs (Linux >= 4.0), after handing freed heap
    pages back to the OS (``malloc_trim``) so that reused memory counts too; where the reset is not possible
    it falls back to ``ru_maxrss`` and the value is an upper bound (``exact`` is False).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.cuda = torch.device(device).type == "cuda" if device is not None else False
        self.mb = 0.0
        self.exact = True

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        _trim_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _proc_status_kb("VmRSS") * 1024
        except OSError:
            self.exact = False
            self.base = _proc_status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.exact:
            peak = _proc_status_kb("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.mb = max(0.0, (peak - self.base) / 2**20)
