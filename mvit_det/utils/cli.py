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
