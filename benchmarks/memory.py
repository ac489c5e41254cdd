"""Peak memory of one step: CUDA allocator peaks, or the CPU process's VmHWM above its resident set."""
from __future__ import annotations

import ctypes
import gc
from pathlib import Path
from typing import Any, Callable, Optional

import torch


# =============================================================================================
# Peak memory
# =============================================================================================
def _proc_status_bytes(key: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _release_free_heap() -> None:
    """Return freed heap pages to the OS, so an earlier model's freed memory cannot hide this one's peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def memory_kind(device: str) -> str:
    if device == "cuda":
        return "cuda max_memory_allocated above the bytes allocated before the step"
    return "peak RSS (VmHWM) above the RSS before the step"


def measure_peak_memory(fn: Callable[[], Any], device: str) -> Optional[float]:
    """Extra bytes that one call of ``fn`` needs at its peak (see the module docstring), or None."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    _release_free_heap()
    if not _reset_peak_rss():
        return None
    base = _proc_status_bytes("VmRSS:")
    fn()
    peak = _proc_status_bytes("VmHWM:")
    if base is None or peak is None:
        return None
    return float(peak - base)
