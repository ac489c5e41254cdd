"""Classification data: the two folder layouts (ImageFolder, or images plus a label file), the evaluation
dataset that skips unreadable images, its collate function and the sampler that shards it over processes.

Two folder layouts are read (see ``LAYOUTS``):

- ImageFolder: ``val/<class>/<image>``. Labels are the class folders' positions in sorted order, which for
  ImageNet's WordNet-id folders (``n01440764`` ...) is the standard label order.
- Label file: images anywhere under ``val/`` plus a text file of ``<relative path> <label>`` lines (the
  mmpretrain ``meta/val.txt`` format, e.g. ``ILSVRC2012_val_00000001.JPEG 65``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from ..data.images import IMAGE_EXTENSIONS, ImageReadError
from ..utils.walk import printable, walk_files
from .transforms import EvalTransform

__all__ = [
    "DatasetError", "EvalBatch", "EvalDataset", "LAYOUTS", "ShardSampler", "build_eval_dataset",
    "collate_skip_failed", "find_label_file", "limit_dataset",
]

logger = logging.getLogger(__name__)


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
