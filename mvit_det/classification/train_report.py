"""What a training run writes besides checkpoints: ``metrics.json``, TensorBoard events, the confusion matrix."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from torch.utils.tensorboard import SummaryWriter

from ..utils.atomic import atomic_open

__all__ = ["MetricsLog", "confusion_matrix", "plot_confusion_matrix"]


class MetricsLog:
    """One record per epoch in ``metrics.json`` (rewritten atomically) and the same scalars in TensorBoard."""

    def __init__(self, output: Path, records: Optional[list[dict[str, Any]]] = None):
        self.path = Path(output) / "metrics.json"
        self.records = list(records or [])
        self.writer = SummaryWriter(log_dir=str(Path(output) / "tensorboard"))

    def step(self, global_step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("train/loss_step", loss, global_step)
        self.writer.add_scalar("train/lr", lr, global_step)

    def epoch(self, record: dict[str, Any]) -> None:
        self.records = [r for r in self.records if r["epoch"] != record["epoch"]] + [record]
        with atomic_open(self.path, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.records, indent=2) + "\n")
        for key in ("loss", "lr", "val_top1", "val_top5", "images_per_s"):
            if record.get(key) is not None:
                self.writer.add_scalar(f"epoch/{key}", record[key], record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def confusion_matrix(labels: Sequence[int], preds: Sequence[int], num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts: row = true label, column = predicted label."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return cm


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: Path, title: str) -> None:
    """Draw ``cm`` (counts, row-normalised colours) with the class names and write it as a PNG, atomically."""
    matplotlib.use("Agg")

    n = len(class_names)
    side = min(24.0, max(4.0, 0.45 * n + 2))
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 40:
        long_names = n > 10 or max(len(str(c)) for c in class_names) > 3
        ax.set_xticks(range(n), labels=class_names, rotation=45 if long_names else 0, ha="right" if long_names else "center")
        ax.set_yticks(range(n), labels=class_names)
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
