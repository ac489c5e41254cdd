"""Run contenders round-robin in one process, check their numerics, and probe memory in fresh processes."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .memory import _proc_status_bytes, _release_free_heap, _reset_peak_rss, measure_peak_memory, memory_kind
from .references import ReferenceUnavailable, max_rel_diff, randomize_
from .settings import NUMERICS_TOL, OURS, Settings, noise_warning, percentile
from .workloads import WORKLOADS, Workload


# =============================================================================================
# The benchmark
# =============================================================================================
@dataclass
class Contender:
    name: str
    model: nn.Module
    step: Optional[Callable[[], Any]] = None


def time_round_robin(
    steps: dict[str, Callable[[], Any]], warmup: int, iters: int, device: str, desc: str = ""
) -> dict[str, list[float]]:
    """Run ``warmup + iters`` rounds; each round runs every step once, in order. Returns the seconds of the
    last ``iters`` rounds per name."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in steps}
    total = (warmup + iters) * len(steps)
    with tqdm(total=total, desc=desc or "benchmark", unit="step", file=sys.stderr, leave=False) as bar:
        for r in range(warmup + iters):
            for name, step in steps.items():
                bar.set_postfix_str(f"{'warm-up' if r < warmup else 'timed'} {name}")
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                if r >= warmup:
                    times[name].append(time.perf_counter() - t0)
                bar.update()
    return times


def _latency_ms(times: Sequence[float]) -> dict[str, float]:
    t = np.asarray(times, dtype=np.float64) * 1e3
    return {
        "p50": percentile(t, 50),
        "p90": percentile(t, 90),
        "p99": percentile(t, 99),
        "mean": float(t.mean()),
        "min": float(t.min()),
        "cv": float(t.std() / t.mean()) if len(t) > 1 else 0.0,
    }


def build_contenders(wl: Workload, only: Optional[str] = None) -> tuple[list[Contender], list[dict[str, str]]]:
    """Ours (random informative weights), its variants, and every installed reference with ours' weights.

    ``only``: build just that contender (ours is still built, to supply the weights, but not returned).
    """
    torch.manual_seed(0)
    ours = randomize_(wl.build_ours()).to(wl.device)
    ours.train(wl.grad)
    wanted = lambda name: only is None or only == name  # noqa: E731
    contenders = [Contender(OURS, ours)] if wanted(OURS) else []
    contenders += [Contender(n, m) for n, m in wl.variants(ours).items() if wanted(n)]
    skipped = []
    for lib in wl.references:
        builders = {lib: lambda m, lib=lib: wl.build_reference(lib, m), **wl.reference_variants(lib)}
        for name, build in builders.items():
            if not wanted(name):
                continue
            try:
                contenders.append(Contender(name, build(ours).train(wl.grad)))
            except ReferenceUnavailable as e:
                skipped.append({"name": name, "reason": str(e)})
                if name == lib:
                    break  # no library, no variants of it either
    return contenders, skipped


def _count_graph_breaks(step: Callable[[], Any]) -> int:
    """Run ``step`` once (which compiles it) and return the graph breaks torch.compile reported on the way."""
    counters = torch._dynamo.utils.counters
    counters.clear()
    step()
    return int(sum(counters["graph_break"].values()))


def run_benchmark(s: Settings, progress_desc: str = "", count_flops: Optional[list] = None) -> dict[str, Any]:
    """Benchmark one configuration; returns the JSON-ready result (see ``--out-json``). With ``count_flops`` (a list),
    the FLOP count is left to the caller, after its other runs: ``count_flops`` gets the function that fills it in."""
    wl = WORKLOADS[s.task](s)
    contenders, skipped = build_contenders(wl)
    warnings: list[str] = []

    # 1. Numerics, eager, before any training step changes the weights.
    ours = contenders[0]
    numerics: dict[str, dict[str, float]] = {c.name: {} for c in contenders}
    dtypes = ["fp32"] + ([s.dtype] if s.dtype != "fp32" else [])
    for dtype in dtypes:
        ref_out = wl.outputs(ours.model, dtype)
        for c in contenders[1:]:
            numerics[c.name][dtype] = max_rel_diff(ref_out, wl.outputs(c.model, dtype))
    for c in contenders[1:]:
        if not numerics[c.name]["fp32"] < NUMERICS_TOL:
            warnings.append(
                f"numerics: {c.name} differs from {OURS} by {numerics[c.name]['fp32']:.3g} (max relative, fp32) "
                f"> {NUMERICS_TOL:g}"
            )

    # 2. Timing, interleaved.
    graph_breaks: dict[str, Optional[int]] = {}
    for c in contenders:
        if s.compile:
            c.model = wl.compile(c.model)
        c.step = wl.make_step(c.model)
        graph_breaks[c.name] = _count_graph_breaks(c.step) if s.compile else None
    times = time_round_robin({c.name: c.step for c in contenders}, s.warmup, s.iters, s.device, progress_desc)

    # 3. Peak memory of one more step each (not timed).
    memory = {c.name: measure_peak_memory(c.step, s.device) for c in contenders}

    rows = []
    ours_p50 = percentile(times[OURS], 50)
    for c in contenders:
        lat = _latency_ms(times[c.name])
        noisy = noise_warning(times[c.name])
        if noisy:
            warnings.append(f"{c.name}: {noisy}")
        mem = memory[c.name]
        rows.append(
            {
                "name": c.name,
                "images_per_s": wl.images_per_step / (lat["p50"] / 1e3),
                "latency_ms": lat,
                "times_s": times[c.name],
                "peak_memory_mb": None if mem is None else mem / 2**20,
                "ours_speedup": lat["p50"] / (ours_p50 * 1e3),
                "memory_ratio": None if mem is None or not memory[OURS] else mem / memory[OURS],
                "max_rel_diff": numerics[c.name] or None,
                "noise_warning": noisy,
                "graph_breaks": graph_breaks[c.name],
            }
        )
    result = {
        "task": s.task,
        "title": s.title,
        "settings": {**asdict(s), "img_size": list(s.img_size)},
        "images_per_step": wl.images_per_step,
        "gflops_per_image": None,
        "flops_note": "",
        "memory_kind": memory_kind(s.device),
        "numerics_tolerance_fp32": NUMERICS_TOL,
        "models": rows,
        "skipped": skipped,
        "warnings": warnings,
    }
    if s.task == "det-train" and s.act_checkpoint and s.device == "cpu":
        result["fresh_process_memory"] = {
            c.name: fresh_process_peak_rss(s, c.name) for c in contenders
        }

    # 4. FLOPs last: fvcore's jit trace leaves large freed holes in glibc's heap, in which a reference's largest
    # tensors (detectron2's 61-134 MB attention maps at 1024x1024) then fit without page faults. Counted before the
    # timing, it gave detectron2 a warm heap that no user's process has (3.3 s per image against 5-7.6 s fresh,
    # docs/performance.md); a caller with more runs to time counts them after all of its runs.
    def fill_in_flops() -> None:
        flops, result["flops_note"] = wl.flops(ours.model)
        result["gflops_per_image"] = None if flops is None else flops / 1e9

    if count_flops is None:
        fill_in_flops()
    else:
        count_flops.append(fill_in_flops)
    return result


# ---------------------------------------------------------------------------------------------
# Activation-checkpointing memory in fresh processes (CPU)
# ---------------------------------------------------------------------------------------------
def settings_argv(s: Settings) -> list[str]:
    """The arguments of ``tools/benchmark.py`` (``python -m benchmarks``) that run ``s``."""
    h, w = s.img_size
    argv = [
        "--task", s.task, "--size", s.size, "--batch-size", str(s.batch_size), "--img-size", f"{h}x{w}",
        "--dtype", s.dtype, "--device", s.device,
    ]
    if s.threads:
        argv += ["--threads", str(s.threads)]
    argv += ["--warmup", str(s.warmup), "--iters", str(s.iters)]
    if s.act_checkpoint:
        argv.append("--act-checkpoint")
    if s.compile:
        argv.append("--compile")
    if s.opts:
        argv += ["--opts", *s.opts]
    return argv


def fresh_process_peak_rss(s: Settings, name: str) -> Optional[float]:
    """Peak RSS (MB) that two training steps of contender ``name`` add, measured in a new process."""
    cmd = [sys.executable, "-m", "benchmarks", *settings_argv(s), "--memory-probe", name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)["peak_rss_mb"]
    raise RuntimeError(f"memory probe for {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def memory_probe(s: Settings, name: str) -> dict[str, Any]:
    """Child side of ``fresh_process_peak_rss``: build only contender ``name`` and run 2 training steps.

    The peak is VmHWM above the resident set before the steps, after resetting VmHWM through
    /proc/self/clear_refs, so that building the models (ours is built too, for the weights) cannot be what the
    peak records. ``ru_maxrss`` is no substitute: the kernel seeds it at exec with the *parent's* high-water
    mark, so under a large parent process every probe would report the parent's peak.
    """
    wl = WORKLOADS[s.task](s)
    contenders, skipped = build_contenders(wl, only=name)
    if not contenders:
        raise SystemExit(f"memory probe: no contender {name!r} ({skipped})")
    model = wl.compile(contenders[0].model) if s.compile else contenders[0].model
    del contenders
    step = wl.make_step(model)
    _release_free_heap()
    if not _reset_peak_rss():
        raise SystemExit("memory probe: /proc/self/clear_refs is not writable, so the peak cannot be isolated")
    base = _proc_status_bytes("VmRSS:")
    for _ in range(2):  # the second step also holds the AdamW state created by the first
        step()
    peak = _proc_status_bytes("VmHWM:")
    if base is None or peak is None:
        raise SystemExit("memory probe: /proc/self/status has no VmRSS/VmHWM")
    return {"name": name, "peak_rss_mb": (peak - base) / 2**20}
