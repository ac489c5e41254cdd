"""Top-1 / top-5 evaluation of an MViTv2 classifier on an ImageNet-style folder, the seed table's protocol.

The protocol: every image of the validation folder goes through ``EvalTransform`` (short side 256, Pillow
bicubic, centre crop 224, RGB mean/std normalisation) and counts once; top-k is "the label is among the k
highest logits". Nothing is padded or repeated, also when the work is split over several processes.

The folder layouts and the dataset are in ``mvit_det.classification.datasets``. Images that cannot be read (corrupt, truncated, not an image) are skipped, counted and listed; they are left
out of the accuracy's denominator.

Python use::

    from mvit_det.classification.datasets import build_eval_dataset
    from mvit_det.classification.evaluate import evaluate
    dataset = build_eval_dataset("imagenet/val", num_classes=1000)
    result = evaluate(model, dataset, batch_size=64, workers=4, device="cpu", amp="bf16")
    print(result.top1, result.top5, result.skipped)

``evaluate`` shards the data itself when ``torch.distributed`` is initialised; ``evaluate_checkpoint``
goes from a model name (or model config file) + checkpoint + folder to the JSON-ready summary that
``tools/cls_eval.py`` writes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..hub import SELF_DESCRIBED, build_classifier
from ..utils.atomic import atomic_open
from ..utils.dist import get_rank, get_world_size, is_distributed
from ..utils.launch import spawn_cpu
from ..utils.walk import printable
from .datasets import EvalBatch, EvalDataset, ShardSampler, collate_skip_failed

__all__ = [
    "AMP_DTYPES",
    "EvalJob",
    "EvalResult",
    "SkippedImage",
    "autocast",
    "evaluate",
    "evaluate_checkpoint",
    "run_job",
    "sha256_file",
    "spawn_job",
]

logger = logging.getLogger(__name__)


#: ``--amp`` choices -> autocast dtype.
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------------------
# Evaluation loop
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SkippedImage:
    path: str
    reason: str


@dataclass
class EvalResult:
    """Counts over the whole dataset (all processes). Accuracies are percentages of the evaluated images.

    Attributes:
        images: images in the dataset.
        evaluated: images that were read and classified.
        correct1 / correct5: evaluated images whose label is the top-1 / among the top-``topk`` logits.
        skipped: unreadable images, in dataset order.
        predictions: (images, topk) int64, the ``topk`` best labels per image, best first; -1 rows for
            skipped images.
        seconds: wall time of the loop (the slowest process), data loading included.
        topk: k of "top-k" (5, or the number of classes if fewer).
    """

    images: int
    evaluated: int
    correct1: int
    correct5: int
    skipped: list[SkippedImage]
    predictions: Tensor
    seconds: float
    topk: int = 5

    @property
    def top1(self) -> float:
        return 100.0 * self.correct1 / self.evaluated if self.evaluated else float("nan")

    @property
    def top5(self) -> float:
        return 100.0 * self.correct5 / self.evaluated if self.evaluated else float("nan")

    @property
    def images_per_s(self) -> float:
        return self.evaluated / self.seconds if self.seconds > 0 else float("nan")


def autocast(device: torch.device, amp: Optional[str]):
    """``torch.autocast`` for ``amp`` in ``AMP_DTYPES`` (``None``: full precision)."""
    if amp is None:
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)} or None, got {amp!r}.")
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: EvalDataset,
    *,
    batch_size: int = 64,
    workers: int = 4,
    device: Union[str, torch.device] = "cpu",
    amp: Optional[str] = None,
    topk: int = 5,
    progress: bool = True,
) -> EvalResult:
    """Top-1 / top-k accuracy of ``model`` (logits ``(B, num_classes)``) on ``dataset``.

    When ``torch.distributed`` is initialised, each process evaluates its ``ShardSampler`` shard and the
    counts, skipped files and predictions are combined over all processes (every rank gets the result).

    Args:
        batch_size: images per forward pass (per process).
        workers: DataLoader worker processes (per process); 0 loads in the main process.
        device: where the model runs; the model is moved there.
        amp: ``"bf16"`` / ``"fp16"`` autocast, or ``None`` for float32.
        topk: the k of top-k; capped at the number of classes.
        progress: show a tqdm bar with the running top-1 (rank 0 only).
    """
    device = torch.device(device)
    distributed = is_distributed()
    rank, world = get_rank(), get_world_size()
    sampler = ShardSampler(len(dataset), world, rank)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skip_failed,
        pin_memory=device.type == "cuda",
    )
    model.eval().to(device)

    bar = tqdm(total=len(sampler), unit="img", desc="eval", disable=not progress or rank != 0, dynamic_ncols=True)
    counts = torch.zeros(3, dtype=torch.long)  # evaluated, correct1, correctk
    local_preds: list[tuple[Tensor, Tensor]] = []
    failed: list[tuple[int, str]] = []
    k = None
    start = time.perf_counter()
    for batch in loader:
        failed.extend(batch.failed)
        if batch.images.shape[0]:
            with autocast(device, amp):
                logits = model(batch.images.to(device, non_blocking=True))
            if logits.ndim != 2:
                raise ValueError(f"The model must return logits (B, num_classes); got shape {tuple(logits.shape)}.")
            if not torch.isfinite(logits).all():
                raise _non_finite_logits(model, logits, batch, dataset, amp)
            k = min(topk, logits.shape[1])
            # Ranks come from the logits as the model returned them (bf16 under --amp bf16, so near-equal
            # logits can tie); float() only gives topk one dtype to work on.
            pred = logits.float().topk(k, dim=1).indices.cpu()
            hit = pred == batch.labels[:, None]
            counts += torch.stack([torch.tensor(len(pred)), hit[:, 0].sum(), hit.any(dim=1).sum()])
            local_preds.append((batch.indices, pred))
        bar.update(batch.images.shape[0] + len(batch.failed))
        if counts[0]:
            bar.set_postfix(top1=f"{100.0 * counts[1].item() / counts[0].item():.2f}")
    seconds = time.perf_counter() - start
    bar.close()

    if distributed:
        # Counts are summed; the lists (skipped files, predictions) are small enough to gather as objects.
        # NCCL only reduces CUDA tensors; gloo takes CPU ones.
        comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
        counts = counts.to(comm)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        elapsed = torch.tensor([seconds], dtype=torch.float64, device=comm)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        seconds = float(elapsed.item())
        counts = counts.cpu()
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (failed, local_preds, k))
        failed = [f for g in gathered for f in g[0]]
        local_preds = [p for g in gathered for p in g[1]]
        k = next((g[2] for g in gathered if g[2] is not None), None)

    k = k if k is not None else topk
    predictions = torch.full((len(dataset), k), -1, dtype=torch.long)
    for indices, pred in local_preds:
        predictions[indices] = pred
    skipped = [SkippedImage(dataset.samples[i][0], reason) for i, reason in sorted(failed)]
    evaluated, correct1, correct5 = (int(c) for c in counts.tolist())
    return EvalResult(len(dataset), evaluated, correct1, correct5, skipped, predictions, seconds, k)


def _non_finite_logits(model: torch.nn.Module, logits: Tensor, batch: EvalBatch, dataset: EvalDataset, amp) -> FloatingPointError:
    """NaN/Inf logits make top-k meaningless (NaN sorts arbitrarily): the evaluation stops with the cause."""
    bad_rows = (~torch.isfinite(logits)).any(dim=1).nonzero().flatten().tolist()
    first = dataset.samples[int(batch.indices[bad_rows[0]])][0]
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        cause = (
            f"{len(bad)} weight tensors of the checkpoint contain NaN/Inf (first: {', '.join(bad[:3])}); evaluate a "
            "checkpoint saved before training diverged"
        )
    else:
        cause = (
            f"the weights are finite, so the forward pass overflowed ({amp or 'float32'}); evaluate in float32 or "
            "with --amp bf16"
        )
    return FloatingPointError(
        f"The model returned NaN/Inf logits for {len(bad_rows)} of {len(logits)} images in a batch (first: {first}), "
        f"so no accuracy can be computed: {cause}."
    )


# --------------------------------------------------------------------------------------------------------
# Model + checkpoint -> summary (what tools/cls_eval.py runs on every process)
# --------------------------------------------------------------------------------------------------------
def sha256_file(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def evaluate_checkpoint(
    model_spec: str,
    checkpoint: Union[str, Path],
    dataset: EvalDataset,
    *,
    checkpoint_file: Optional[Union[str, Path]] = None,
    batch_size: int = 64,
    workers: int = 4,
    device: Union[str, torch.device] = "cpu",
    amp: Optional[str] = None,
    progress: bool = True,
) -> tuple[dict[str, Any], EvalResult]:
    """Build ``model_spec`` with ``checkpoint``, evaluate it on ``dataset`` and summarise.

    ``checkpoint_file`` is the local copy of ``checkpoint`` (for a URL: the downloaded file), used for the
    sha256; by default ``checkpoint`` itself. Under ``torch.distributed`` every rank must call this; the
    summaries agree except that only rank 0 computes ``checkpoint_sha256`` (``None`` elsewhere).

    Returns ``(summary, result)``: the JSON-ready dict ``tools/cls_eval.py`` writes, and the ``EvalResult``.
    """
    model = build_classifier(model_spec, checkpoint_file or checkpoint)
    result = evaluate(model, dataset, batch_size=batch_size, workers=workers, device=device, amp=amp, progress=progress)
    rank, world = get_rank(), get_world_size()
    digest = sha256_file(checkpoint_file or checkpoint) if rank == 0 else None
    summary = {
        "model": model_spec if model_spec != SELF_DESCRIBED else f"{Path(str(checkpoint)).name} (self-describing)",
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": digest,
        "data": str(dataset.root),
        "layout": dataset.layout,
        "label_file": str(dataset.label_file) if dataset.label_file else None,
        "images": result.images,
        "evaluated": result.evaluated,
        "skipped": len(result.skipped),
        "top1": result.top1,
        "top5": result.top5,
        "topk": result.topk,
        "correct_top1": result.correct1,
        "correct_top5": result.correct5,
        "images_per_s": result.images_per_s,
        "seconds": result.seconds,
        "skipped_files": [{"path": s.path, "reason": s.reason} for s in result.skipped],
        "device": str(torch.device(device)),
        "amp": amp,
        "batch_size": batch_size,
        "processes": world,
        "preprocessing": repr(dataset.transform),
        "torch": torch.__version__,
    }
    for key in ("top1", "top5", "images_per_s"):
        if math.isnan(summary[key]):
            summary[key] = None  # JSON has no NaN
    return summary, result


# --------------------------------------------------------------------------------------------------------
# One evaluation run, in one process or several (what tools/cls_eval.py executes)
# --------------------------------------------------------------------------------------------------------
@dataclass
class EvalJob:
    """Everything one evaluation run needs; picklable, so spawned processes receive it whole.

    ``checkpoint`` is what the user gave (path or URL), ``checkpoint_file`` the local file to read. ``out``
    (JSON summary) and ``predictions`` (CSV: path, label, top-k labels) are written by rank 0 if set.
    """

    model: str
    checkpoint: str
    checkpoint_file: str
    dataset: EvalDataset
    batch_size: int = 64
    workers: int = 4
    device: str = "cpu"
    amp: Optional[str] = None
    out: Optional[str] = None
    predictions: Optional[str] = None
    progress: bool = True


def run_job(job: EvalJob) -> dict[str, Any]:
    """Evaluate (on every rank, if distributed); rank 0 prints the result and writes the files.

    Returns the summary dict (see ``evaluate_checkpoint``).
    """
    summary, result = evaluate_checkpoint(
        job.model, job.checkpoint, job.dataset, checkpoint_file=job.checkpoint_file, batch_size=job.batch_size,
        workers=job.workers, device=job.device, amp=job.amp, progress=job.progress,
    )
    rank = get_rank()
    if rank == 0:
        _report(summary, result, job)
    return summary


def _report(summary: dict[str, Any], result: EvalResult, job: EvalJob) -> None:
    def pct(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    print(
        f"{summary['model']} on {summary['data']}: top-1 {pct(summary['top1'])}  top-{result.topk} "
        f"{pct(summary['top5'])}  on {result.evaluated} of {result.images} images "
        f"({len(result.skipped)} skipped), {result.images_per_s:.1f} images/s "
        f"[{summary['device']}, {summary['amp'] or 'fp32'}, {summary['processes']} process(es)]",
        flush=True,
    )
    if result.skipped:
        shown = result.skipped[:10]
        print(f"Skipped {len(result.skipped)} unreadable image(s):", flush=True)
        for s in shown:
            print(f"  {printable(s.reason)}", flush=True)
        if len(result.skipped) > len(shown):
            where = "all listed in the --out JSON" if job.out else "write them all with --out FILE"
            print(f"  ... and {len(result.skipped) - len(shown)} more ({where}).", flush=True)
    if job.out:
        out = Path(job.out)
        with atomic_open(out, "w", encoding="utf-8") as f:  # the old results stay whole until the new ones are
            f.write(json.dumps(summary, indent=2) + "\n")
        print(f"Wrote {out}", flush=True)
    if job.predictions:
        _write_predictions(Path(job.predictions), job.dataset, result)
        print(f"Wrote {job.predictions}", flush=True)


def _write_predictions(path: Path, dataset: EvalDataset, result: EvalResult) -> None:
    import csv

    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"] + [f"top{i + 1}" for i in range(result.topk)])
        for (img, label), pred in zip(dataset.samples, result.predictions.tolist()):
            if pred[0] >= 0:  # skipped images have no prediction; they are listed in the JSON
                writer.writerow([os.path.relpath(img, dataset.root), label] + pred)


def spawn_job(job: EvalJob, num_procs: int) -> dict[str, Any]:
    """Run ``job`` on ``num_procs`` local CPU processes (gloo on 127.0.0.1), without torchrun.

    Returns rank 0's summary. Raises ``torch.multiprocessing.ProcessRaisedException`` /
    ``ProcessExitedException`` if a process fails (the others are then stopped).
    """
    if torch.device(job.device).type != "cpu":
        raise ValueError("spawn_job runs CPU processes only; for GPUs launch with torchrun --nproc-per-node N.")
    return spawn_cpu(run_job, (job,), num_procs)
