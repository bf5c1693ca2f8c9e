"""The run folder (`--save-path`): the one owner of everything a training run writes there.

    save_path/
      .ochat.lock          held (flock) by rank 0 while a run writes here; it names that run's process
      ep_N/, final/        Hugging Face checkpoints (ochat.training.checkpoint), each an atomic directory
      ds_state/stepS/      resume states: DeepSpeed's files + run_state.json (ours) + train_config.json; with
                           LoRA without the frozen base (it is --model-path's); with --expert-parallel N also
                           expert_shards_ep_rank_R.safetensors, the experts of expert-parallel rank R (with LoRA:
                           their adapters) (ours)
      ds_state/latest      the tag of the newest complete resume state
      metrics.jsonl        one JSON line per step and per eval
      wandb/               Weights & Biases files, when enabled

A folder holding checkpoints or resume states belongs to that run: a new run there continues it (--resume) or
replaces it (--overwrite: only those outputs are deleted, never through a symbolic link); metrics alone (a
failed or --no-save run) do not make the folder used. Resume states are tags `step<global_step>`; only the
newest `KEEP_STATES` are kept. run_state.json holds the run's position and settings, read before DeepSpeed
loads anything, so a resume with other settings is refused before it can fail inside DeepSpeed, and the SHA-256
of every file of the state, taken after each file was fsynced (so `latest` never names data that did not reach
the disk). --resume verifies them and falls back to the newest state that is whole, saying so; DeepSpeed's
files are loaded without running code (ochat.training.safe_states), the expert shards by safetensors.

The loop calls `after_step` once per optimizer step and `after_epoch` once per epoch; they save what is due.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil

import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ochat.config.train_config import TrainConfig
from ochat.model import expert_parallel
from ochat.training.checkpoint import save_hf_checkpoint
from ochat.training.runtime import TrainError
from ochat.training.state import RunSettings, TrainState
from ochat.utils.atomic import fsync_path
from ochat.utils.log import log
from ochat.utils.ranks import barrier, is_main, rank, world_size

KEEP_STATES = 2  # each holds full fp32 weights + optimizer: only the newest ones are kept
RUN_STATE = "run_state.json"
LOCK = ".ochat.lock"
STATES = "ds_state"
METRICS = "metrics.jsonl"
EXPERT_SHARDS = "expert_shards_ep_rank_"  # + R.safetensors: what DeepSpeed's files lack (ochat.model.expert_parallel)
_TAG = re.compile(r"step(\d+)$")
_PER_RANK = re.compile(rf"(?:zero_pp_rank_|{EXPERT_SHARDS})(\d+)[_.]")  # files that one rank writes
_OUTPUTS = re.compile(r"ep_\d+|final|ds_state")  # what makes the folder a run's: checkpoints and resume states


class RunFolder:
    """--save-path of one run: checked and locked by `open`, saved into by the loop once `bind` gave it the
    engine and what checkpoints carry."""

    def __init__(self, cfg: TrainConfig, lock=None):
        self.cfg, self.path, self._lock = cfg, cfg.save_path, lock
        self.engine = self.tokenizer = self.chat_format = self.settings = None
        self.last_state: str | None = None  # the newest resume state this run saved or resumed from
        self._resume_tag: str | None = None  # the state `latest` chose to resume from

    # ---------------------------------------------------------------- paths
    @property
    def states_dir(self) -> str:
        return os.path.join(self.path, STATES)

    @property
    def _adapters_only(self) -> bool:
        """LoRA: resume states hold only the trainable adapters (the frozen base is reloaded from --model-path)."""
        return self.cfg.lora_rank > 0

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.path, METRICS)

    def checkpoint_path(self, name: str) -> str:
        return os.path.join(self.path, name)

    # ---------------------------------------------------------------- start
    @classmethod
    def open(cls, cfg: TrainConfig) -> "RunFolder":
        """Check that this run may write cfg.save_path and take it: a previous run there is continued (--resume)
        or replaced (--overwrite: only its own outputs are deleted), never silently mixed with this one. Rank 0
        holds the lock for the run. Collective."""
        path = cfg.save_path
        if os.path.exists(path) and not os.path.isdir(path):
            raise TrainError(f"--save-path {path} is a file, not a folder")
        previous = previous_run_outputs(path)
        if previous and not (cfg.resume or cfg.overwrite):
            raise TrainError(f"--save-path {path} holds a previous run ({', '.join(previous)}): continue it with "
                             f"--resume, replace it with --overwrite, or choose another folder")
        lock = None
        if is_main():
            lock = _take_lock(path)
            for name in previous if cfg.overwrite else []:
                _remove_output(os.path.join(path, name))
        barrier()  # the other ranks start once rank 0 has made the folder
        return cls(cfg, lock)

    def check_disk_space(self, num_params: int, bf16: bool, bf16_master: bool = False, adapters: int | None = None,
                         merged: bool = False) -> None:
        """Room for what the run keeps at its peak: `final/` (2 or 4 bytes per parameter), KEEP_STATES resume
        states and the one being written (each: the master weights and two Adam moments, 12 bytes per parameter
        in float32 or 6 in bf16, plus the module's copy). With LoRA (`adapters`: its trainable parameters) the
        states hold only those, final/ their float32 adapter/ and the whole model only when `merged`
        (--merge-lora)."""
        weights = 2 if bf16 else 4
        trained = num_params if adapters is None else adapters
        final = (num_params * weights if adapters is None or merged else 0) + (0 if adapters is None else 4 * adapters)
        need = final + (KEEP_STATES + 1) * trained * ((6 if bf16_master else 12) + weights)
        free = shutil.disk_usage(self.path).free
        if free < need:
            raise TrainError(f"--save-path {self.path} has {free / 2**30:.1f} GiB free, and a checkpoint plus "
                             f"{KEEP_STATES + 1} resume states of this {num_params / 1e9:.2f}B-parameter model need about "
                             f"{need / 2**30:.1f} GiB: free space, choose another folder, or pass --no-save")

    def bind(self, engine, *, tokenizer, chat_format, settings: RunSettings) -> None:
        """What saves need: the DeepSpeed engine, the tokenizer and chat format checkpoints serve with, and the
        settings resume states record."""
        self.engine, self.tokenizer, self.chat_format, self.settings = engine, tokenizer, chat_format, settings

    # ---------------------------------------------------------------- the loop's calls
    def after_step(self, state: TrainState) -> None:
        """Save a mid-run resume state when --save-state-every makes one due (not where an epoch just ended with
        a checkpoint, which has its own)."""
        every = self.cfg.save_state_every
        if self.cfg.no_save or not every or state.global_step % every:
            return
        if not (state.step_in_epoch == 0 and self.checkpoint_due(state.epoch - 1, last=False)):
            self.save_state(state)

    def after_epoch(self, state: TrainState, epoch: int, last: bool) -> bool:
        """Write `ep_N/` (or `final/` after the last step) when --save-every makes it due; returns whether it did."""
        if not self.checkpoint_due(epoch, last):
            return False
        self.save_checkpoint(state, "final" if last else f"ep_{epoch}")
        return True

    def checkpoint_due(self, epoch: int, last: bool) -> bool:
        every = self.cfg.save_every
        return not self.cfg.no_save and (last or bool(every and (epoch + 1) % every == 0))

    # ---------------------------------------------------------------- saving
    def save_checkpoint(self, state: TrainState, name: str) -> None:
        """The Hugging Face folder `name`, then the resume state that records it as the last checkpoint."""
        path = self.checkpoint_path(name)
        save_hf_checkpoint(self.engine.module, path, tokenizer=self.tokenizer, chat_format=self.chat_format,
                           train_config_json=self.cfg.to_json(), base_model=self.cfg.model_path,
                           merge_lora=self.cfg.merge_lora)
        state.last_checkpoint = path
        log(f"saved {path}")
        self.save_state(state)

    @property
    def writes_states(self) -> bool:
        """Whether the run writes resume states: not with --no-save."""
        return not self.cfg.no_save

    def save_state(self, state: TrainState) -> None:
        """The DeepSpeed state (weights, optimizer, scheduler) with the run's state, settings, resolved config and
        the checksums of its files, as tag `step<global_step>` (collective: every rank calls). `latest` is pointed
        at the new tag once every rank has written and fsynced its files; then tags beyond the newest
        KEEP_STATES are deleted. Nothing where the run writes no resume states."""
        if not self.writes_states:
            return
        d, tag = self.states_dir, f"step{state.global_step}"
        folder = os.path.join(d, tag)
        try:
            # save_latest=False: DeepSpeed writes `latest` on rank 0 before the other ranks are known to be done
            self.engine.save_checkpoint(d, tag=tag, save_latest=False, exclude_frozen_parameters=self._adapters_only)
            self._save_expert_shards(folder)
            sums = _gather(_checksums(folder, _own_files(folder)))
            if is_main():
                _write_synced(os.path.join(folder, "train_config.json"), self.cfg.to_json())
                _write_synced(os.path.join(folder, RUN_STATE), json.dumps(
                    {"train_state": dataclasses.asdict(state), "run_settings": dataclasses.asdict(self.settings),
                     "files": dict(sorted(sums.items()))}, indent=2))
                _write_synced(os.path.join(d, "latest.tmp"), tag)
                os.replace(os.path.join(d, "latest.tmp"), os.path.join(d, "latest"))  # a kill leaves old or new
                fsync_path(d)
                _prune_states(d, tag)
        except OSError as e:
            raise TrainError(f"cannot write the resume state {folder}: {e.strerror or e}. The newest good state is "
                             f"{self.last_state or 'none'}: free space and run again with --resume") from None
        barrier()
        self.last_state = folder
        log(f"saved DeepSpeed state at epoch {state.epoch} step-in-epoch {state.step_in_epoch} "
            f"(global step {state.global_step})")

    def _save_expert_shards(self, folder: str) -> None:
        """With --expert-parallel: the trained experts (with LoRA: their adapters) of this rank's expert-parallel
        rank R, when it is the first rank holding them (global rank R)."""
        if self.cfg.expert_parallel == 1:
            return
        ep_rank, ep_data_rank = expert_parallel.ranks(self.cfg.expert_parallel)
        if ep_data_rank == 0:
            save_file(expert_parallel.shards(self.engine.module), _expert_shards_file(folder, ep_rank))
        # safetensors writes a `.tmp...` file and renames it: no rank lists the folder (to checksum its files)
        # while another may still be writing one
        barrier()

    # ---------------------------------------------------------------- resuming
    def latest(self) -> tuple[TrainState, RunSettings] | None:
        """The run's state and settings of the newest whole resume state (None: there is none). A damaged newer
        state (a file missing, cut or changed, run_state.json unreadable) is passed over with one line saying
        so; `latest` naming a state that is gone counts as damaged. Collective: each rank verifies its files."""
        tags = _state_tags(self.states_dir)
        if not tags:
            return None
        for tag in tags:
            folder = os.path.join(self.states_dir, tag)
            problem = _gather_problem(_verify(folder))
            if problem is None:
                with open(os.path.join(folder, RUN_STATE)) as fh:
                    saved = json.load(fh)
                if tag != tags[0]:
                    log(f"resume state {os.path.join(self.states_dir, tags[0])} is damaged or incomplete: resuming "
                        f"from {folder}, the newest whole one")
                self._resume_tag, self.last_state = tag, folder
                return TrainState(**saved["train_state"]), RunSettings(**saved["run_settings"])
            log(f"resume state {folder} is not usable: {problem}")
        raise TrainError(f"--resume: no whole resume state under {self.states_dir} (each is damaged, see above): "
                         f"start again with --overwrite, or from a checkpoint (--model-path {self.path}/ep_N)")

    def load_state(self) -> None:
        """Load the state `latest` chose (weights, optimizer, LR scheduler) into the bound engine, without running
        code from its files."""
        from ochat.training.safe_states import SafeCheckpointEngine, UnsafeState

        self.engine.checkpoint_engine = SafeCheckpointEngine(self.engine._config)
        try:
            self.engine.load_checkpoint(self.states_dir, tag=self._resume_tag, load_optimizer_states=True,
                                        load_lr_scheduler_states=True, load_module_strict=not self._adapters_only)
        except UnsafeState as e:
            raise TrainError(f"--resume: {e}; only states ochat wrote can be resumed") from None
        self._load_expert_shards()

    def _load_expert_shards(self) -> None:
        """With --expert-parallel: this rank's trained experts (with LoRA: their adapters), over those of rank 0 that
        DeepSpeed loaded (safetensors: no code runs, whatever the file holds)."""
        if self.cfg.expert_parallel == 1:
            return
        path = _expert_shards_file(os.path.join(self.states_dir, self._resume_tag),
                                   expert_parallel.ranks(self.cfg.expert_parallel)[0])
        try:
            expert_parallel.load_shards(self.engine.module, load_file(path))
        except (ValueError, SafetensorError) as e:
            raise TrainError(f"--resume: {path}: {e}; only states ochat wrote can be resumed") from None

    def close(self) -> None:
        """The run is over: its lock goes (a lock file left by a killed run is harmless: see `_take_lock`)."""
        if self._lock is not None:
            os.remove(os.path.join(self.path, LOCK))
            self._lock.close()
            self._lock = None


def previous_run_outputs(save_path: str) -> list[str]:
    """The outputs of an earlier run in save_path: ep_N/, final/, ds_state/. (The temporary folder of an
    interrupted checkpoint write is ochat.utils.atomic's to clean.)"""
    if not os.path.isdir(save_path):
        return []
    return sorted(n for n in os.listdir(save_path) if _OUTPUTS.fullmatch(n))


def _take_lock(path: str):
    """Make the folder and hold its lock file (flock) for the run; the lock names this process. The lock of a
    process that ended without removing it is free again (flock dies with its holder): taken over with a note."""
    try:
        os.makedirs(path, exist_ok=True)
        lock = open(os.path.join(path, LOCK), "a+")
    except OSError as e:
        raise TrainError(f"--save-path {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise TrainError(f"--save-path {path} is being written by another run (it holds "
                         f"{os.path.join(path, LOCK)}): wait for it or choose another folder") from None
    lock.seek(0)
    holder = lock.read().strip()
    if holder:
        log(f"{os.path.join(path, LOCK)} was left by process {holder}, which has ended: taken over")
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def _remove_output(path: str) -> None:
    """Delete one output of the previous run (--overwrite), never through a symbolic link."""
    if os.path.islink(path):
        raise TrainError(f"--overwrite: {path} is a symbolic link; ochat does not delete through links: remove "
                         f"or move it yourself")
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _state_tags(d: str) -> list[str]:
    """Resume-state tags to try, best first: the one `latest` names (it may be gone), then the others by step,
    newest first."""
    if not os.path.isdir(d):
        return []
    tags = sorted((name for name in os.listdir(d) if _TAG.match(name) and os.path.isdir(os.path.join(d, name))),
                  key=lambda name: -int(_TAG.match(name).group(1)))
    try:
        with open(os.path.join(d, "latest")) as fh:
            named = fh.read().strip()
    except OSError:
        return tags
    if _TAG.match(named):  # states above the one `latest` names belong to an earlier run: not resumed
        step = int(_TAG.match(named).group(1))
        return [named] + [t for t in tags if int(_TAG.match(t).group(1)) < step]
    return tags


def _expert_shards_file(folder: str, ep_rank: int) -> str:
    return os.path.join(folder, f"{EXPERT_SHARDS}{ep_rank}.safetensors")


def _owner(name: str) -> int:
    """The rank that checksums a file of a state folder: the one that wrote it. DeepSpeed's per-rank files
    `zero_pp_rank_R_...` and the expert shards `expert_shards_ep_rank_R...` rank R, every other file rank 0 (the
    ranks' shares split the work, also without a shared file system)."""
    m = _PER_RANK.match(name)
    return int(m.group(1)) % world_size() if m else 0


def _own_files(folder: str) -> list[str]:
    """The files of a state folder that this rank checksums."""
    return [name for name in sorted(os.listdir(folder)) if _owner(name) == rank()]


def _checksums(folder: str, names: list[str]) -> dict[str, str]:
    """SHA-256 of each named file of `folder`, after fsyncing it."""
    out = {}
    for name in names:
        path = os.path.join(folder, name)
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        out[name] = h.hexdigest()
    return out


def _verify(folder: str) -> str | None:
    """What is wrong with this rank's share of a state folder (None: nothing)."""
    try:
        with open(os.path.join(folder, RUN_STATE)) as fh:
            saved = json.load(fh)
        TrainState(**saved["train_state"])
        RunSettings(**saved["run_settings"])
    except FileNotFoundError:
        return f"{RUN_STATE} missing (the save did not finish, or the state is gone)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{RUN_STATE} unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    recorded = saved.get("files")
    if recorded is None:
        log(f"{folder} was saved without checksums (by an earlier ochat): not verified")
        return None
    mine = [name for name in recorded if _owner(name) == rank()]
    missing = [name for name in mine if not os.path.exists(os.path.join(folder, name))]
    if missing:
        return f"{missing[0]} missing"
    changed = [name for name, h in _checksums(folder, mine).items() if recorded[name] != h]
    if changed:
        return f"{changed[0]} differs from the checksum recorded when it was saved"
    return None


def _gather(sums: dict[str, str]) -> dict[str, str]:
    """Every rank's checksums, merged (on every rank)."""
    if not dist.is_initialized() or world_size() == 1:
        return sums
    parts = [None] * world_size()
    dist.all_gather_object(parts, sums)
    return {k: v for part in parts for k, v in part.items()}


def _gather_problem(problem: str | None) -> str | None:
    """The first rank's problem with a state, the same on every rank (None: every rank found it whole)."""
    if not dist.is_initialized() or world_size() == 1:
        return problem
    parts = [None] * world_size()
    dist.all_gather_object(parts, problem)
    return next((p for p in parts if p is not None), None)


def _write_synced(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


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
