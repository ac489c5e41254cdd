"""The "did you mean" hint of every error about an unknown name (model, detector, config key, recipe key)."""
from __future__ import annotations

from collections.abc import Iterable
from difflib import get_close_matches

__all__ = ["did_you_mean"]


def _norm(s: str) -> str:
    return str(s).lower().replace("-", "_").replace(" ", "_")


def did_you_mean(word: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.6) -> str:
    """``" Did you mean 'a' or 'b'?"`` for the choices close to ``word``; ``""`` when none is.

    Choices that start with ``word`` (case, ``-`` and ``_`` ignored) are named instead of difflib's: a short name such as
    ``mvitv2-tiny`` is too far from ``mvitv2-tiny_3rdparty_in1k`` for difflib's ratio alone.
    """
    choices = [str(c) for c in choices]
    key = _norm(word)
    starts = [c for c in choices if len(key) >= 3 and _norm(c).startswith(key) and c != word]
    picked = starts[:n] or get_close_matches(str(word), choices, n=n, cutoff=cutoff)
    return f" Did you mean {' or '.join(repr(c) for c in picked)}?" if picked else ""
