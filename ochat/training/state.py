"""Where a run stands (`TrainState`), what fixes its data order and schedule (`RunSettings`), and the
resume state: DeepSpeed's (weights, optimizer, LR scheduler) plus `run_state.json` with both of ours.

States are tags `step<global_step>` under `save_path/ds_state`; `latest` names the newest complete one and
only the newest `KEEP_STATES` are kept. run_state.json is read before DeepSpeed loads anything, so a resume
with other settings is refused before it can fail inside DeepSpeed. Training draws no random numbers (no
dropout; the data order is a pure function of the seed and the epoch), so a resumed run needs no RNG state
to continue bit for bit.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass

import numpy as np
import torch.distributed as dist

KEEP_STATES = 2  # each holds full fp32 weights + optimizer: only the newest ones are kept
RUN_STATE = "run_state.json"
_TAG = re.compile(r"step(\d+)$")


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
    ranks; `slots` = ranks x micro-steps decide the packs)."""

    dataset: str  # fingerprint: the conversation lengths and the tokenizer
    batch_max_len: int
    world_size: int
    slots: int
    seed: int
    epochs: int
    total_steps: int
    warmup_steps: int

    @staticmethod
    def dataset_fingerprint(lengths: np.ndarray, tokenizer_sha256: str | None) -> str:
        h = hashlib.sha256(np.ascontiguousarray(lengths, dtype=np.int64).tobytes())
        h.update((tokenizer_sha256 or "").encode())
        return h.hexdigest()[:16]

    def differences(self, saved: "RunSettings") -> list[str]:
        """`name: saved -> now` for each setting that differs."""
        return [f"{f.name}: {getattr(saved, f.name)} -> {getattr(self, f.name)}" for f in dataclasses.fields(self)
                if getattr(saved, f.name) != getattr(self, f.name)]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_state(engine, save_path: str, state: TrainState, settings: RunSettings, config_json: str) -> None:
    """The DeepSpeed state (weights, optimizer, scheduler) with the run's state, settings and resolved config,
    as tag `step<global_step>` (collective: every rank calls). `latest` is pointed at the new tag once every
    rank has written it; then older tags beyond the newest KEEP_STATES are deleted."""
    d = os.path.join(save_path, "ds_state")
    tag = f"step{state.global_step}"
    # save_latest=False: DeepSpeed writes `latest` on rank 0 before the other ranks are known to be done;
    # save_checkpoint ends with a barrier, so past it the tag is complete on every rank
    engine.save_checkpoint(d, tag=tag, save_latest=False)
    if _rank() == 0:
        with open(os.path.join(d, tag, "train_config.json"), "w") as fh:
            fh.write(config_json)
        with open(os.path.join(d, tag, RUN_STATE), "w") as fh:
            json.dump({"train_state": dataclasses.asdict(state), "run_settings": dataclasses.asdict(settings)}, fh,
                      indent=2)
        tmp = os.path.join(d, "latest.tmp")
        with open(tmp, "w") as fh:
            fh.write(tag)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, os.path.join(d, "latest"))  # atomic: a kill leaves the old or the new tag named
        _prune_states(d, tag)
    if dist.is_initialized():
        dist.barrier()


def _prune_states(d: str, newest: str) -> None:
    """Keep `newest` and the KEEP_STATES - 1 highest-numbered step* tags below it; delete the other step* folders
    (higher-numbered ones too: states of an earlier run in this folder that `latest` no longer names)."""
    n = int(_TAG.match(newest).group(1))
    older = sorted((int(m.group(1)), name) for name in os.listdir(d)
                   if (m := _TAG.match(name)) and name != newest and os.path.isdir(os.path.join(d, name)))
    below = [name for step, name in older if step < n]
    kept = set(below[max(len(below) - (KEEP_STATES - 1), 0):])
    for _, name in older:
        if name not in kept:
            shutil.rmtree(os.path.join(d, name), ignore_errors=True)


def latest_state(save_path: str) -> tuple[TrainState, RunSettings] | None:
    """The run's state and settings of the newest complete resume state under save_path (None: there is none)."""
    d = os.path.join(save_path, "ds_state")
    if not os.path.exists(os.path.join(d, "latest")):
        return None
    with open(os.path.join(d, "latest")) as fh:
        tag = fh.read().strip()
    with open(os.path.join(d, tag, RUN_STATE)) as fh:
        saved = json.load(fh)
    return TrainState(**saved["train_state"]), RunSettings(**saved["run_settings"])


def load_state(engine, save_path: str) -> None:
    """Load the newest DeepSpeed state (weights, optimizer, LR scheduler) into the engine."""
    engine.load_checkpoint(os.path.join(save_path, "ds_state"), load_optimizer_states=True,
                           load_lr_scheduler_states=True)
