"""Training data for ``tools/cls_train.py``: folder scanning with clear errors, a held-out split, timm's training
augmentations, and a sampler whose order depends only on (seed, epoch).

The folders are read by ``evaluate.build_eval_dataset`` (ImageFolder with any folder names, or a flat folder plus a
``<path> <label>`` file), so training and ``tools/cls_eval.py`` accept the same layouts.

Reproducibility (exact ``--resume``, and the same result on 1 or N processes): the order of an epoch is a permutation
drawn from ``(seed, epoch)``; global batch ``k`` is the ``k``-th slice of it and process ``r`` of ``W`` takes the
``r``-th ``1/W`` of that slice. Every sample's augmentation is drawn from ``(seed, epoch, index)``, so it does not
depend on the process, the loader worker or where a run was resumed.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from torch.utils.data import Dataset, Sampler

from ..data.images import ImageReadError, load_image
from .datasets import LAYOUTS, DatasetError, EvalDataset, build_eval_dataset
from .transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform

__all__ = [
    "MIN_SIDE",
    "GlobalBatchSampler",
    "TrainData",
    "TrainDataset",
    "build_train_transform",
    "eval_transform",
    "prepare_data",
    "sample_seed",
]

logger = logging.getLogger(__name__)

#: The network's total stride: smaller images cannot be classified (``MViTv2`` refuses inputs below 32x32).
MIN_SIDE = 32


@dataclass
class TrainData:
    """What the scan found. ``train``/``val`` are ``[(path, label), ...]``; ``val`` may be empty."""

    root: str
    layout: str
    class_names: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    val_root: Optional[str] = None
    skipped: list[tuple[str, str]] = field(default_factory=list)


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, index ...), the same in every process."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h * 6364136223846793005 + int(p) + 1442695040888963407) % (1 << 64)
    return h >> 1


# --------------------------------------------------------------------------------------------------------
# Scanning
# --------------------------------------------------------------------------------------------------------
def _scan(root: Union[str, Path], labels: Optional[Union[str, Path]]) -> tuple[EvalDataset, list[str]]:
    ds = build_eval_dataset(root, labels=labels)
    if ds.layout == "imagefolder":
        names = list(ds.classes)
        counts = np.bincount([label for _, label in ds.samples], minlength=len(names))
        empty = [names[i] for i in np.flatnonzero(counts == 0)]
        if empty:
            raise DatasetError(
                f"Class folder(s) {', '.join(repr(n) for n in empty)} in {root} hold no images (image endings: "
                ".jpg .jpeg .png .bmp .ppm .pgm .tif .tiff .webp). Add images to them or remove the folders."
            )
    else:
        num = max(label for _, label in ds.samples) + 1
        counts = np.bincount([label for _, label in ds.samples], minlength=num)
        empty = [str(i) for i in np.flatnonzero(counts == 0)]
        if empty:
            raise DatasetError(
                f"Label file {ds.label_file}: label(s) {', '.join(empty)} have no images (labels run 0..{num - 1}). "
                "Labels must be consecutive class indices starting at 0; renumber them."
            )
        names = [str(i) for i in range(num)]
    return ds, names


def _check_images(samples: list[tuple[str, int]], what: str) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """Read every image header: unreadable files are skipped (returned), images below ``MIN_SIDE`` are an error."""
    kept, skipped, small = [], [], []
    for path, label in samples:
        try:
            with Image.open(path) as im:
                w, h = im.size
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            skipped.append((path, f"{path}: cannot be read as an image ({type(e).__name__}: {e})"))
            continue
        if min(w, h) < MIN_SIDE:
            small.append(f"{path} ({w}x{h})")
        kept.append((path, label))
    if small:
        shown = ", ".join(small[:5]) + (f" and {len(small) - 5} more" if len(small) > 5 else "")
        raise DatasetError(
            f"{len(small)} {what} image(s) are smaller than {MIN_SIDE}x{MIN_SIDE}, the network's total stride: {shown}. "
            f"MViTv2 cannot see detail below one {MIN_SIDE}-pixel cell; upscale these images to at least "
            f"{MIN_SIDE} pixels on the short side (e.g. PIL image.resize) or remove them."
        )
    for _, reason in skipped:
        logger.warning("Skipping unreadable image %s", reason)
    return kept, skipped


def _split(samples: list[tuple[str, int]], fraction: float, seed: int) -> tuple[list, list]:
    """Stratified split: ``round(fraction * n)`` images of each class (at least 1 of a class with >= 2) held out."""
    if not 0 < fraction < 1:
        raise DatasetError(f"--val-split must be between 0 and 1 (a fraction of the images), got {fraction}.")
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(i)
    held: set[int] = set()
    gen = torch.Generator().manual_seed(seed)
    for label in sorted(by_class):
        idx = by_class[label]
        n_val = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) >= 2 else 0
        order = torch.randperm(len(idx), generator=gen).tolist()
        held.update(idx[j] for j in order[:n_val])
    train = [s for i, s in enumerate(samples) if i not in held]
    val = [s for i, s in enumerate(samples) if i in held]
    return train, val


def prepare_data(
    data: Union[str, Path],
    *,
    labels: Optional[Union[str, Path]] = None,
    val_data: Optional[Union[str, Path]] = None,
    val_labels: Optional[Union[str, Path]] = None,
    val_split: Optional[float] = None,
    seed: int = 0,
) -> TrainData:
    """Scan the training folder (and the validation folder or split) and check it for training.

    Raises ``DatasetError`` for: a missing or empty folder, a class folder without images, a single class, labels
    with gaps, images smaller than the network's stride, validation classes unknown to the training set.
    Unreadable images are skipped and listed in ``TrainData.skipped``.
    """
    if val_data is not None and val_split is not None:
        raise DatasetError("Give either --val-data (a folder) or --val-split (a fraction held out), not both.")
    ds, names = _scan(data, labels)
    if len(names) < 2:
        raise DatasetError(
            f"{data} holds a single class ({names[0]!r}): a classifier needs at least two. For the ImageFolder "
            f"layout put each class in its own sub-folder.\n{LAYOUTS}"
        )
    train, skipped = _check_images(ds.samples, "training")
    val: list[tuple[str, int]] = []
    val_root = None
    if val_split is not None:
        train, val = _split(train, val_split, seed)
        val_root = str(data)
    elif val_data is not None:
        vds, vnames = _scan(val_data, val_labels)
        val_root = str(val_data)
        unknown = sorted(set(vnames) - set(names))
        if unknown:
            raise DatasetError(
                f"Validation classes {', '.join(repr(u) for u in unknown[:10])} in {val_data} are not among the "
                f"{len(names)} training classes of {data}. Both folders must use the same class names."
            )
        index = {n: i for i, n in enumerate(names)}  # by name: a validation folder may lack some classes
        val, vskipped = _check_images([(p, index[vnames[label]]) for p, label in vds.samples], "validation")
        skipped += vskipped
    counts = np.bincount([label for _, label in train], minlength=len(names))
    if (counts == 0).any():
        missing = [names[i] for i in np.flatnonzero(counts == 0)]
        raise DatasetError(f"No readable training images left for class(es) {', '.join(missing)}.")
    return TrainData(str(data), ds.layout, names, train, val, val_root, skipped)


# --------------------------------------------------------------------------------------------------------
# Transforms and datasets
# --------------------------------------------------------------------------------------------------------
def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize with Pillow < 13's result for 0 bits (a black image); Pillow 13 raises instead."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _fix_posterize(transform) -> None:
    """RandAugment ``inc1`` with magnitude noise reaches level 10, i.e. 0 bits for PosterizeIncreasing; Pillow 13
    refuses 0 bits. Give this transform's posterize ops the behaviour the recipes were published with."""
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize


def build_train_transform(recipe):
    """timm's ImageNet training pipeline (``timm.data.create_transform``) with the recipe's augmentations."""
    transform = create_transform(
        input_size=recipe.img_size,
        is_training=True,
        scale=tuple(recipe.scale),
        hflip=recipe.hflip,
        color_jitter=recipe.color_jitter,
        auto_augment=recipe.auto_augment,
        interpolation=recipe.interpolation,
        mean=tuple(m / 255 for m in IMAGENET_MEAN),
        std=tuple(s / 255 for s in IMAGENET_STD),
        re_prob=recipe.re_prob,
        re_mode="pixel",
        re_count=1,
    )
    _fix_posterize(transform)
    return transform


def eval_transform(img_size: int, crop_pct: float) -> EvalTransform:
    """Evaluation preprocessing at ``img_size``: short side to ``int(img_size / crop_pct)``, bicubic, centre crop."""
    return EvalTransform(resize_size=int(img_size / crop_pct), crop_size=img_size)


class TrainDataset(Dataset):
    """``[(path, label)]`` -> ``(tensor or None, label, index, error or None)``, as ``EvalDataset`` (so the
    same collate drops unreadable images). Indexed by ``(epoch, index)``: the augmentation of a sample is drawn
    from ``sample_seed(seed, epoch, index)``."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform, seed: int):
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        path, label = self.samples[index]
        s = sample_seed(self.seed, epoch, index)
        random.seed(s)
        np.random.seed(s % (1 << 32))
        torch.manual_seed(s)
        try:
            return self.transform(load_image(path)), label, index, None
        except (ImageReadError, OSError) as e:
            return None, label, index, str(e)


def micro_batch_size(batch_size: int, world: int, accum: int) -> int:
    """Images per process and accumulation step; ValueError when the global batch does not split evenly."""
    if batch_size % (world * accum):
        raise ValueError(
            f"The global batch ({batch_size}) must divide evenly over {world} process(es) x {accum} "
            f"accumulation step(s); choose a --batch-size that is a multiple of {world * accum}."
        )
    return batch_size // (world * accum)


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Micro-batches of ``(epoch, index)`` for one process, from step ``start_step`` of ``epoch`` on.

    Global batch ``k`` of an epoch is ``perm[k*B:(k+1)*B]`` of the permutation drawn from ``(seed, epoch)``; the
    last incomplete batch is dropped. Process ``rank`` takes its ``B/world`` share, split into ``accum``
    micro-batches.
    """

    def __init__(self, num_samples: int, batch_size: int, world: int, rank: int, accum: int, seed: int):
        micro = micro_batch_size(batch_size, world, accum)
        if num_samples < batch_size:
            raise DatasetError(
                f"The global batch ({batch_size}) is larger than the training set ({num_samples} images); lower "
                "--batch-size."
            )
        self.num_samples, self.batch_size, self.world, self.rank = num_samples, batch_size, world, rank
        self.accum, self.seed = accum, seed
        self.micro = micro
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(sample_seed(self.seed, self.epoch)))
        share = self.batch_size // self.world
        for step in range(self.start_step, self.steps_per_epoch):
            mine = perm[step * self.batch_size + self.rank * share:][:share].tolist()
            for m in range(self.accum):
                yield [(self.epoch, i) for i in mine[m * self.micro:(m + 1) * self.micro]]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum
