"""Start N local CPU processes (gloo on 127.0.0.1) without torchrun: ``spawn_cpu(fn, args, num_procs)``.

Every process calls ``fn(*args)`` inside an initialised process group; rank 0's return value (JSON-able) comes
back to the caller through a file (not a queue: a large result cannot block a process on a full pipe). Used by
``tools/cls_eval.py --num-procs`` and ``tools/cls_train.py --num-procs``.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = ["spawn_cpu"]


def _worker(rank: int, fn: Callable[..., Any], args: tuple, world: int, port: int, result_file: str) -> None:
    # Each process gets its share of the cores; without this every process would start one thread per core.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    # A fresh interpreter: set up logging like the launching CLI, with one voice (rank 0).
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR, format="[%(levelname)s] %(message)s")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = fn(*args)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(result_file).write_text(json.dumps(result), encoding="utf-8")


def spawn_cpu(fn: Callable[..., Any], args: tuple, num_procs: int) -> Any:
    """Run ``fn(*args)`` in ``num_procs`` spawned CPU processes forming one gloo group; return rank 0's result.

    ``fn`` and ``args`` must be picklable. Raises ``torch.multiprocessing.ProcessRaisedException`` /
    ``ProcessExitedException`` if a process fails (the others are then stopped).
    """
    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port; released just before the processes bind it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="mvit_det_spawn_") as tmp:
        result_file = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(fn, args, num_procs, port, result_file), nprocs=num_procs, join=True)
        return json.loads(Path(result_file).read_text(encoding="utf-8"))
