"""Where a training process runs: its rank among the others, its device and its dtype; how it stops.

`setup_runtime` starts torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPUs). Started without a
launcher (`python -m ochat.training.train ...`), it runs as the only rank.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ochat.config.train_config import TrainConfig


class TrainError(Exception):
    """A problem the user can fix. Raised alike on every rank; rank 0 prints it as one line (exit code 1)."""

    status = 1


class Stopped(Exception):
    """The run stopped on a signal after saving: raised alike on every rank; rank 0 prints it as one line and the
    process exits with `status`."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    bf16: bool  # else float32
    launched: bool  # started by a launcher (deepspeed, torchrun), not as the only process

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_deepspeed_shm_op() -> None:
    """DeepSpeed's CPU accelerator builds a shared-memory all-reduce op at its first run on a machine (a C++
    compile of about 90 s on 2 cores) and leaves a 64 MiB buffer per rank in /dev/shm. CPU ranks here serve tests
    and demos, for which gloo's own collectives are fast enough: DeepSpeed is told the op cannot be built."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    deepspeed.ops.__compatible_ops__[get_accelerator().create_op_builder("ShareMemCommBuilder").NAME] = False


def init_distributed(cuda: bool) -> None:
    """Start torch.distributed through DeepSpeed: NCCL on GPUs, gloo on CPUs."""
    import deepspeed

    if not cuda:
        _skip_deepspeed_shm_op()
    try:
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    except RuntimeError as e:  # torch's DistNetworkError among them
        if "EADDRINUSE" not in str(e) and "address already in use" not in str(e).lower():
            raise
        port = os.environ.get("MASTER_PORT")
        raise TrainError(f"port {port} is in use (another run on this machine?): give each run its own, e.g. "
                         f"`deepspeed --master_port {int(port or 29500) + 1} --module ochat.training.train ...`") from None


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Initialise torch.distributed and pick this rank's device; seeds the global RNGs with cfg.seed."""
    launched = "RANK" in os.environ
    if not launched:  # no launcher: this process is the whole job
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    cuda = torch.cuda.is_available()
    if not cuda:
        _share_cpu_cores()
    init_distributed(cuda)
    local_rank = int(os.environ.get("LOCAL_RANK", max(cfg.local_rank, 0)))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and cuda)  # CPU: float32 (exact tests, exact resume)
    return Runtime(dist.get_rank(), dist.get_world_size(), device, bf16, launched)


def _share_cpu_cores() -> None:
    """CPU ranks of one machine split its cores (as torchrun does; the DeepSpeed launcher leaves each rank all of
    them): 2 ranks x 2 threads on 2 cores ran the first step 6x slower. An OMP_NUM_THREADS the user set wins."""
    if "OMP_NUM_THREADS" not in os.environ:
        local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


class StopRequest:
    """A request to stop after the current optimizer step and save a resume state: SIGTERM (what Slurm,
    Kubernetes and spot instances send first), SIGINT (Ctrl-C), or the launcher going away.

    A second SIGINT aborts at once without saving. Further SIGTERMs do not: the DeepSpeed launcher forwards a
    signal to its ranks, so a rank often gets the same interruption twice. The DeepSpeed runner (`deepspeed`)
    forwards nothing when it is signalled alone; its ranks notice that it is gone (their launcher's parent
    changed) and stop as if signalled.
    """

    def __init__(self, watch_launcher: bool):
        self.signal: int | None = None
        self._launcher = os.getppid()
        self._launcher_parent = _parent_of(self._launcher) if watch_launcher else None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            print("ochat.training.train: interrupted again: exiting without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signal = self.signal or signum

    def requested(self) -> bool:
        if self.signal is None and self._launcher_parent is not None:
            if os.getppid() != self._launcher or _parent_of(self._launcher) != self._launcher_parent:
                self.signal = signal.SIGTERM  # the launcher is gone: nobody will forward the scheduler's signal
        return self.signal is not None

    @property
    def exit_status(self) -> int:
        """128 + the signal's number (143 for SIGTERM, 130 for SIGINT), what a shell reports for it."""
        return 128 + (self.signal or signal.SIGTERM)


def _parent_of(pid: int) -> int | None:
    """The parent of process `pid` (Linux /proc), or None when it cannot be read (gone, or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
