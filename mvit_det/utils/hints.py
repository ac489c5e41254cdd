"""Hints shared by every tool: "did you mean" for an unknown name (model, detector, config key, recipe key), and what
to do after an interrupted training run."""
from __future__ import annotations

from collections.abc import Iterable
from difflib import get_close_matches
from os import PathLike
from typing import Optional, Union

__all__ = ["did_you_mean", "interrupted_advice"]


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


def interrupted_advice(
    last_saved: Optional[Union[str, PathLike]], output: Union[str, PathLike], saved_as: str = "checkpoint"
) -> str:
    """What to do after an interrupted training run in ``output``: continue from ``last_saved`` (what ``--resume``
    would load; ``None`` when the run saved nothing yet) or start again. ``saved_as`` names it for the user."""
    if last_saved is None:
        return f"Nothing was saved in {output} yet; the same command starts the run again."
    return f"The last saved {saved_as} is {last_saved}; the same command with --resume continues from it."
