"""glibc malloc settings for a CPU training process: keep freed blocks for the next step instead of page-faulting
them in anew.

A training step frees and reallocates the same large tensors (gradients set to None, activations). glibc serves a
block above its mmap threshold (dynamic, at most 32 MB) with a fresh mmap, and returns the top of its heap to the
system once more than twice that threshold is free there, so the next step page-faults those pages in again. Measured
on the digits pre-training of ``make demo`` (MViTv2-T, batch 32 at 32x32, one thread on the AVX2 stand-in): 3.6-17.9
thousand page faults and 6-28 ms of system time per step, against 39 faults and none with these settings. The price:
up to ``trim`` bytes of freed memory stay with the process instead of going back to the system.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["allocator_settings", "keep_freed_memory"]

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX); larger blocks are always mmapped
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
# the caller's own allocator settings win
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_",
                  "GLIBC_TUNABLES", "LD_PRELOAD")


def _set_by_user(environ) -> dict[str, str]:
    return {name: environ[name] for name in _USER_SETTINGS if environ.get(name)}


def allocator_settings(environ=os.environ) -> str:
    """The allocator settings of this process's environment, for a benchmark's header: timings of large tensors
    depend on them (a block glibc maps afresh page-faults in on first touch; a reused one does not)."""
    set_by_user = _set_by_user(environ)
    if set_by_user:
        return ", ".join(f"{name}={value}" for name, value in set_by_user.items())
    return "glibc's defaults" if sys.platform.startswith("linux") else "the system's defaults"


def keep_freed_memory(mmap: int = MMAP_THRESHOLD, trim: int = TRIM_THRESHOLD, environ=os.environ) -> str:
    """Fix glibc's mmap threshold at ``mmap`` bytes and its trim threshold at ``trim`` bytes for this process; return
    what was done, as one line for the log. Left alone where the caller set allocator variables or preloaded another
    allocator (``LD_PRELOAD``), and off glibc."""
    set_by_user = _set_by_user(environ)
    if set_by_user:
        return f"malloc: left to the caller ({', '.join(set_by_user)} set)"
    if not sys.platform.startswith("linux"):
        return f"malloc: the system's defaults ({sys.platform} has no glibc)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "malloc: the system's defaults (no glibc mallopt)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # The mmap threshold first: a fixed trim threshold alone also fixes the mmap threshold at its 128 kB default.
    if not (mallopt(_M_MMAP_THRESHOLD, mmap) and mallopt(_M_TRIM_THRESHOLD, trim)):
        return "malloc: the system's defaults (mallopt refused the thresholds)"
    return f"malloc: freed blocks up to {mmap >> 20} MB are reused, up to {trim >> 20} MB of free heap is kept"
