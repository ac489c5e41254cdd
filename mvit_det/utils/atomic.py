"""Atomic file writes: every file mvit-det writes appears complete or not at all.

The data go to a temporary file in the destination folder (``<name>.tmp<pid>.<random>``), which is flushed to
disk and then renamed over the destination with ``os.replace``. A crash, a full disk, Ctrl-C or an exception in
the writer leaves the previous file untouched and removes the temporary file. Because the destination is replaced
by a rename and never truncated, a process that still maps or reads the old file keeps its complete copy.

    with atomic_open("results.json", "w", encoding="utf-8") as f:
        json.dump(summary, f)
    with atomic_path("model.onnx") as tmp:   # for writers that want a file name
        torch.onnx.export(model, args, str(tmp))
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Union

__all__ = ["atomic_open", "atomic_path", "parse_temp_name", "temp_name"]

PathLike = Union[str, os.PathLike]


def temp_name(path: Path) -> Path:
    """``<folder>/<name>.tmp<pid>.<random>``: unique, next to ``path`` (so the rename stays on one file system).

    The pid lets a later run tell the temporary file of a killed writer (``mvit_det.detection.resume``).
    """
    return path.with_name(f"{path.name}.tmp{os.getpid()}.{secrets.token_hex(4)}")


_TEMP_RE = re.compile(r"^(?P<name>.+)\.tmp(?P<pid>\d+)(?:\.[0-9a-f]+)?$")  # the inverse of temp_name


def parse_temp_name(name: str) -> Optional[tuple[str, int]]:
    """``(destination file name, writer pid)`` of a ``temp_name`` file name; None for any other name."""
    m = _TEMP_RE.match(name)
    return (m.group("name"), int(m.group("pid"))) if m else None


def _check_destination(path: Path) -> None:
    if path.is_dir():
        raise IsADirectoryError(
            f"Cannot write {str(path)!r}: it is an existing folder. Give a file name, e.g. {str(path / 'out')!r}."
        )


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path next to ``path``; rename it over ``path`` when the block succeeds.

    The block writes the temporary file (it exists, empty, when the block starts). On any exception the temporary
    file is removed and ``path`` is left as it was. Missing parent folders are created.
    """
    path = Path(path).expanduser()
    _check_destination(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    # os.open with 0o666 lets the umask decide the permissions, as for a plain open() of the destination.
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer may have closed its own handle: make the data durable here
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """``open(path, mode)`` whose result replaces ``path`` only when the block succeeds (mode ``"w"``/``"wb"``)."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes a new file; mode must start with 'w', got {mode!r}.")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
