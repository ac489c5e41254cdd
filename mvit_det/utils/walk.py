"""Walk a folder tree safely, whatever it contains.

``walk_files(folder, keep)`` follows symbolic links (image collections are often assembled from links) but enters
every real folder once, so a link loop ends and a folder reached twice is not counted twice; a file reached by two
paths (a link to another file of the tree) is listed once. Unreadable folders, broken links and files that vanish
are skipped and reported, never raised. Names that are not valid UTF-8 are kept as Python gives them (surrogate
escapes), so the files still open; :func:`printable` shows such names without breaking a UTF-8 terminal.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

__all__ = ["WalkResult", "printable", "walk_files"]


@dataclass
class WalkResult:
    """``files`` in a stable (sorted, depth-first) order; ``skipped`` as ``(path, reason)``."""

    files: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def printable(text: str) -> str:
    """``text`` with undecodable bytes of file names (surrogate escapes) shown as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def walk_files(
    folder: Union[str, os.PathLike], keep: Callable[[str], bool], seen: Optional[set[tuple[int, int]]] = None
) -> WalkResult:
    """Every file under ``folder`` whose name passes ``keep``, each once; hidden entries (``.name``) are ignored.

    ``seen`` (device, inode) pairs are shared between calls that must not list a file twice (the class folders
    of one dataset); by default each call starts afresh.
    """
    result = WalkResult()
    seen = set() if seen is None else seen
    seen_dirs = seen_files = seen  # a folder and a file never share an inode

    def onerror(error: OSError) -> None:
        result.skipped.append((str(error.filename), f"cannot read the folder: {error.strerror or error}"))

    for dirpath, dirnames, filenames in os.walk(os.fspath(folder), onerror=onerror, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError as e:
            result.skipped.append((dirpath, f"cannot read the folder: {e.strerror or e}"))
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:  # a link loop, or a second link to a folder already walked
            result.skipped.append((dirpath, "a link to a folder that was already walked"))
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # sorted: a stable order
        for name in sorted(filenames):
            if name.startswith(".") or not keep(name):
                continue
            path = os.path.join(dirpath, name)
            try:
                fst = os.stat(path)
            except OSError as e:
                reason = "a broken link" if os.path.islink(path) else f"cannot read it: {e.strerror or e}"
                result.skipped.append((path, reason))
                continue
            if (fst.st_dev, fst.st_ino) in seen_files:
                result.skipped.append((path, "the same file as another path already listed (a link)"))
                continue
            seen_files.add((fst.st_dev, fst.st_ino))
            result.files.append(path)
    return result
