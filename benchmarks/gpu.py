"""The GPU benchmark plan: every row of the README's GPU table in one run, within a time budget.

``python -m benchmarks.gpu OUT_DIR`` runs each row with ``run_report`` (ours and the installed references,
interleaved in one process, numerics checked), and writes ``gpu.json`` and ``gpu.md`` into ``OUT_DIR`` after
every row, so a run cut short keeps what it measured. ``--dry-run`` runs the same rows on the CPU at toy sizes,
one timed round each, with ``torch.compile(backend="eager")`` (dynamo's tracing and graph-break count without
code generation), to prove the plan before GPU minutes are spent on it. ``scripts/gpu_bench.sh`` wraps it.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from mvit_det.utils.atomic import atomic_open

from .report import report_markdown, run_report
from .settings import Settings

#: (task, model size, batch, input size, dtype, compile) per row; fp32 means TF32 on a GPU.
ROWS: tuple[tuple[str, str, int, tuple[int, int], str, bool], ...] = (
    *(
        row
        for size in ("T", "B")
        for row in (
            ("cls", size, 256, (224, 224), "bf16", True),
            ("cls", size, 256, (224, 224), "bf16", False),
            ("cls", size, 256, (224, 224), "fp16", False),
            ("cls", size, 256, (224, 224), "fp32", False),
            ("cls", size, 64, (224, 224), "bf16", False),
        )
    ),
    ("det-backbone", "T", 8, (1024, 1024), "bf16", True),
    ("det-backbone", "T", 8, (1024, 1024), "bf16", False),
    ("det-backbone", "B", 8, (1024, 1024), "bf16", True),
    ("det-backbone", "B", 8, (1024, 1024), "bf16", False),
    ("det-model", "T", 8, (800, 1333), "bf16", False),
    ("det-train", "T", 8, (1024, 1024), "bf16", False),
)
#: what --dry-run shrinks each task to (CPU, seconds per row)
DRY_SIZE = {"cls": (64, 64), "det-backbone": (96, 96), "det-model": (96, 128), "det-train": (96, 96)}
DETECTOR_HEADS = (  # whole-detector rows: the configs' own head sizes on a GPU; cut down for --dry-run
    "model.proposal_generator.post_nms_topk=[50,50]",
    "model.roi_heads.batch_size_per_image=32",
)


def plan(dry_run: bool, iters: int, warmup: int) -> list[Settings]:
    out = []
    for task, size, batch, img_size, dtype, compiled in ROWS:
        s = Settings(task=task, size=size, batch_size=batch, img_size=img_size, dtype=dtype, compile=compiled,
                     device="cuda", threads=None, warmup=warmup, iters=iters)
        if dry_run:
            s = replace(s, device="cpu", threads=2, batch_size=min(batch, 2), img_size=DRY_SIZE[task], warmup=0,
                        iters=1, dtype="bf16" if dtype == "fp16" else dtype,
                        opts=DETECTOR_HEADS if task in ("det-model", "det-train") else ())
        out.append(s)
    return out


def run(out_dir: Path, dry_run: bool = False, budget_s: Optional[float] = None, iters: int = 10, warmup: int = 3,
        rows: Optional[Sequence[int]] = None) -> dict:
    """Run the plan; stop starting new rows once ``budget_s`` is spent (the rest are listed as not run).

    ``budget_s`` defaults to 480 s on a GPU (the plan must fit 8 minutes) and to no limit for ``dry_run``.
    """
    if budget_s is None:
        budget_s = float("inf") if dry_run else 480.0
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device (torch.cuda.is_available() is False); use --dry-run on a CPU.")
    if dry_run:
        os.environ["MVIT_BENCH_COMPILE_BACKEND"] = "eager"
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = plan(dry_run, iters, warmup)
    chosen = range(len(settings)) if rows is None else rows
    start = time.monotonic()
    report: dict = {"dry_run": dry_run, "runs": [], "not_run": [], "hardware": None}
    for i in chosen:
        s = settings[i]
        if time.monotonic() - start > budget_s:
            report["not_run"].append({"row": i, "title": s.title, "reason": f"time budget {budget_s:g} s spent"})
            continue
        print(f"[gpu-bench] row {i + 1}/{len(settings)}: {s.title}", flush=True)
        one = run_report([s])
        report["hardware"] = one["hardware"]
        report["runs"] += one["runs"]
        report["elapsed_s"] = time.monotonic() - start
        _write(out_dir, report)
    return report


def _write(out_dir: Path, report: dict) -> None:
    md = report_markdown({**report, "mode": "single", "load_warning": None, "noisy": False})
    md += "".join(f"- not run: {r['title']} ({r['reason']})\n" for r in report["not_run"])
    with atomic_open(out_dir / "gpu.json", "w") as f:
        json.dump(report, f, indent=2, default=str)
    with atomic_open(out_dir / "gpu.md", "w") as f:
        f.write(md)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--dry-run", action="store_true", help="every row on the CPU at toy sizes, one round each")
    p.add_argument("--budget-s", type=float, help="start no new row after this many seconds (GPU default 480)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rows", type=lambda t: [int(x) for x in t.split(",")], help="comma-separated row indexes")
    args = p.parse_args(argv)
    return run(args.out_dir, args.dry_run, args.budget_s, args.iters, args.warmup, args.rows)


if __name__ == "__main__":
    main()
