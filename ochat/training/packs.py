"""The packs each rank trains on, step by step.

An optimizer step consumes `slots = world_size x grad_accum` packs of at most `batch_max_len` tokens. The
multipack sampler plans every epoch for that many slots at once; rank r's micro-step m takes slot
m x world_size + r. So the packs of a step depend only on the number of slots, never on how they are split
into ranks and micro-steps: 2 ranks x 1 micro-step and 1 rank x 2 micro-steps train exactly the same packs,
and a run can resume on another GPU count that keeps world_size x grad_accum.

With sequence parallelism of N, the N ranks of a group share each pack (ochat.model.sequence_parallel),
packs hold up to N x batch_max_len tokens, slots = (world_size / N) x grad_accum, group g's micro-step m
takes slot m x (world_size / N) + g, and each rank of the group collates its 1/N slice of it.

Collation runs in one DataLoader worker, ahead of the step that needs it.
"""
from __future__ import annotations

import signal
from typing import Iterator

import numpy as np
import torch

from ochat.data.reader import TokenizedDataset
from ochat.model.sequence_parallel import Layout
from ochat.training.collate import collate_for_rank
from ochat.training.multipack_sampler import MultipackDistributedBatchSampler, plan_stats


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM / SIGINT to their rank, which stops after the current step (a scheduler
    signals the whole process group: a worker killed by it would fail the step the rank is finishing)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _CollatedPacks(torch.utils.data.Dataset):
    """Packs (lists of dataset indices) -> this rank's collated tensors (its slice, under sequence parallelism).
    An empty slot becomes filler tokens of weight 0, so this rank still joins every collective."""

    def __init__(self, dataset: TokenizedDataset, packs: list[np.ndarray], filler_token: int, layout: Layout,
                 token_multiple: int):
        self.dataset, self.packs, self.filler, self.layout = dataset, packs, filler_token, layout
        self.token_multiple = token_multiple

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> dict:
        items = [self.dataset[int(j)] for j in self.packs[i]]
        return collate_for_rank(items, self.filler, self.layout, self.token_multiple)


class PackPlan:
    """Every epoch's packs for one rank, grouped by optimizer step (each epoch planned once, when first asked)."""

    def __init__(self, dataset: TokenizedDataset, batch_max_len: int, *, world_size: int, rank: int, grad_accum: int,
                 seed: int, filler_token: int, sequence_parallel: int = 1, token_multiple: int = 1):
        self.dataset, self.filler, self.grad_accum = dataset, filler_token, grad_accum
        self.token_multiple = token_multiple  # each rank's tokens per pack are padded to a multiple of it
        self.layout = Layout(world_size, rank, sequence_parallel)
        self.slots = self.layout.data_parallel_size * grad_accum
        self.sampler = MultipackDistributedBatchSampler(lengths=dataset.lengths,
                                                        batch_max_length=batch_max_len * sequence_parallel,
                                                        num_replicas=self.slots, rank=0, seed=seed)
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._epochs:
            self._epochs[epoch] = self.sampler.plan(epoch)
        return self._epochs[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        return (len(self._plan(epoch)[1]) - 1) // self.slots

    def packing_efficiency(self, epoch: int) -> float:
        """Real tokens / (steps x slots x batch_max_len) of the epoch's plan."""
        idx, off = self._plan(epoch)
        return float(plan_stats(self.dataset.lengths, idx, off, self.sampler.batch_max_length, self.slots)["efficiency"])

    def _this_rank(self, epoch: int, first_step: int) -> list[np.ndarray]:
        """This rank's packs from `first_step` on, in micro-step order."""
        idx, off = self._plan(epoch)
        return [idx[off[s * self.slots + j]:off[s * self.slots + j + 1]]
                for s in range(first_step, self.steps_in_epoch(epoch))
                for j in range(self.layout.data_parallel_rank, self.slots, self.layout.data_parallel_size)]

    def steps(self, epoch: int, first_step: int = 0, pin_memory: bool = False) -> Iterator[list[dict]]:
        """The collated micro-batches (grad_accum of them) of each step of `epoch` from `first_step` on."""
        packs = self._this_rank(epoch, first_step)
        # its own generator: creating the loader must not draw from the global RNG (exact resume)
        data = _CollatedPacks(self.dataset, packs, self.filler, self.layout, self.token_multiple)
        loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=1, pin_memory=pin_memory,
                                             prefetch_factor=2 * self.grad_accum, worker_init_fn=_ignore_stop_signals,
                                             generator=torch.Generator().manual_seed(epoch))
        it = iter(loader)
        for _ in range(len(packs) // self.grad_accum):
            yield [next(it) for _ in range(self.grad_accum)]


def eval_packs(dataset: TokenizedDataset, batch_max_len: int, *, world_size: int, rank: int,
               filler_token: int, sequence_parallel: int = 1, token_multiple: int = 1) -> Iterator[dict]:
    """The eval split packed for this rank (same token budget as training), collated one pack at a time."""
    layout = Layout(world_size, rank, sequence_parallel)
    sampler = MultipackDistributedBatchSampler(lengths=dataset.lengths, batch_max_length=batch_max_len * layout.size,
                                               num_replicas=layout.data_parallel_size,
                                               rank=layout.data_parallel_rank, seed=0)
    data = _CollatedPacks(dataset, [np.asarray(p) for p in sampler], filler_token, layout, token_multiple)
    return (data[i] for i in range(len(data)))
