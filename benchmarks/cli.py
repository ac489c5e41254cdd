"""Side-by-side benchmark of mvit-det against the installed reference implementations.

Every run builds our model with random (informative) weights, copies the same weights into each installed
reference (timm and mmpretrain for classification, detectron2 for detection; see
``benchmarks.references``), checks that all of them compute the same outputs on the benchmark inputs,
and then times them **in the same process, interleaved round-robin** (ours, ref 1, ref 2, ours, ...), so
that load from other processes hits every model alike. Per model it reports images/s (from the median
step time), latency p50/p90/p99, peak memory, and ours' speed-up (reference time / our time).

Tasks:
  cls           ImageNet classifier, MViTv2-T/S/B/L (timm ``mvitv2_*``, mmpretrain ``MViT``).
  det-backbone  detection trunk (``MViTv2Backbone`` vs ``detectron2.modeling.MViT``), default 1024x1024.
  det-model     whole Mask R-CNN inference (eval mode, with post-processing), default one 800x1088 image.
  det-train     one Mask R-CNN training step (forward, backward, AdamW) on synthetic targets, default
                batch 2 at 1024x1024; ``--act-checkpoint`` adds activation-checkpointed variants.

Examples:
  python tools/benchmark.py --task cls --size T --batch-size 8
  python tools/benchmark.py --task cls --size B --dtype bf16 --compile
  python tools/benchmark.py --task det-model --iters 5
  python tools/benchmark.py --task det-train --act-checkpoint --iters 3 --warmup 1
  python tools/benchmark.py --scaling --out-md scaling.md        # the README's resolution table
  python tools/benchmark.py --device cuda --dtype bf16 --task det-train --act-checkpoint

Peak memory is the extra memory one step needs beyond what is already resident (weights, and for
training the optimizer state): on CUDA ``torch.cuda.max_memory_allocated`` above the allocated bytes before
the step; on CPU the rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs)
above its resident set before the step. With ``--act-checkpoint`` on CPU every variant is also measured
alone in a fresh process (peak VmHWM over two training steps), so their peaks cannot mix.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from mvit_det.utils.atomic import atomic_open
from mvit_det.utils.cli import add_deprecated_alias, non_negative_int, parse_img_size, positive_int

from .report import report_markdown, run_report
from .runner import memory_probe
from .settings import DEFAULT_BATCH, DEFAULT_SIZE, DTYPES, SCALING_SIZES, SIZE_NAMES, TASKS, Settings


# =============================================================================================
# Command line
# =============================================================================================
def build_parser() -> argparse.ArgumentParser:
    summary, details = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(
        description=summary, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task", choices=TASKS, default="cls")
    p.add_argument("--size", choices=list(SIZE_NAMES), default="T", help="model size (cls: T/S/B/L)")
    add_deprecated_alias(p, "--arch", "--size", choices=list(SIZE_NAMES))
    p.add_argument("--batch-size", type=positive_int, help="images per step (default: cls 8, det-train 2, else 1)")
    p.add_argument("--img-size", type=parse_img_size,
                   help="SIDE or HxW (default: cls 224, det-backbone/det-train 1024, det-model 800x1088)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast precision (weights stay fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model (det tasks: the trunk)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=positive_int, help="torch.set_num_threads (default 2 on CPU; unchanged on CUDA)")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed rounds per model")
    p.add_argument("--iters", type=positive_int, default=10, help="timed rounds per model")
    p.add_argument("--act-checkpoint", action="store_true",
                   help="det-train: also run the activation-checkpointed variants and compare memory and time")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY=VALUE",
                   help="det-model/det-train: overrides of configs/mvitv2_t_maskrcnn.py (the detectron2 "
                        "reference copies the RPN/RoI-head sizes and test thresholds), "
                        "e.g. model.roi_heads.batch_size_per_image=128")
    p.add_argument("--scaling", action="store_true",
                   help="cls and det-backbone at every --scaling-sizes (batch --batch-size, default 1): "
                        "the README table")
    p.add_argument("--scaling-sizes", type=lambda t: [parse_img_size(x)[0] for x in t.split(",")],
                   default=list(SCALING_SIZES), help="comma-separated square sizes for --scaling")
    p.add_argument("--out-json", type=Path, help="write the full report (every step time) as JSON")
    p.add_argument("--out-md", type=Path, help="also write the Markdown tables to this file")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: child of fresh_process_peak_rss
    return p


def settings_from_args(args: argparse.Namespace) -> list[Settings]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch.cuda.is_available() is False; use --device cpu.")
    if args.dtype == "fp16" and args.device == "cpu" and args.task == "det-train":
        raise SystemExit("error: fp16 training needs CUDA (GradScaler); use --dtype bf16 on the CPU.")
    if args.act_checkpoint and (args.task != "det-train" or args.scaling):
        raise SystemExit("error: --act-checkpoint applies to --task det-train only.")
    if args.opts and (args.task not in ("det-model", "det-train") or args.scaling):
        raise SystemExit("error: --opts applies to --task det-model and det-train only.")
    threads = args.threads if args.threads else (2 if args.device == "cpu" else None)
    common = dict(size=args.size, dtype=args.dtype, compile=args.compile, device=args.device, threads=threads,
                  warmup=args.warmup, iters=args.iters)
    if args.scaling:
        batch = args.batch_size or 1
        return [
            Settings(task=task, batch_size=batch, img_size=(size, size), **common)
            for task in ("cls", "det-backbone")
            for size in args.scaling_sizes
        ]
    return [
        Settings(
            task=args.task,
            batch_size=args.batch_size or DEFAULT_BATCH[args.task],
            img_size=args.img_size or DEFAULT_SIZE[args.task],
            act_checkpoint=args.act_checkpoint,
            opts=tuple(args.opts),
            **common,
        )
    ]


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    if settings[0].threads:
        torch.set_num_threads(settings[0].threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(settings[0], args.memory_probe)))
        return {}
    try:
        report = run_report(settings, mode="scaling" if args.scaling else "single")
    except (ValueError, FileNotFoundError) as e:  # bad settings, explained by the workload
        raise SystemExit(f"error: {e}") from None
    text = report_markdown(report)
    print(text)
    if args.out_md:
        with atomic_open(args.out_md, "w") as f:
            f.write(text)
    if args.out_json:
        with atomic_open(args.out_json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return report

