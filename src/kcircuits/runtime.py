"""Process-wide tuning of the C runtime for kcircuits' CPU workloads.

glibc's ``malloc`` serves every block above its mmap threshold (128 kB, growing adaptively to at most
32 MB) with a fresh ``mmap`` and returns it with ``munmap`` on free, and it gives the top of the heap
back to the system once more than twice that threshold is free. Torch allocates a new output tensor for
nearly every operation, so a loop over a model's parameters (one or a few MB each) pays page faults on
every op: on the 2-core test machine, a sigmoid over SmolLM2-135M's 106M block weights took 135 ms with
the defaults and 49 ms with the blocks kept for reuse (docs/benchmarks.md, weight masks). :func:`tune_allocator`
raises the thresholds once per process (the same as ``MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_TOP_PAD_=536870912`` in the environment): freed memory stays in
the process for the next op (the resident size does not shrink after a peak). A variable the user set wins;
on another C library it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["tune_allocator"]

# mallopt parameter numbers (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_SETTINGS = ((_M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", 32 << 20),
             (_M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", (2 << 30) - 1),
             (_M_TOP_PAD, "MALLOC_TOP_PAD_", 512 << 20))
_done = False


def tune_allocator() -> bool:
    """Keep freed blocks up to 32 MB in the process for reuse (see the module docstring); once per process.

    Returns whether glibc's ``mallopt`` was found and accepted the settings.
    """
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    ok = True
    for param, env, value in _SETTINGS:
        if env not in os.environ:
            ok = bool(mallopt(ctypes.c_int(param), ctypes.c_int(value))) and ok
    _done = ok
    return ok
