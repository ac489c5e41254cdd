"""The JSON report and its Markdown tables."""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import torch

from .runner import run_benchmark
from .settings import OURS, Settings, gemm_gflops, hardware_info, isa_cap_warning, load_warning


# =============================================================================================
# Reports
# =============================================================================================
def _fmt(x: Optional[float], spec: str) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def _version(name: str, hw: dict[str, Any]) -> str:
    lib = name.split("+")[0]
    if lib == OURS:
        return f"{name} (ours)"
    v = hw.get(lib)
    return f"{name} {v}" if v else name


def model_gflops_per_s(run: dict[str, Any], row: dict[str, Any]) -> Optional[float]:
    """GFLOP/s a model of ``run`` reached: the same network whoever implements it, so ours' count (2 FLOPs per
    multiply-accumulate) divided by that model's time; None where the run could not count them."""
    gf = run["gflops_per_image"]
    return None if gf is None else 2 * gf * row["images_per_s"]


def run_markdown(run: dict[str, Any], hw: dict[str, Any]) -> str:
    dtype = run["settings"]["dtype"]
    diff_cols = ["max rel diff fp32"] + ([f"max rel diff {dtype}"] if dtype != "fp32" else [])
    head = ["implementation", "img/s", "p50 ms", "p90 ms", "p99 ms", "peak mem MB", *diff_cols, "speed-up of ours",
            "GFLOP/s (% of fp32 mm)"]
    compiled = run["settings"]["compile"]
    if compiled:
        head.append("graph breaks")
    gemm = hw.get("gemm_fp32_gflops")
    fresh = run.get("fresh_process_memory")
    if fresh:
        head.insert(6, "fresh-process peak MB")
    lines = [f"### {run['title']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in run["models"]:
        diffs = m["max_rel_diff"] or {}
        cells = [
            _version(m["name"], hw),
            _fmt(m["images_per_s"], ".3g"),
            _fmt(m["latency_ms"]["p50"], ".1f"),
            _fmt(m["latency_ms"]["p90"], ".1f"),
            _fmt(m["latency_ms"]["p99"], ".1f"),
            _fmt(m["peak_memory_mb"], ".0f"),
        ]
        if fresh:
            cells.append(_fmt(fresh.get(m["name"]), ".0f"))
        cells += [_fmt(diffs.get(d), ".1e") for d in (["fp32"] + ([dtype] if dtype != "fp32" else []))]
        cells.append("1.00 (ref.)" if m["name"] == OURS else f"{m['ours_speedup']:.2f}x")
        rate = model_gflops_per_s(run, m)
        share = f" ({100 * rate / gemm:.0f}%)" if rate is not None and gemm else ""
        cells.append(_fmt(rate, ".3g") + share)
        if compiled:
            cells.append(str(m.get("graph_breaks", "–")))
        lines.append("| " + " | ".join(cells) + " |")
    gf = run["gflops_per_image"]
    lines += [
        "",
        f"GFLOPs per image (ours): {_fmt(gf, '.2f')} ({run['flops_note']}). "
        f"Speed-up of ours = reference p50 / ours p50; img/s from p50. Peak memory: {run['memory_kind']}.",
    ]
    if fresh:
        lines.append("Fresh-process peak: extra peak RSS of two training steps, each variant alone in a new process.")
    for sk in run["skipped"]:
        lines.append(f"- skipped {sk['name']}: {sk['reason']}")
    for w in run["warnings"]:
        lines.append(f"- **warning**: {w}")
    return "\n".join(lines)


def scaling_markdown(runs: list[dict[str, Any]]) -> str:
    """One table per task: time and FLOPs per input size, ours vs each reference."""
    out = []
    for task in ("cls", "det-backbone"):
        task_runs = [r for r in runs if r["task"] == task]
        if not task_runs:
            continue
        names = [m["name"] for m in task_runs[0]["models"]]
        refs = names[1:]
        s0 = task_runs[0]["settings"]
        head = ["input", "GFLOPs/img", f"{OURS} ms"]
        for r in refs:
            head += [f"{r} ms", f"{r} / ours"]
        head.append("max rel diff fp32")
        what = "classification" if task == "cls" else "detection backbone"
        mode = "torch.compile" if s0["compile"] else "eager"
        where = f"cpu, {s0['threads']} threads" if s0["device"] == "cpu" else s0["device"]
        out += [
            f"### MViTv2-{s0['size']} {what}: time (p50 per batch of {s0['batch_size']}) and FLOPs vs input size "
            f"({s0['dtype']}, {mode}, {where})",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for run in task_runs:
            by_name = {m["name"]: m for m in run["models"]}
            h, w = run["settings"]["img_size"]
            cells = [f"{h}x{w}", _fmt(run["gflops_per_image"], ".1f"), _fmt(by_name[OURS]["latency_ms"]["p50"], ".1f")]
            worst = 0.0
            for r in refs:
                m = by_name.get(r)
                cells += [_fmt(m and m["latency_ms"]["p50"], ".1f"), f"{m['ours_speedup']:.2f}x" if m else "–"]
                if m and m["max_rel_diff"]:
                    worst = max(worst, m["max_rel_diff"]["fp32"])
            cells.append(_fmt(worst, ".1e") if refs else "–")
            out.append("| " + " | ".join(cells) + " |")
        notes = [f"- skipped {sk['name']}: {sk['reason']}" for sk in task_runs[0]["skipped"]]
        out += ([""] + notes if notes else []) + [""]
    return "\n".join(out).rstrip()


def cpu_line(hw: dict[str, Any]) -> str:
    """The CPU, its vector ISA, the kernels torch runs (and the caps that chose them), native bf16 or not."""
    return (
        f"CPU {hw['cpu_model']}: {hw['cpu_isa']}, torch kernels {hw['torch_cpu_capability']}"
        + (f" (ONEDNN_MAX_CPU_ISA={hw['onednn_max_cpu_isa']})" if hw.get("onednn_max_cpu_isa") else "")
        + (f", MKL_ENABLE_INSTRUCTIONS={hw['mkl_enable_instructions']}" if hw.get("mkl_enable_instructions") else "")
        + f", native bf16 {'yes' if hw['native_bf16'] else 'no'}"
    )


def report_markdown(report: dict[str, Any]) -> str:
    hw = report["hardware"]
    lines = [
        f"## MViTv2 benchmark ({hw['date']})",
        "",
        f"{hw['device_name']} ({hw['cpu_count']} CPUs, {hw['torch_threads']} torch threads), torch {hw['torch']}, "
        f"python {hw['python']}, mvit-det {hw['mvit_det_commit'] or 'unknown commit'}, malloc: "
        f"{hw.get('malloc', 'not recorded')}",
        "",
        cpu_line(hw) + f"; fp32 2048x2048 torch.mm {_fmt(hw.get('gemm_fp32_gflops'), '.0f')} GFLOP/s "
        f"({hw['device']}).",
        "",
    ]
    if report["mode"] == "scaling":
        lines.append(scaling_markdown(report["runs"]))
    else:
        lines += [run_markdown(r, hw) for r in report["runs"]]
    for key in ("load_warning", "isa_cap_warning"):
        if report.get(key):
            lines.append(f"- **warning**: {report[key]}")
    if report["noisy"]:
        lines.append(
            "\n**The machine was noisy during this run; repeat it on an idle machine before quoting numbers.**"
        )
    return "\n".join(lines) + "\n"


def run_report(settings: Sequence[Settings], mode: str = "single") -> dict[str, Any]:
    """Run every configuration and assemble the JSON report (hardware, runs, warnings)."""
    s0 = settings[0]
    early = load_warning(s0.threads if s0.device == "cpu" else None)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if s0.device == "cpu" and s0.threads:
        torch.set_num_threads(s0.threads)
    if s0.device == "cuda":  # "fp32" on a GPU means TF32 matmuls and convolutions, as timm and detectron2 train
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    gemm = gemm_gflops(s0.device)
    runs, count_flops = [], []
    for i, s in enumerate(settings):
        desc = f"[{i + 1}/{len(settings)}] {s.task} {s.img_size[0]}x{s.img_size[1]}" if len(settings) > 1 else s.task
        runs.append(run_benchmark(s, desc, count_flops))
    for fill_in in count_flops:  # after every timing (see run_benchmark)
        fill_in()
    hardware = {**hardware_info(s0.device), "gemm_fp32_gflops": gemm, "load_average_1min_before": load_before}
    partial_cap = isa_cap_warning(hardware) if s0.device == "cpu" else None
    warnings = [w for w in (early, partial_cap) if w]
    warnings += [f"{r['task']} {r['settings']['img_size']}: {w}" for r in runs for w in r["warnings"]]
    return {
        "mode": mode,
        "hardware": hardware,
        "runs": runs,
        "load_warning": early,
        "isa_cap_warning": partial_cap,
        "warnings": warnings,
        # Measured spread only: the load average also counts this script's own previous runs.
        "noisy": any(m["noise_warning"] for r in runs for m in r["models"]),
    }
