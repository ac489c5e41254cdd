"""Argument types shared by the command-line tools."""
from __future__ import annotations

import argparse


def parse_img_size(text: str) -> tuple[int, int]:
    """argparse type for ``--img-size``: ``SIDE`` or ``HxW``, each side at least the network's stride (32)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 32:
        raise argparse.ArgumentTypeError(
            f"--img-size must be SIDE or HxW with sides >= 32 (e.g. 224 or 800x1088), got {text!r}"
        )
    return parts[0], parts[1]


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value
