"""Top-1 / top-5 evaluation of an MViTv2 classifier on an ImageNet-style folder, the seed table's protocol.

The protocol: every image of the validation folder goes through ``EvalTransform`` (short side 256, Pillow
bicubic, centre crop 224, RGB mean/std normalisation) and counts once; top-k is "the label is among the k
highest logits". Nothing is padded or repeated, also when the work is split over several processes.

Two folder layouts are read (see ``LAYOUTS``):

- ImageFolder: ``val/<class>/<image>``. Labels are the class folders' positions in sorted order, which for
  ImageNet's WordNet-id folders (``n01440764`` ...) is the standard label order.
- Label file: images anywhere under ``val/`` plus a text file of ``<relative path> <label>`` lines (the
  mmpretrain ``meta/val.txt`` format, e.g. ``ILSVRC2012_val_00000001.JPEG 65``).

Images that cannot be read (corrupt, truncated, not an image) are skipped, counted and listed; they are left
out of the accuracy's denominator.

Python use::

    from mvit_det.classification.evaluate import build_eval_dataset, evaluate
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from ..data.images import IMAGE_EXTENSIONS, ImageReadError
from ..utils.atomic import atomic_open
from ..utils.dist import get_rank, get_world_size, is_distributed
from ..utils.hints import did_you_mean
from ..utils.walk import printable, walk_files
from .transforms import EvalTransform

__all__ = [
    "AMP_DTYPES",
    "DatasetError",
    "EvalBatch",
    "EvalDataset",
    "EvalJob",
    "EvalResult",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "ModelSpecError",
    "SELF_DESCRIBED",
    "ShardSampler",
    "SkippedImage",
    "autocast",
    "build_eval_dataset",
    "build_model",
    "collate_skip_failed",
    "evaluate",
    "evaluate_checkpoint",
    "find_label_file",
    "limit_dataset",
    "load_model_config",
    "model_num_classes",
    "run_job",
    "sha256_file",
    "spawn_job",
]

logger = logging.getLogger(__name__)

#: File endings (lower case) taken as images when scanning a folder; a label file may name any file.

#: ``--amp`` choices -> autocast dtype.
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

LAYOUTS = """\
Expected one of two layouts:
  1. ImageFolder: DATA/<class>/<image>, e.g. val/n01440764/ILSVRC2012_val_00000293.JPEG
     (label = position of the class folder in sorted order; ImageNet's WordNet-id folders sort into the
     standard label order)
  2. Label file: images under DATA, e.g. val/ILSVRC2012_val_00000001.JPEG, plus a text file with one
     '<image path relative to DATA> <integer label>' line per image (mmpretrain's meta/val.txt), given with
     --labels or found at DATA/<name>.txt, <parent>/<name>.txt or <parent>/meta/<name>.txt
     (<name> is DATA's folder name, e.g. val.txt)"""


class DatasetError(ValueError):
    """The evaluation folder or label file is unusable. The message says what is wrong and how to fix it."""


class ModelSpecError(ValueError):
    """The MODEL argument is neither a known model name nor a valid model config file."""


# --------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------
class EvalDataset(Dataset):
    """A fixed list of ``(image path, label)`` that yields ``(tensor or None, label, index, error or None)``.

    A sample whose image cannot be read gives ``None`` and the reason instead of raising, so one bad file
    does not stop an evaluation of 50,000; ``collate_skip_failed`` takes such samples out of the batch.

    Attributes:
        root: the data folder.
        samples: ``[(path, label), ...]`` in evaluation order.
        layout: ``"imagefolder"`` or ``"label-file"``.
        classes: the class folder names (ImageFolder only; ``classes[label]``), else ``None``.
        label_file: the label file used (label-file layout only), else ``None``.
    """

    def __init__(
        self,
        root: Union[str, Path],
        samples: Sequence[tuple[str, int]],
        layout: str,
        *,
        classes: Optional[Sequence[str]] = None,
        label_file: Optional[Union[str, Path]] = None,
        transform: Optional[EvalTransform] = None,
    ):
        self.root = Path(root)
        self.samples = [(str(p), int(label)) for p, label in samples]
        self.layout = layout
        self.classes = list(classes) if classes is not None else None
        self.label_file = Path(label_file) if label_file is not None else None
        self.transform = transform if transform is not None else EvalTransform()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Optional[Tensor], int, int, Optional[str]]:
        path, label = self.samples[index]
        try:
            return self.transform(path), label, index, None
        except (ImageReadError, OSError) as e:  # OSError: e.g. the file vanished or the disk failed mid-run
            return None, label, index, str(e)

    def __repr__(self) -> str:
        source = f"label_file={str(self.label_file)!r}" if self.label_file else f"classes={len(self.classes or [])}"
        return f"{type(self).__name__}(root={str(self.root)!r}, layout={self.layout}, images={len(self)}, {source})"


def build_eval_dataset(
    root: Union[str, Path],
    labels: Optional[Union[str, Path]] = None,
    num_classes: Optional[int] = None,
    transform: Optional[EvalTransform] = None,
) -> EvalDataset:
    """Scan ``root`` (ImageFolder or images + label file, see ``LAYOUTS``) into an ``EvalDataset``.

    Args:
        root: the validation folder.
        labels: a label file; without it one is looked for only when ``root`` holds images directly
            (``find_label_file``), otherwise ``root`` is read as an ImageFolder.
        num_classes: the model's number of classes; every label must lie in ``0..num_classes-1``.
        transform: the preprocessing (default: the published ``EvalTransform``).

    Raises:
        DatasetError: missing or empty folder, no label file for a flat folder, a bad label-file line
            (with its line number), a listed image that does not exist, or a label out of range.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"Data folder {root} does not exist.\n{LAYOUTS}")
    if not root.is_dir():
        raise DatasetError(f"--data must be a folder, but {root} is a file.\n{LAYOUTS}")
    if labels is not None:
        return _from_label_file(root, Path(labels), num_classes, transform)

    top_images = [p for p in root.iterdir() if p.is_file() and _is_image(p)]
    if top_images:
        found = find_label_file(root)
        if found is None:
            tried = ", ".join(str(p) for p in _label_file_candidates(root))
            raise DatasetError(
                f"{root} holds {len(top_images)} images directly but no label file was found (looked for "
                f"{tried}). Pass one with --labels, or sort the images into one folder per class.\n{LAYOUTS}"
            )
        logger.info("Using the label file %s", found)
        return _from_label_file(root, found, num_classes, transform)

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    seen: set = set()  # an image reached from two class folders (a link) counts once, in the first
    samples = [(path, label) for label, name in enumerate(classes) for path in _images_under(root / name, seen)]
    if not samples:
        what = f"{len(classes)} sub-folders but no images in them" if classes else "no images and no sub-folders"
        raise DatasetError(f"No images found in {root}: it has {what}.\n{LAYOUTS}")
    if num_classes is not None:
        if len(classes) > num_classes:
            raise DatasetError(
                f"{root} has {len(classes)} class folders, but the model has {num_classes} classes: folder "
                f"{classes[num_classes]!r} (and any after it in sorted order) would get label {num_classes}, "
                f"out of range 0..{num_classes - 1}. Evaluate with a model of {len(classes)} classes, remove "
                f"the extra folders, or give the labels explicitly with --labels."
            )
        if len(classes) < num_classes:
            # A subset of ImageNet's folders would silently get the wrong labels: say so.
            logger.warning(
                "%s has %d class folders for a %d-class model: labels are the folders' positions in sorted "
                "order (0..%d). If these folders are a subset of the model's classes, the labels are wrong; "
                "use a label file (--labels) instead.",
                root, len(classes), num_classes, len(classes) - 1,
            )
    return EvalDataset(root, samples, "imagefolder", classes=classes, transform=transform)


def _label_file_candidates(root: Path) -> list[Path]:
    name = f"{root.resolve().name}.txt"
    parent = root.resolve().parent
    return [root / name, parent / name, parent / "meta" / name]


def find_label_file(root: Union[str, Path]) -> Optional[Path]:
    """The label file of a flat folder: ``DATA/<name>.txt``, ``<parent>/<name>.txt`` or
    ``<parent>/meta/<name>.txt`` (mmpretrain), first found; ``None`` if there is none."""
    return next((p for p in _label_file_candidates(Path(root)) if p.is_file()), None)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_under(folder: Path, seen: Optional[set] = None) -> list[str]:
    """The images under ``folder``, each once (also across calls sharing ``seen``), links followed safely
    (``mvit_det.utils.walk``); what was skipped (link loops, unreadable folders, broken links) is logged."""
    walked = walk_files(folder, lambda name: _is_image(Path(name)), seen)
    if walked.skipped:
        shown = "; ".join(f"{printable(path)}: {reason}" for path, reason in walked.skipped[:5])
        more = f" ... and {len(walked.skipped) - 5} more" if len(walked.skipped) > 5 else ""
        logger.warning("Skipped %d entries under %s: %s%s", len(walked.skipped), printable(str(folder)), shown, more)
    return walked.files


def _from_label_file(
    root: Path, label_file: Path, num_classes: Optional[int], transform: Optional[EvalTransform]
) -> EvalDataset:
    if not label_file.is_file():
        raise DatasetError(f"Label file {label_file} does not exist.\n{LAYOUTS}")
    try:
        text = label_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DatasetError(f"Label file {label_file} is not a UTF-8 text file.\n{LAYOUTS}") from None

    samples: list[tuple[str, int]] = []
    first_line: dict[str, int] = {}
    missing: list[tuple[int, str]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)  # the path may contain spaces, the label cannot
        where = f"{label_file} line {lineno}"
        if len(parts) != 2 or not _is_int(parts[1]):
            raise DatasetError(
                f"{where}: expected '<image path> <integer label>', got {line!r}.\n{LAYOUTS}"
            )
        rel, label = parts[0], int(parts[1])
        if label < 0:
            raise DatasetError(f"{where}: label {label} is negative; labels are 0-based class indices.")
        if num_classes is not None and label >= num_classes:
            raise DatasetError(
                f"{where}: label {label} is out of range for a model with {num_classes} classes "
                f"(valid labels: 0..{num_classes - 1}). Check that the label file belongs to this model's "
                f"classes."
            )
        if rel in first_line:
            raise DatasetError(f"{where}: {rel!r} is listed again (first on line {first_line[rel]}).")
        first_line[rel] = lineno
        path = root / rel
        if not path.is_file():
            missing.append((lineno, rel))
        samples.append((str(path), label))

    if missing:
        lineno, rel = missing[0]
        more = f" ({len(missing) - 1} more listed images are missing too)" if len(missing) > 1 else ""
        raise DatasetError(
            f"{label_file} line {lineno}: image {rel!r} not found in {root}{more}. Paths in the label file are "
            f"relative to the data folder."
        )
    if not samples:
        raise DatasetError(f"Label file {label_file} lists no images.\n{LAYOUTS}")
    return EvalDataset(root, samples, "label-file", label_file=label_file, transform=transform)


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------------------
# Loading: collate and sharding
# --------------------------------------------------------------------------------------------------------
@dataclass
class EvalBatch:
    """A batch with unreadable samples removed.

    Attributes:
        images: (B, 3, H, W) float32, B may be 0 when every sample of the batch failed.
        labels: (B,) int64.
        indices: (B,) int64, positions in the dataset.
        failed: ``[(dataset index, reason), ...]`` of the samples left out.
    """

    images: Tensor
    labels: Tensor
    indices: Tensor
    failed: list[tuple[int, str]] = field(default_factory=list)

    def pin_memory(self) -> "EvalBatch":  # called by DataLoader(pin_memory=True)
        return EvalBatch(self.images.pin_memory(), self.labels.pin_memory(), self.indices.pin_memory(), self.failed)


def collate_skip_failed(items: Sequence[tuple[Optional[Tensor], int, int, Optional[str]]]) -> EvalBatch:
    """Stack the readable samples of an ``EvalDataset`` batch; list the others in ``failed``."""
    good = [(img, label, idx) for img, label, idx, _ in items if img is not None]
    failed = [(idx, err) for img, _, idx, err in items if img is None]
    if good:
        images = torch.stack([g[0] for g in good])
    else:
        images = torch.empty(0, 3, 0, 0)
    labels = torch.tensor([g[1] for g in good], dtype=torch.long)
    indices = torch.tensor([g[2] for g in good], dtype=torch.long)
    return EvalBatch(images, labels, indices, failed)


class ShardSampler(Sampler[int]):
    """Every ``num_replicas``-th index from ``rank``: the shards are disjoint and cover the data exactly once.

    Unlike ``torch.utils.data.DistributedSampler`` nothing is padded or repeated, so the summed counts of
    all processes equal a single-process run; shard sizes differ by at most one.
    """

    def __init__(self, num_samples: int, num_replicas: int, rank: int):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in 0..{num_replicas - 1}, got {rank}.")
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.num_replicas))


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
_CONFIG_KEYS = {"arch": str, "num_classes": int, "expand_attn": bool, "cls_token": bool}


def load_model_config(path: Union[str, Path]) -> dict[str, Any]:
    """Read a model config file: YAML (``.yaml``/``.yml``) or JSON (``.json``) with the keys

    ``arch`` (required: ``tiny``/``small``/``base``/``large``/``huge``), ``num_classes`` (default 1000),
    ``expand_attn`` (default true; false for the L in1k checkpoint), ``cls_token`` (default false; true for
    the in21k checkpoints). Returns the keyword arguments of ``MViTv2``.
    """
    from ..models import ARCHS

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            cfg = json.loads(text)
        else:
            import yaml

            cfg = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # json/yaml errors are ValueErrors
        raise ModelSpecError(f"Cannot read model config {path}: {e}") from None
    except Exception as e:  # yaml.YAMLError is not a ValueError
        raise ModelSpecError(f"Cannot parse model config {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelSpecError(f"Model config {path} must be a mapping with keys {sorted(_CONFIG_KEYS)}.")
    unknown = sorted(set(cfg) - set(_CONFIG_KEYS))
    if unknown:
        raise ModelSpecError(f"Model config {path}: unknown keys {unknown}; allowed: {sorted(_CONFIG_KEYS)}.")
    if "arch" not in cfg:
        raise ModelSpecError(f"Model config {path} needs 'arch', one of {sorted(ARCHS)}.")
    for key, typ in _CONFIG_KEYS.items():
        if key in cfg and (type(cfg[key]) is not typ):
            raise ModelSpecError(f"Model config {path}: {key!r} must be a {typ.__name__}, got {cfg[key]!r}.")
    if cfg["arch"] not in ARCHS:
        raise ModelSpecError(f"Model config {path}: unknown arch {cfg['arch']!r}; choose from {sorted(ARCHS)}.")
    if cfg.get("num_classes", 1000) < 1:
        raise ModelSpecError(f"Model config {path}: num_classes must be >= 1, got {cfg['num_classes']}.")
    return {"num_classes": 1000, **cfg}


def model_num_classes(model_spec: str) -> int:
    """Classes of the model ``build_model(model_spec, ...)`` builds, without building it."""
    from ..models import get_card, list_models

    if model_spec in list_models():
        return get_card(model_spec).num_classes
    return _config_or_error(model_spec)["num_classes"]


def _config_or_error(model_spec: str) -> dict[str, Any]:
    from ..models import list_models

    path = Path(model_spec)
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise ModelSpecError(f"Model config file {path} does not exist.")
        return load_model_config(path)
    raise ModelSpecError(
        f"Unknown model {model_spec!r}.{did_you_mean(model_spec, list_models())} Give a name from list_models() ({', '.join(list_models())}) "
        f"or a .yaml/.json model config file."
    )


#: ``model_spec`` of a checkpoint that names its own model (written by tools/cls_train.py).
SELF_DESCRIBED = "<described by the checkpoint>"


def build_model(model_spec: str, checkpoint: Union[str, Path]) -> torch.nn.Module:
    """A model name from ``list_models()`` or a model config file (``load_model_config``), with the weights of
    ``checkpoint`` (a path or URL in any format ``mvit_det.checkpoint`` reads), loaded strictly.
    ``SELF_DESCRIBED``: the checkpoint names its model."""
    from ..models import MViTv2, get_model, list_models

    if model_spec == SELF_DESCRIBED:
        return get_model(pretrained=str(checkpoint))
    if model_spec in list_models():
        return get_model(model_spec, pretrained=str(checkpoint))
    from ..checkpoint import load_checkpoint

    model = MViTv2(**_config_or_error(model_spec))
    load_checkpoint(model, str(checkpoint), strict=True)
    return model.eval()


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
    model = build_model(model_spec, checkpoint_file or checkpoint)
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


def limit_dataset(dataset: EvalDataset, limit: int) -> EvalDataset:
    """``limit`` images spread evenly over ``dataset`` (every ``len/limit``-th), for a quick check.

    Evenly spread rather than the first ``limit``: an ImageFolder is sorted by class, so its first images
    would all share one label.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}.")
    n = len(dataset)
    if limit >= n:
        return dataset
    picked = [dataset.samples[i * n // limit] for i in range(limit)]
    return EvalDataset(
        dataset.root, picked, dataset.layout, classes=dataset.classes, label_file=dataset.label_file,
        transform=dataset.transform,
    )


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
    from ..utils.launch import spawn_cpu

    if torch.device(job.device).type != "cpu":
        raise ValueError("spawn_job runs CPU processes only; for GPUs launch with torchrun --nproc-per-node N.")
    return spawn_cpu(run_job, (job,), num_procs)
