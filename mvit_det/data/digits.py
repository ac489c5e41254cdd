"""scikit-learn's handwritten digits (``sklearn.datasets.load_digits``: 1797 8x8 grey images of 0-9, shipped inside
the scikit-learn package, so nothing is downloaded) written as an ImageFolder of upscaled PNGs.

    from mvit_det.data.digits import write_digits
    info = write_digits("output/digits", size=48, val_fraction=0.2)   # train/<digit>/*.png, val/<digit>/*.png

The split is stratified and fixed by ``seed``. The images are upscaled (bicubic) from 8x8 to ``size`` pixels, since
MViTv2 needs at least 32x32 (its total stride).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

__all__ = ["CLASS_NAMES", "load_digits_arrays", "write_digits"]

CLASS_NAMES = tuple(f"digit_{d}" for d in range(10))


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, 8, 8) scaled 0..255, labels int64 (1797,)) from scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "The digits data set comes with scikit-learn: pip install scikit-learn (it is in requirements.txt)."
        ) from None
    d = load_digits()
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


def write_digits(
    root: Union[str, Path],
    *,
    size: int = 48,
    val_fraction: float = 0.2,
    per_class: Optional[int] = None,
    seed: int = 0,
) -> dict:
    """Write ``root/train/digit_K/NNNN.png`` and ``root/val/digit_K/NNNN.png`` (RGB, ``size`` x ``size``).

    Args:
        per_class: keep only this many images of each digit (before the split), for quick runs.
        val_fraction: share of each digit held out in ``val/``.

    Returns ``{"train": n, "val": n, "train_dir": path, "val_dir": path}``.
    """
    images, labels = load_digits_arrays()
    rng = np.random.default_rng(seed)
    root = Path(root)
    counts = {"train": 0, "val": 0}
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        idx = idx[rng.permutation(len(idx))]
        if per_class is not None:
            idx = idx[:per_class]
        n_val = int(round(val_fraction * len(idx)))
        for split, chosen in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = root / split / CLASS_NAMES[digit]
            folder.mkdir(parents=True, exist_ok=True)
            for i in sorted(chosen):
                img = Image.fromarray(images[i]).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
                img.save(folder / f"{i:04d}.png")
                counts[split] += 1
    return {**counts, "train_dir": str(root / "train"), "val_dir": str(root / "val")}
