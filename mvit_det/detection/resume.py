"""What ``--resume`` needs beyond detectron2's checkpointer: the data order, and the debris of a killed save.

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

import itertools
import logging
import os
import re
from typing import Any, Iterator, Optional

from torch.utils.data import Sampler

__all__ = ["TrainLoaderState", "remove_unfinished_checkpoints"]

logger = logging.getLogger(__name__)

# Temporary files of the atomic writes (mvit_det.utils.atomic): "<name>.tmp<pid>.<random>" (older: "<name>.tmp<pid>").
_TEMP_RE = re.compile(r"^(?P<name>.+\.pth|last_checkpoint)\.tmp(?P<pid>\d+)(?:\.[0-9a-f]+)?$")


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
        m = _TEMP_RE.match(name)
        if m and not _alive(int(m.group("pid"))):
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
