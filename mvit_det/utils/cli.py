"""Argument types and helpers shared by the command-line tools."""
from __future__ import annotations

import argparse
import sys


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


class _DeprecatedAlias(argparse.Action):
    def __init__(self, option_strings, dest, replacement: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: {option_string} is deprecated; use {self.replacement}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, **kwargs) -> None:
    """Keep accepting a renamed option ``old`` (hidden from --help) for scripts written before the rename: it sets
    ``new``'s value and prints a one-line notice. ``kwargs`` (``choices``, ``type``) should match ``new``'s."""
    dest = new.lstrip("-").replace("-", "_")
    parser.add_argument(old, dest=dest, action=_DeprecatedAlias, replacement=new, help=argparse.SUPPRESS, **kwargs)
