"""The "did you mean" hint of every error about an unknown name (model, detector, config key, recipe key)."""
from __future__ import annotations

from collections.abc import Iterable
from difflib import get_close_matches

__all__ = ["did_you_mean"]


def did_you_mean(word: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.6) -> str:
    """``" Did you mean 'a' or 'b'?"`` for the choices close to ``word``; ``""`` when none is."""
    close = get_close_matches(str(word), list(choices), n=n, cutoff=cutoff)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
