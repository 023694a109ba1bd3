"""Keep freed memory in the process (glibc), so that large arrays are not faulted in afresh every step.

A training step frees and allocates the same multi-megabyte activations and gradients every time.
glibc's malloc hands memory from 128 KiB up to a threshold that it raises as arrays are freed, and
it returns the free top of its heap to the operating system once that exceeds twice the threshold;
with BatchNorm between the layers enough large arrays are alive at once that it does so every step,
and the next step's arrays come from fresh pages that the kernel faults in and zeroes again:
about 2,600 page faults per step for ``examples/default-bn.toml`` at batch 64 in a bare training
loop, 4-26% of its step time on a 2-core VM (docs/performance.md has the figures).

:func:`keep_freed_memory` fixes both thresholds once per process: arrays up to 32 MiB come from the
heap, and the heap is never trimmed, so freed memory is reused. Resident memory then stays near the
process's peak instead of shrinking between steps. PyTorch's documentation recommends jemalloc or
tcmalloc for the same reason; this needs neither. Set ``CNN_BACKEND_KEEP_FREED_MEMORY=0`` to leave
malloc as it is; settings already given through glibc's own ``MALLOC_*_`` variables are respected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

KEEP_FREED_MEMORY_ENV = "CNN_BACKEND_KEEP_FREED_MEMORY"
#: glibc's ``mallopt`` parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: the largest mmap threshold glibc accepts on 64-bit systems (half its heap size): larger arrays
#: still get their own mapping, returned to the system when freed
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
#: free memory at the top of the heap kept rather than returned (above any step's working set)
TRIM_THRESHOLD_BYTES = 1 << 30
#: glibc's own variables for the same settings: when either is set, the user has chosen
GLIBC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Fix glibc's thresholds as the module says, once per process; True when they are in force.

    Does nothing (False) off glibc, when ``CNN_BACKEND_KEEP_FREED_MEMORY=0`` (or false, no, off), or when one of
    glibc's ``MALLOC_*_THRESHOLD_`` variables is set.
    """
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def requested_by_environment() -> bool:
    """Whether ``$CNN_BACKEND_KEEP_FREED_MEMORY`` leaves the thresholds on (unset: on); ValueError,
    one line, for a value that is neither on (1, true, yes, on) nor off (0, false, no, off)."""
    text = os.environ.get(KEEP_FREED_MEMORY_ENV, "").strip()
    if text.lower() in ("", "1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(
        f"{KEEP_FREED_MEMORY_ENV}={text!r} is neither on nor off; set it to 0 (leave glibc's malloc as it is) or 1, or unset it"
    )


def _apply() -> bool:
    if not requested_by_environment() or any(name in os.environ for name in GLIBC_VARIABLES):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # The mmap threshold first: setting either one turns glibc's own adjustment of both off.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
