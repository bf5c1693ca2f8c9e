"""The multipack sampler for torch and Hugging Face code.

`multipack_sampler.py` imports numpy and numba only; the classes here add what torch and the
Hugging Face `Trainer` (and TRL's `SFTTrainer`, a `Trainer`) need:

- `MultipackBatchSampler`: the same sampler, also a `torch.utils.data.Sampler` (for code that
  checks `isinstance(..., Sampler)`). torch's `Sampler` is a plain class, not an ABC, so
  registering the numpy-only class as a virtual subclass is not possible.
- `HFMultipackBatchSampler`: for `Trainer._get_train_sampler`. It is a
  `transformers.trainer_pt_utils.BatchRebalanceSampler`, the type the Trainer passes to the
  DataLoader as `batch_sampler` and keeps accelerate from re-sharding (each rank already gets
  its own packs), and it gives the Trainer what its loop assumes: the same number of packs in
  every epoch and no empty pack.

    class PackedSFTTrainer(trl.SFTTrainer):  # or transformers.Trainer
        def _get_train_sampler(self, train_dataset=None):
            return HFMultipackBatchSampler.for_trainer(self, batch_max_length=8192, train_dataset=train_dataset)

Do not override `get_train_dataloader` with a DataLoader of the sampler instead: the Trainer
passes that loader through `accelerator.prepare`, which on N ranks deals each rank's batches
out again (rank r keeps every N-th), so most packs are never trained.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ochat.training.multipack_sampler import MultipackDistributedBatchSampler, fill_empty_packs

try:
    from transformers.trainer_pt_utils import BatchRebalanceSampler
except ImportError as e:  # older transformers: no batch-sampler hook in the Trainer
    import transformers

    raise ImportError(f"ochat.training.multipack_adapters needs a transformers release whose Trainer has the "
                      f"trainer_pt_utils.BatchRebalanceSampler hook (5.23 is tested); installed: "
                      f"{transformers.__version__}") from e

__all__ = ["MultipackBatchSampler", "HFMultipackBatchSampler"]


class MultipackBatchSampler(MultipackDistributedBatchSampler, torch.utils.data.Sampler):
    """MultipackDistributedBatchSampler that is also a torch.utils.data.Sampler; same plans."""


class HFMultipackBatchSampler(MultipackBatchSampler, BatchRebalanceSampler):
    """The multipack sampler as the Hugging Face Trainer's batch sampler (one pack = one batch).

    The Trainer takes len() of the loader once and then runs that many micro-steps every epoch,
    so every epoch here has exactly `steps_per_epoch` steps: the most that `epochs` epochs'
    plans need. An epoch that packs into fewer steps gets extra steps at its end, each pack
    filled (like an empty pack) by the longest sequence of the pack with the most sequences.
    Batches are lists of dataset indices, as the Trainer's own samplers yield.

    Args: as MultipackDistributedBatchSampler, plus
        epochs: how many epochs will be trained (fixes steps_per_epoch).
    """

    def __init__(self, batch_max_length: int, lengths, num_replicas: int | None = None, rank: int | None = None,
                 seed: int = 0, *, epochs: int = 1, drop_last: bool = False, quadratic_weight: float = 2e-5):
        super().__init__(batch_max_length, lengths, num_replicas, rank, seed, drop_last=drop_last,
                         quadratic_weight=quadratic_weight)
        self.epochs = max(1, int(epochs))
        unpadded = super().pack  # the plain plans
        self.steps_per_epoch = max((unpadded(e)[1].shape[0] - 1) // self.num_replicas for e in range(self.epochs))

    @classmethod
    def for_trainer(cls, trainer, batch_max_length: int, train_dataset=None) -> "HFMultipackBatchSampler":
        """The sampler for `trainer` (a transformers.Trainer): ranks from trainer.args, seed from
        args.data_seed (else args.seed), lengths from the dataset's `input_ids`, and as many
        epochs as the Trainer will run (args.num_train_epochs, or what args.max_steps needs)."""
        args = trainer.args
        dataset = train_dataset if train_dataset is not None else trainer.train_dataset
        lengths = [len(ids) for ids in dataset["input_ids"]] if hasattr(dataset, "column_names") else \
            [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
        seed = args.data_seed if args.data_seed is not None else args.seed
        epochs = 1 if args.max_steps > 0 else math.ceil(args.num_train_epochs)
        while True:
            sampler = cls(batch_max_length, lengths, num_replicas=max(1, args.world_size), rank=args.process_index,
                          seed=seed, epochs=epochs)
            if args.max_steps <= 0:
                return sampler
            # the Trainer runs ceil(max_steps / updates per epoch) epochs; more epochs can only
            # raise steps_per_epoch, so this settles in a second round at most
            updates = math.ceil(sampler.steps_per_epoch / args.gradient_accumulation_steps)
            needed = math.ceil(args.max_steps / updates)
            if needed <= epochs:
                return sampler
            epochs = needed

    def pack(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """One epoch's plan with exactly steps_per_epoch steps and no empty pack."""
        idx, off = super().pack(epoch)
        R = self.num_replicas
        n_packs = self.steps_per_epoch * R
        if off.shape[0] - 1 > n_packs:
            raise ValueError(f"epoch {epoch} needs {(off.shape[0] - 1) // R} steps, more than the "
                             f"{self.steps_per_epoch} of epochs 0..{self.epochs - 1}: pass epochs > {epoch}")
        if off.shape[0] - 1 == n_packs and np.all(off[1:] > off[:-1]):
            return idx, off
        if n_packs > idx.shape[0]:
            raise ValueError(f"{idx.shape[0]} sequences cannot fill {n_packs} packs ({R} ranks x "
                             f"{self.steps_per_epoch} steps): the Trainer cannot collate an empty pack")
        packs = [idx[off[k]:off[k + 1]] for k in range(off.shape[0] - 1)]
        packs += [idx[:0]] * (n_packs - len(packs))
        fill_empty_packs(packs, self.lengths)
        offsets = np.zeros(n_packs + 1, np.int64)
        np.cumsum([len(p) for p in packs], out=offsets[1:])
        return np.concatenate(packs), offsets

    def __iter__(self):
        return (batch.tolist() for batch in super().__iter__())
