"""Benchmark settings, constants, machine description and timing statistics."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from mvit_det.models.fastpath import cpu_info
from mvit_det.utils.malloc import allocator_settings
from .references import reference_version

ROOT = Path(__file__).resolve().parents[1]  # the repository
CONFIGS = ROOT / "configs"

OURS = "mvit-det"
TASKS = ("cls", "det-backbone", "det-model", "det-train")
SIZE_NAMES = {"T": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_BATCH = {"cls": 8, "det-backbone": 1, "det-model": 1, "det-train": 2}
DEFAULT_SIZE = {"cls": (224, 224), "det-backbone": (1024, 1024), "det-model": (800, 1088), "det-train": (1024, 1024)}
SCALING_SIZES = (224, 384, 512, 768, 1024)
#: fp32 outputs of every reference must agree with ours to this max relative difference
NUMERICS_TOL = 1e-4
#: a model's step times are flagged as noisy above this coefficient of variation ...
NOISE_MAX_CV = 0.10
#: ... or above this p90 / p50 ratio
NOISE_MAX_SPREAD = 1.25


# =============================================================================================
# Settings and small utilities
# =============================================================================================
@dataclass(frozen=True)
class Settings:
    """One benchmark configuration (one table)."""

    task: str = "cls"
    size: str = "T"  # T/S/B/L/H
    batch_size: int = 8
    img_size: tuple[int, int] = (224, 224)
    dtype: str = "fp32"
    compile: bool = False
    device: str = "cpu"
    threads: Optional[int] = 2
    warmup: int = 2
    iters: int = 10
    act_checkpoint: bool = False
    #: LazyConfig overrides of the detector (det-model, det-train), e.g. "model.roi_heads.batch_size_per_image=128"
    opts: tuple[str, ...] = ()

    @property
    def size_name(self) -> str:
        return SIZE_NAMES[self.size]

    @property
    def title(self) -> str:
        what = {
            "cls": "classification",
            "det-backbone": "detection backbone",
            "det-model": "Mask R-CNN inference",
            "det-train": "Mask R-CNN training step",
        }[self.task]
        h, w = self.img_size
        mode = "torch.compile" if self.compile else "eager"
        threads = f", {self.threads} threads" if self.device == "cpu" else ""
        return (
            f"MViTv2-{self.size} {what}, batch {self.batch_size}, {h}x{w}, {self.dtype}, {mode}, "
            f"{self.device}{threads}"
        )


def percentile(times: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(times, dtype=np.float64), q))


def noise_warning(
    times: Sequence[float], max_cv: float = NOISE_MAX_CV, max_spread: float = NOISE_MAX_SPREAD
) -> Optional[str]:
    """A message if a model's step times vary too much to trust the comparison, else None.

    Flags a coefficient of variation (std / mean) above ``max_cv`` or a p90 / p50 ratio above
    ``max_spread``. Fewer than 3 samples carry no spread information and are never flagged.
    """
    if len(times) < 3:
        return None
    t = np.asarray(times, dtype=np.float64)
    cv = float(t.std() / t.mean())
    spread = percentile(t, 90) / percentile(t, 50)
    problems = []
    if cv > max_cv:
        problems.append(f"coefficient of variation {cv:.2f} > {max_cv:.2f}")
    if spread > max_spread:
        problems.append(f"p90/p50 {spread:.2f} > {max_spread:.2f}")
    if not problems:
        return None
    return "noisy timings (" + ", ".join(problems) + "): other processes are probably competing for the machine"


def load_warning(threads: Optional[int]) -> Optional[str]:
    """A message if the 1-minute load average says other processes already occupy the cores we need."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cpus = os.cpu_count() or 1
    free = cpus - load
    need = threads or cpus
    if free < need - 0.5:
        return (
            f"load average {load:.2f} on {cpus} CPUs before the benchmark started: fewer than the {need} "
            "cores this run uses are idle, so absolute timings are inflated (ratios are less affected)"
        )
    return None


def isa_cap_warning(hw: dict[str, Any]) -> Optional[str]:
    """A message if oneDNN/ATen are capped to AVX2 on an AVX-512 CPU but MKL is not.

    ``torch.mm`` and the references' ``F.linear`` run MKL, which ignores ``ONEDNN_MAX_CPU_ISA``: on an Intel Xeon
    it keeps its AVX-512 kernels (140 against 74 GFLOP/s on one core), so such a run is no AVX2 stand-in.
    """
    capped = hw.get("onednn_max_cpu_isa", "").upper().startswith("AVX2") or hw.get("torch_cpu_capability") == "AVX2"
    if hw.get("cpu_isa") in ("AVX-512", "AMX") and capped and not hw.get("mkl_enable_instructions"):
        return (
            "oneDNN/ATen are capped to AVX2 but MKL is not: the fp32 GEMM rate and the references' linear layers "
            "may run MKL's AVX-512 kernels; set MKL_ENABLE_INSTRUCTIONS=AVX2 as well for an AVX2 stand-in"
        )
    return None


def _git_commit() -> Optional[str]:
    try:
        run = dict(cwd=ROOT, capture_output=True, text=True, timeout=10)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run)
        dirty = subprocess.run(["git", "status", "--porcelain"], **run)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def gemm_gflops(device: str, n: int = 2048, repeats: int = 7) -> float:
    """Median GFLOP/s of an fp32 (n x n) @ (n x n) ``torch.mm`` (2 n^3 FLOPs): what this machine can do."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    times = []
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call warms up
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / float(np.median(times)) / 1e9


def hardware_info(device: str) -> dict[str, Any]:
    """Machine, library versions and date, stored with every result."""
    cpu = cpu_info()
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        **{k: v for k, v in cpu.items() if k not in ("torch", "threads")},
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu["cpu_model"],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device == "cuda" else None,
        "mvit_det_commit": _git_commit(),
        "malloc": allocator_settings(),
    }
    for lib in ("timm", "mmpretrain", "detectron2", "fvcore"):
        info[lib] = reference_version(lib)
    return info
