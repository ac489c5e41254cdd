"""The run folder and what ``--resume`` needs beyond detectron2's checkpointer: the data order, the debris of a
killed save, and the lock that keeps two runs out of one folder.

detectron2 restores the weights, optimizer, LR scheduler and iteration on resume, but its training sampler starts
again from the first index of a new random seed (``seed=-1``, the default) or of the same seed: either way the
resumed run sees other images than an uninterrupted run would have. :class:`TrainLoaderState` fixes that. It is a
checkpointable (``state_dict`` / ``load_state_dict``) that stores the sampler's seed in every checkpoint and, on
resume, restores it and skips the indices the finished iterations consumed, so the image order continues exactly.

Limits, stated in docs/robustness.md: the order is exact with ``num_workers=0``, or when the resume iteration is a
multiple of ``num_workers``; otherwise images arrive at most ``num_workers`` batches out of order (the workers
take turns by batch). Aspect-ratio grouping can hold back a few images at the cut. Random augmentations (flip,
scale) are drawn afresh, and a different number of processes gives a different order.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import socket
import tempfile
import time
from typing import Any, Iterator, Optional

from torch.utils.data import Sampler

from ..utils.atomic import parse_temp_name
from ..utils.hints import interrupted_advice

__all__ = [
    "LOCK_NAME", "OutputDirLockedError", "TrainLoaderState", "check_output_dir", "last_checkpoint_name",
    "output_dir_lock", "periodic_checkpoints", "remove_unfinished_checkpoints", "resume_hint",
]

logger = logging.getLogger(__name__)

#: the files of a run folder that atomic saves write (their temporary copies are what a killed save leaves)
_CHECKPOINT_FILES = (".pth", "last_checkpoint")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_unfinished_checkpoints(save_dir: str) -> list[str]:
    """Delete the temporary files a job killed while saving left in ``save_dir``; return their paths.

    The finished checkpoints and ``last_checkpoint`` are never touched: a save only becomes visible by an atomic
    rename, so a temporary file is always an unfinished copy. Files of a process that is still running are kept.
    """
    if not save_dir or not os.path.isdir(save_dir):
        return []
    removed = []
    for name in sorted(os.listdir(save_dir)):
        parsed = parse_temp_name(name)
        if parsed and parsed[0].endswith(_CHECKPOINT_FILES) and not _alive(parsed[1]):
            path = os.path.join(save_dir, name)
            os.remove(path)
            removed.append(path)
    return removed


class _SkipSampler(Sampler):
    """``sampler`` without its first ``skip`` indices (detectron2's train samplers are infinite streams)."""

    def __init__(self, sampler: Sampler, skip: int):
        self.sampler = sampler
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)


def _find(loader: Any) -> tuple[Optional[Any], Optional[int]]:
    """(the ``ToIterableDataset`` holding the sampler, the per-process batch size) inside a detectron2 train loader.

    detectron2 builds ``AspectRatioGroupedDataset(DataLoader(ToIterableDataset(dataset, sampler)), batch_size)``,
    or ``DataLoader(ToIterableDataset(...), batch_size=...)`` without grouping, possibly inside a ``MapDataset``.
    """
    from detectron2.data.common import ToIterableDataset

    node, batch_size = loader, None
    for _ in range(8):
        if isinstance(node, ToIterableDataset):
            return node, batch_size
        size = getattr(node, "batch_size", None)
        if batch_size is None and isinstance(size, int):  # the outermost batching level is the real one
            batch_size = size
        inner = getattr(node, "dataset", None)
        node = inner if inner is not None else getattr(node, "_dataset", None)
        if node is None:
            break
    return None, None


class TrainLoaderState:
    """Checkpointable state of a detectron2 training data loader (see the module docstring).

    Register it with the checkpointer (``checkpointer.checkpointables["train_data"] = state``) before resuming,
    then call :meth:`skip_batches` with the first iteration to run. Must be used before the loader is iterated.
    """

    def __init__(self, loader: Any):
        self._holder, self.batch_size = _find(loader)
        self._sampler = self._holder.sampler if self._holder is not None else None
        if self._sampler is not None and not hasattr(self._sampler, "_seed"):
            self._sampler = None
        if self._sampler is None:
            logger.warning(
                "The training data loader is not a detectron2 sampler-based loader; after --resume its data order "
                "starts from the beginning instead of continuing."
            )

    @property
    def supported(self) -> bool:
        return self._sampler is not None and self.batch_size is not None

    def state_dict(self) -> dict:
        return {"sampler_seed": int(self._sampler._seed)} if self._sampler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self._sampler is not None and "sampler_seed" in state:
            self._sampler._seed = int(state["sampler_seed"])

    def skip_batches(self, num_batches: int) -> int:
        """Continue the sample stream after ``num_batches`` batches of this process; return the samples skipped."""
        if not self.supported or num_batches <= 0:
            return 0
        skip = num_batches * self.batch_size
        self._holder.sampler = _SkipSampler(self._sampler, skip)
        return skip


# ---------------------------------------------------------------------------------------------------------------
# One run per output folder
# ---------------------------------------------------------------------------------------------------------------
def last_checkpoint_name(output_dir: str) -> Optional[str]:
    """The file ``<output_dir>/last_checkpoint`` names; None when the folder holds no run."""
    try:
        with open(os.path.join(output_dir, "last_checkpoint"), encoding="utf-8", errors="replace") as f:
            return f.read().strip() or None
    except OSError:
        return None


def resume_hint(output_dir: str) -> str:
    """What to do after an interrupted run, naming the checkpoint it would continue from."""
    name = last_checkpoint_name(output_dir)
    return interrupted_advice(None if name is None else os.path.join(output_dir, name), output_dir)


def periodic_checkpoints(output_dir: str, before: int) -> list[str]:
    """The periodic checkpoints ``model_NNNNNNN.pth`` of the run in ``output_dir`` saved before iteration
    ``before``, oldest first (as detectron2's PeriodicCheckpointer lists the ones it saved)."""
    found = []
    for name in os.listdir(output_dir):
        m = re.fullmatch(r"model_(\d{7})\.pth", name)
        if m and int(m.group(1)) < before:
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


def check_output_dir(output_dir: str, key: str = "the output folder") -> None:
    """Create ``output_dir`` if needed and prove that a file can be written in it; ``ValueError`` otherwise."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise ValueError(
            f"Cannot write to the output folder {output_dir!r} ({key}): {e.strerror or e}. Set {key} to a folder "
            "you can write."
        ) from None


LOCK_NAME = ".mvit_det_run.lock"


class OutputDirLockedError(RuntimeError):
    """Another run is using the output folder."""


@contextlib.contextmanager
def output_dir_lock(output_dir: str, key: str = "the output folder"):
    """Hold ``<output_dir>/.mvit_det_run.lock`` (this process's pid and host) while the block runs.

    Two runs in one folder would overwrite each other's checkpoints, ``last_checkpoint`` and metrics, so a second
    run is refused with ``OutputDirLockedError``. A lock left by a process that no longer exists on this machine
    (a killed run) is stale: it is taken over, with a warning.
    """
    check_output_dir(output_dir, key)
    path = os.path.join(output_dir, LOCK_NAME)
    host = socket.gethostname()
    mine = f"{os.getpid()} {host} {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    owner = f.read().split()
            except FileNotFoundError:
                continue  # released meanwhile
            pid = int(owner[0]) if owner and owner[0].isdigit() else None
            owner_host = owner[1] if len(owner) > 1 else "?"
            if pid is not None and owner_host == host and not _alive(pid):
                logger.warning("Removing the stale lock %s of process %d, which no longer runs.", path, pid)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            since = " ".join(owner[2:4]) if len(owner) > 3 else "an unknown time"
            raise OutputDirLockedError(
                f"The output folder {output_dir} is in use by another run (pid {pid} on {owner_host}, since {since}); "
                f"two runs in one folder overwrite each other's checkpoints. Give this run its own folder ({key}=...), "
                f"or wait for the other run to finish. If no such run exists any more, delete {path}."
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        break
    else:
        raise OutputDirLockedError(f"Could not take the lock {path}: it keeps reappearing. Is another run starting?")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            with open(path, encoding="utf-8") as f:
                if f.read() == mine:
                    os.unlink(path)
