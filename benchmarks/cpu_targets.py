"""Issue 11's CPU targets in one command: every run they rest on, measured, judged and written as a table row.

    python -m benchmarks.cpu_targets OUT_DIR              # the benchmark runs (14 minutes on one AVX2 thread)
    python -m benchmarks.cpu_targets OUT_DIR --main-job   # and `make demo`'s job, timed (up to 10 minutes more)
    python -m benchmarks.cpu_targets OUT_DIR --dry-run    # the same plan at toy sizes, one round each

``make cpu-targets`` runs the second line into ``output/cpu_targets``. Each benchmark run is ``tools/benchmark.py``
in a process of its own (ours and the installed references interleaved in it, numerics checked, the machine's fp32
``torch.mm`` rate measured at its start), so that no run inherits the heap an earlier one left: MViTv2-T
classification at batch 8 and 224x224 in fp32 three times and the detection backbone at one 1024x1024 image twice,
with glibc's default allocator, then each once more with every freed block reused (``REUSE_MALLOC``: by default
glibc maps large blocks afresh, and they page-fault in at every call, detectron2's largest most; these runs show the
ratios without that), classification with bf16 requested once (it also times ours in fp32). With
``--main-job``, ``tools/main_job.py`` runs in a child process into ``OUT_DIR/main_job`` and its ``summary.json``
gives the job's time and box AP. Each target is judged on the median of its runs; ``cpu_targets.json`` and
``cpu_targets.md`` (the verdicts, a row for the README's table of this CPU class, every run's table) are written
after every run, and a rerun into the same OUT_DIR keeps the runs already measured with the same plan, CPU,
threads and commit. The targets are those issue 11 sets for CPUs with AVX2 only; on other CPUs the same figures
are what "keep every AVX-512 figure at least where it is" compares.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from mvit_det.utils.atomic import atomic_open
from mvit_det.utils.cli import positive_int

from .report import cpu_line, model_gflops_per_s, run_markdown
from .runner import settings_argv
from .settings import OURS, ROOT, Settings, hardware_info


@dataclass(frozen=True)
class Target:
    key: str
    what: str
    threshold: float
    unit: str  # "x" (a speed ratio), "%" (a share), "s", "AP"
    at_most: bool = False

    def met(self, value: float) -> bool:
        return value <= self.threshold if self.at_most else value >= self.threshold

    def fmt(self, value: float) -> str:
        return {"x": f"{value:.2f}x", "%": f"{100 * value:.0f}%", "s": f"{value:.0f} s"}.get(self.unit, f"{value:.1f}")


#: issue 11, "Targets on the AVX2 machine class" and "The main job on this machine class"
TARGETS = (
    Target("cls_vs_best_peer", "classification, ours vs the faster of timm and mmpretrain", 1.4, "x"),
    Target("cls_share_of_mm", "classification, ours' GFLOP/s as a share of the fp32 torch.mm rate", 0.80, "%"),
    Target("cls_vs_best_peer_reuse", "classification, ours vs the faster peer, every freed block reused", 1.4, "x"),
    Target("cls_share_of_mm_reuse", "classification, ours' share of the torch.mm rate, every freed block reused", 0.80,
           "%"),
    Target("det_vs_detectron2", "detection backbone, ours vs detectron2", 1.5, "x"),
    Target("det_vs_detectron2_reuse", "detection backbone, ours vs detectron2, every freed block reused", 1.5, "x"),
    Target("bf16_vs_fp32", "bf16 requested, ours vs ours in fp32 (a CPU without native bf16)", 0.9, "x"),
    Target("main_job_s", "make demo's job, wall time", 600, "s", at_most=True),
    Target("main_job_box_ap", "make demo's job, box AP on the toy val set", 30, "AP"),
)
PEERS = {"cls": ("timm", "mmpretrain"), "det-backbone": ("detectron2",)}
#: toy sizes of --dry-run (seconds per run on the CPU)
DRY_SIZE = {"cls": (64, 64), "det-backbone": (96, 96)}
DRY_MAIN_JOB = ["--pretrain-epochs", "0", "--iters", "1", "--num-vis", "1"]
#: glibc settings of the run "with every freed block reused": never map a block afresh, never trim the heap, so
#: that after the warm-up no tensor page-faults in (glibc's mmap threshold cannot exceed 32 MB, hence mmap max 0)
REUSE_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


@dataclass(frozen=True)
class PlannedRun:
    settings: Settings
    malloc_env: dict[str, str] = field(default_factory=dict)  # allocator variables of its process

    @property
    def title(self) -> str:
        return self.settings.title + "".join(f", {k}={v}" for k, v in self.malloc_env.items())


def plan(dry_run: bool = False, threads: int = 2) -> list[PlannedRun]:
    """The runs, in order: cls fp32 x3, det-backbone x2, the two again with every freed block reused, cls bf16."""
    cls = Settings(task="cls", size="T", batch_size=8, img_size=(224, 224), threads=threads)
    det = Settings(task="det-backbone", size="T", batch_size=1, img_size=(1024, 1024), threads=threads, warmup=1,
                   iters=5)
    if dry_run:
        cls, det = (replace(s, batch_size=1, img_size=DRY_SIZE[s.task], warmup=0, iters=1) for s in (cls, det))
    return ([PlannedRun(cls)] * 3 + [PlannedRun(det)] * 2
            + [PlannedRun(cls, REUSE_MALLOC), PlannedRun(det, REUSE_MALLOC), PlannedRun(replace(cls, dtype="bf16"))])


# ---------------------------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------------------------
def _kind(done: dict[str, Any]) -> str:
    """Which targets a finished run measures: "cls" (fp32 classification) or "det", each with "-reuse" where every
    freed block was reused, or "bf16"."""
    run = done["run"]
    if run["settings"]["dtype"] != "fp32":
        return "bf16"
    return ("det" if run["task"] == "det-backbone" else "cls") + ("-reuse" if done.get("malloc_env") else "")


def _row(run: dict[str, Any], name: str) -> Optional[dict[str, Any]]:
    return next((m for m in run["models"] if m["name"] == name), None)


def run_figures(run: dict[str, Any], gemm_gflops: Optional[float]) -> dict[str, Any]:
    """What a run says about the targets: ours' img/s, each peer's, the ratios, the share of mm."""
    s = run["settings"]
    ours = _row(run, OURS)
    out: dict[str, Any] = {"ours_img_s": ours["images_per_s"], "peers_img_s": {}}
    for peer in PEERS[run["task"]]:
        m = _row(run, peer)
        if m is not None:
            out["peers_img_s"][peer] = m["images_per_s"]
    if out["peers_img_s"]:
        # ours_speedup of a row = its p50 / ours' p50: the smallest is the ratio to the fastest peer
        out["vs_best_peer"] = min(_row(run, p)["ours_speedup"] for p in out["peers_img_s"])
    rate = model_gflops_per_s(run, ours)
    if rate and gemm_gflops:
        out["share_of_mm"] = rate / gemm_gflops
    fp32 = _row(run, f"{OURS} fp32")
    if s["dtype"] != "fp32" and fp32 is not None:
        out["vs_own_fp32"] = fp32["ours_speedup"]
    return out


def judge(done: Sequence[dict[str, Any]], main_job: Optional[dict[str, Any]], native_bf16: bool,
          pending: Sequence[str] = ()) -> list[dict]:
    """One verdict per target: the value of each run, their median, met or not (or why not measured).
    ``pending``: the keys of targets whose runs are still to come."""
    values: dict[str, list[float]] = {t.key: [] for t in TARGETS}
    # target <- (kind of run, figure of the run)
    sources = {"cls_vs_best_peer": ("cls", "vs_best_peer"), "cls_share_of_mm": ("cls", "share_of_mm"),
               "cls_vs_best_peer_reuse": ("cls-reuse", "vs_best_peer"),
               "cls_share_of_mm_reuse": ("cls-reuse", "share_of_mm"),
               "det_vs_detectron2": ("det", "vs_best_peer"), "det_vs_detectron2_reuse": ("det-reuse", "vs_best_peer"),
               "bf16_vs_fp32": ("bf16", "vs_own_fp32")}
    for d in done:
        for key, (kind, figure) in sources.items():
            if _kind(d) == kind and figure in d["figures"]:
                values[key].append(d["figures"][figure])
    if main_job and "summary" in main_job:
        values["main_job_s"].append(main_job["summary"]["total_s"])
        values["main_job_box_ap"].append(main_job["summary"]["box_AP_after"])
    verdicts = []
    for t in TARGETS:
        v = values[t.key]
        row = {"key": t.key, "what": t.what, "target": ("<= " if t.at_most else ">= ") + t.fmt(t.threshold),
               "values": v}
        if not v and t.key in pending:
            row["note"] = "not measured yet"
        elif not v:
            row["note"] = "not measured" + (" (no --main-job)" if t.key.startswith("main_job") and not main_job
                                            else "")
        else:
            row["median"] = statistics.median(v)
            if t.key == "bf16_vs_fp32" and native_bf16:
                row["note"] = "not judged: this CPU has native bf16, and the target is for CPUs without it"
            else:
                row["met"] = t.met(row["median"])
        verdicts.append(row)
    return verdicts


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
def run_child(planned: PlannedRun, json_path: Path) -> dict[str, Any]:
    """One benchmark run in a new process (``python -m benchmarks ... --out-json``) with its allocator settings;
    its report. Its progress and tables show as it runs."""
    cmd = [sys.executable, "-m", "benchmarks", *settings_argv(planned.settings), "--out-json", str(json_path)]
    env = {**os.environ, **planned.malloc_env}
    json_path.unlink(missing_ok=True)
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if rc != 0 or not json_path.is_file():
        raise SystemExit(f"error: the benchmark run failed (exit code {rc}; its output is above): "
                         + " ".join([*(f"{k}={v}" for k, v in planned.malloc_env.items()), *cmd]))
    return json.loads(json_path.read_text())


# ---------------------------------------------------------------------------------------------
# The main job
# ---------------------------------------------------------------------------------------------
def run_main_job(out_dir: Path, extra: Sequence[str] = ()) -> dict[str, Any]:
    """``tools/main_job.py`` into ``out_dir/main_job`` in a child process (its own OpenMP set-up, as in `make demo`)."""
    job_dir = out_dir / "main_job"
    cmd = [sys.executable, str(ROOT / "tools" / "main_job.py"), "--output-dir", str(job_dir), *extra]
    print(f"[cpu-targets] main job: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    out: dict[str, Any] = {"command": cmd, "exit_code": rc, "wall_s": time.perf_counter() - t0}
    summary = job_dir / "summary.json"
    if summary.is_file():  # exit 1 only says training did not raise AP: the summary still holds the figures
        out["summary"] = json.loads(summary.read_text())
    else:
        out["error"] = f"no {summary} (exit code {rc}); see the output above"
    return out


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------
def _span(values: Sequence[float], spec: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, spec) if format(lo, spec) == format(hi, spec) else f"{format(lo, spec)}-{format(hi, spec)}"


def _reused(done: dict[str, Any]) -> str:
    return " (freed blocks reused)" if done.get("malloc_env") else ""


def readme_row(report: dict[str, Any]) -> str:
    """The row for the README's performance table of this CPU class (machine | classification | det | bf16)."""
    hw, done = report["hardware"], report["done"]
    cls = [d for d in done if _kind(d) in ("cls", "cls-reuse")]
    det = [d for d in done if _kind(d) in ("det", "det-reuse")]
    bf16 = [d["figures"] for d in done if _kind(d) == "bf16"]
    gemm = [d["gemm_fp32_gflops"] for d in done]
    n = hw["torch_threads"]
    machine = (f"{cpu_line(hw)}, {n} thread{'s' if n > 1 else ''}, {hw['date'][:10]}, {hw['mvit_det_commit']} "
               f"(mm {_span(gemm, '.0f')} GFLOP/s)")
    cells = [machine]
    if cls:
        figs = [d["figures"] for d in cls]
        peers = "".join(f", {p} {_span([f['peers_img_s'][p] for f in figs if p in f['peers_img_s']], '.3g')}"
                        for p in PEERS["cls"] if any(p in f["peers_img_s"] for f in figs))
        ratio = ", ".join(f"{d['figures']['vs_best_peer']:.2f}x{_reused(d)}" for d in cls
                          if "vs_best_peer" in d["figures"])
        share = ", ".join(f"{100 * d['figures']['share_of_mm']:.0f}%{_reused(d)}" for d in cls
                          if "share_of_mm" in d["figures"])
        cells.append(f"{len(cls)} runs: ours {_span([f['ours_img_s'] for f in figs], '.3g')} img/s{peers}: "
                     f"**{ratio}**; ours {share or '–'} of mm")
    else:
        cells.append("")
    if det:
        ms = ", ".join(f"{1e3 / d['figures']['ours_img_s']:.0f}" for d in det)
        ratio = ", ".join(f"{d['figures']['vs_best_peer']:.2f}x{_reused(d)}" for d in det
                          if "vs_best_peer" in d["figures"])
        cells.append(f"{len(det)} runs: ours {ms} ms: **{ratio}** detectron2")
    else:
        cells.append("")
    cells.append(f"ours **{bf16[0]['vs_own_fp32']:.2f}x** our own fp32" if bf16 and "vs_own_fp32" in bf16[0] else "")
    return "| " + " | ".join(cells) + " |"


def report_markdown(report: dict[str, Any]) -> str:
    hw = report["hardware"]
    lines = [f"## Issue 11's CPU targets ({hw['date']})", ""]
    if report["dry_run"]:
        lines += ["**Dry run: toy sizes, one round each. These figures test the plan; they measure nothing.**", ""]
    lines += [
        cpu_line(hw) + f"; {hw['torch_threads']} torch threads on {hw['cpu_count']} CPUs; torch {hw['torch']}; "
        f"mvit-det {hw['mvit_det_commit']}.",
        "",
        "| target | each run | median | target | met |",
        "|---|---|---|---|---|",
    ]
    by_key = {t.key: t for t in TARGETS}
    for v in report["verdicts"]:
        t = by_key[v["key"]]
        each = ", ".join(t.fmt(x) for x in v["values"]) or "–"
        med = t.fmt(v["median"]) if "median" in v else "–"
        met = ("yes" if v["met"] else "**no**") if "met" in v else ""
        note = (" " if "met" in v else "") + f"({v['note']})" if v.get("note") else ""
        lines.append(f"| {v['what']} | {each} | {med} | {v['target']} | {met}{note} |")
    mj = report.get("main_job")
    if mj and "summary" in mj:
        s = mj["summary"]
        lines += ["", f"Main job: {s['total_s']:.0f} s (pre-training {s['pretrain_s']:.0f} s, evaluation before "
                  f"training {s['eval_before_s']:.0f} s, training and evaluation {s['train_and_eval_s']:.0f} s), "
                  f"box AP {s['box_AP_after']:.1f}, mask AP {s['mask_AP_after']:.1f}; drawings: "
                  + ", ".join(s["files"]["visualisations"])]
    elif mj:
        lines += ["", f"Main job: {mj.get('error')}"]
    if report["done"]:
        lines += ["", "Row for the README's table of this CPU class (machine | classification | detection backbone | "
                  "bf16):", "", readme_row(report)]
    for d in report["done"]:
        lines += ["", run_markdown(d["run"], {**hw, "gemm_fp32_gflops": d["gemm_fp32_gflops"]}),
                  f"malloc: {d.get('malloc') or 'not recorded'}"]
    for w in report["warnings"]:
        lines.append(f"- **warning**: {w}")
    return "\n".join(lines) + "\n"


def _write(out_dir: Path, report: dict[str, Any]) -> None:
    with atomic_open(out_dir / "cpu_targets.json", "w") as f:
        json.dump(report, f, indent=2, default=str)
    with atomic_open(out_dir / "cpu_targets.md", "w") as f:
        f.write(report_markdown(report))


def _earlier_report(path: Path, key: dict[str, Any]) -> dict[str, Any]:
    """An earlier report in OUT_DIR measured with the same plan, CPU, threads and commit (to resume), else {}."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return old if old.get("key") == key else {}


def run(out_dir: Path, dry_run: bool = False, main_job: bool = False, threads: int = 2) -> dict[str, Any]:
    settings = plan(dry_run, threads)
    torch.set_num_threads(threads)
    hw = hardware_info("cpu")
    key = {"dry_run": dry_run, "plan": [p.title for p in settings], "cpu_model": hw["cpu_model"],
           "cpu_isa": hw["cpu_isa"], "torch_cpu_capability": hw["torch_cpu_capability"], "threads": threads,
           "commit": hw["mvit_det_commit"]}
    old = _earlier_report(out_dir / "cpu_targets.json", key)
    job_done = (old.get("main_job") or {}).get("summary") is not None
    if main_job and not (ROOT / "tools" / "main_job.py").is_file():
        raise SystemExit(f"error: --main-job runs tools/main_job.py of a checkout, and {ROOT} has none; run it from a "
                         "clone of mvit-det (make cpu-targets), or leave --main-job out.")
    if main_job and not job_done and (out_dir / "main_job").exists():  # before minutes of benchmarks, not after
        raise SystemExit(
            f"error: {out_dir / 'main_job'} holds an earlier main job, which this run would partly reuse and so "
            "time wrongly; remove it (or choose another OUT_DIR) to time a whole job."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"key": key, "dry_run": dry_run, "hardware": hw,
                              "done": old.get("done", []), "main_job": old.get("main_job") if job_done else None,
                              "warnings": old.get("warnings", [])}
    if report["done"]:
        print(f"[cpu-targets] {len(report['done'])} of {len(settings)} runs kept from {out_dir / 'cpu_targets.json'}"
              " (same plan, CPU, threads and commit)", flush=True)
    pending = [t.key for t in TARGETS if main_job or not t.key.startswith("main_job")]
    for i in range(len(report["done"]), len(settings)):
        print(f"[cpu-targets] run {i + 1}/{len(settings)}: {settings[i].title}", flush=True)
        one = run_child(settings[i], out_dir / f"run_{i + 1}.json")
        (r,) = one["runs"]
        gemm = one["hardware"]["gemm_fp32_gflops"]
        report["done"].append({"run": r, "gemm_fp32_gflops": gemm, "figures": run_figures(r, gemm),
                               "malloc": one["hardware"].get("malloc"), "malloc_env": settings[i].malloc_env})
        report["warnings"] += [w for w in one["warnings"] if w not in report["warnings"]]
        report["verdicts"] = judge(report["done"], report["main_job"], hw["native_bf16"], pending)
        _write(out_dir, report)
    if main_job and not job_done:
        report["main_job"] = run_main_job(out_dir, DRY_MAIN_JOB if dry_run else ())
    report["verdicts"] = judge(report["done"], report["main_job"], hw["native_bf16"])
    _write(out_dir, report)
    print(report_markdown(report).split("\nRow for")[0], flush=True)
    return report


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--main-job", action="store_true", help="also run and time tools/main_job.py (make demo's job)")
    p.add_argument("--dry-run", action="store_true", help="the same plan at toy sizes, one round each")
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    args = p.parse_args(argv)
    if args.out_dir.exists() and not args.out_dir.is_dir():
        p.error(f"OUT_DIR {args.out_dir} is a file; name a folder (new or one this command wrote before).")
    return run(args.out_dir, args.dry_run, args.main_job, args.threads)


if __name__ == "__main__":
    main()
