"""Which process this is among the ranks of a job (torch.distributed), or the only one when none was started."""
from __future__ import annotations

import os

import torch.distributed as dist


def rank() -> int:
    """This process's rank: torch.distributed's, or before it starts the launcher's RANK (0 without a launcher)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of ranks; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the rank that prints and writes the files every rank would write alike."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if dist.is_initialized():
        dist.barrier()
