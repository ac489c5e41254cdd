"""Whether this process is one rank of a ``torch.distributed`` group, and which."""
from __future__ import annotations

import torch.distributed as dist

__all__ = ["is_distributed", "get_rank", "get_world_size"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1
