"""Where a run stands (`TrainState`) and what fixes its data order and schedule (`RunSettings`): the two
halves of a resume state's run_state.json (ochat.training.run_folder writes and reads it).

Training draws no random numbers (no dropout; the data order is a pure function of the seed and the epoch),
so a resumed run needs no RNG state to continue bit for bit.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass
class TrainState:
    """The position of a run: the epoch being trained, the optimizer steps of it already done, all steps
    done, and the newest complete Hugging Face checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    last_checkpoint: str | None = None

    def advance(self, steps_in_epoch: int) -> None:
        """Count one finished optimizer step; past the epoch's last step, the position is the next epoch's start."""
        self.global_step += 1
        self.step_in_epoch += 1
        if self.step_in_epoch == steps_in_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0


@dataclass(frozen=True)
class RunSettings:
    """What decides which packs each step trains, the learning-rate schedule, and how DeepSpeed partitioned its
    state. A resumed run must have the same (DeepSpeed cannot re-partition a ZeRO state for another number of
    ranks, nor for other expert-parallel groups, and each rank's expert shards are its group's; `slots` = ranks x
    micro-steps decide the packs; with LoRA the resume state holds only the adapters, so they and the base model
    must be the same too)."""

    dataset: str  # fingerprint: the conversation lengths and the tokenizer
    batch_max_len: int
    world_size: int
    slots: int
    seed: int
    epochs: int
    total_steps: int
    warmup_steps: int
    expert_parallel: int = 1  # 1 in states saved before expert-parallel runs could save any
    # the LoRA adapters trained, and the frozen base they train on: a LoRA resume state holds only the adapters
    adapters: str = "none"

    @staticmethod
    def dataset_fingerprint(lengths: np.ndarray, tokenizer_sha256: str | None) -> str:
        h = hashlib.sha256(np.ascontiguousarray(lengths, dtype=np.int64).tobytes())
        h.update((tokenizer_sha256 or "").encode())
        return h.hexdigest()[:16]

    def differences(self, saved: "RunSettings") -> list[str]:
        """`name: saved -> now` for each setting that differs."""
        return [f"{f.name}: {getattr(saved, f.name)} -> {getattr(self, f.name)}" for f in dataclasses.fields(self)
                if getattr(saved, f.name) != getattr(self, f.name)]
