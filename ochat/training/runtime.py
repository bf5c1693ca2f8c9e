"""Where a training process runs: its rank among the others, its device and its dtype; rank-0 logging.

`setup_runtime` starts torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPUs). Started without a
launcher (`python -m ochat.training.train ...`), it runs as the only rank.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ochat.config.train_config import TrainConfig


class TrainError(Exception):
    """A problem the user can fix. Raised alike on every rank; rank 0 prints it as one line (exit code 1)."""


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    bf16: bool  # else float32

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def log(msg: str) -> None:
    """Print `[ochat] msg` once (rank 0)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[ochat] {msg}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Initialise torch.distributed and pick this rank's device; seeds the global RNGs with cfg.seed."""
    import deepspeed

    if "RANK" not in os.environ:  # no launcher: this process is the whole job
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", max(cfg.local_rank, 0)))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and cuda)  # CPU: float32 (exact tests, exact resume)
    return Runtime(dist.get_rank(), dist.get_world_size(), device, bf16)
