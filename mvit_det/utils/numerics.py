"""Comparing outputs of two implementations, or of a model and its export."""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["max_rel_diff"]


def max_rel_diff(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """max over tensors of ``max|out - ref| / max|ref|`` (each tensor scaled by its own largest value).

    ``inf`` when the outputs differ in number or shape (e.g. a different count of detections).
    """
    if len(outputs) != len(reference):
        return math.inf
    worst = 0.0
    for a, b in zip(outputs, reference):
        if a.shape != b.shape:
            return math.inf
        if b.numel() == 0:
            continue
        a, b = a.detach().double(), b.detach().double()
        scale = b.abs().max().clamp_min(1e-12)
        worst = max(worst, float((a - b).abs().max() / scale))
    return worst
