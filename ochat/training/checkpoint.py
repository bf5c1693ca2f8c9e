"""Hugging Face checkpoint folders of the model being trained: what `ep_N/` and `final/` hold.

A folder = config.json + safetensors weights (ochat.training.hf_weights) + the tokenizer the data was made
with, written to serve exactly as trained (ochat.data.save_serving_tokenizer: its chat template renders the
training ids; the end-of-turn token is EOS) + generation_config.json + train_config.json (the resolved run
configuration; `--config` reads it back). It is written as an atomic directory (ochat.utils.atomic), so a
crash never leaves a half checkpoint. Under ZeRO-3 the weights are gathered parameter by parameter to rank 0.
"""
from __future__ import annotations

import json
import os

import torch.distributed as dist
import torch.nn as nn

from ochat.data.chat_formats import ChatFormat
from ochat.config.train_config import TrainConfig
from ochat.data import save_serving_tokenizer
from ochat.training import hf_weights
from ochat.training.runtime import log
from ochat.training.state import RunSettings, TrainState, save_state
from ochat.utils.atomic import atomic_directory

CHECKPOINT_KIND = "checkpoint"  # the kind in the folder's ochat marker


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_hf_checkpoint(module: nn.Module, path: str, *, tokenizer, chat_format: ChatFormat, train_config_json: str) -> None:
    """Write a Hugging Face checkpoint of `module` (a PackedCausalLM, possibly ZeRO-3 partitioned) to `path`.
    Collective: every rank calls it."""
    state_dict = hf_weights.full_state_dict(module)
    if _rank() == 0:
        with atomic_directory(path, CHECKPOINT_KIND, overwrite=True, notify=log) as tmp:
            generation = save_serving_tokenizer(tokenizer, chat_format, tmp)
            hf_weights.save_weights(tmp, state_dict, module.config, eos_token_id=tokenizer.eot_id,
                                    bos_token_id=tokenizer.bos_id)
            with open(os.path.join(tmp, "generation_config.json"), "w") as fh:
                json.dump(generation, fh, indent=2)
            with open(os.path.join(tmp, "train_config.json"), "w") as fh:
                fh.write(train_config_json)
    if dist.is_initialized():
        dist.barrier()


class Saves:
    """When the trainer saves and what: a Hugging Face folder (`ep_N/`, `final/`) at the end of an epoch that
    --save-every selects and at the end of the run, each with a DeepSpeed state; a DeepSpeed state alone every
    --save-state-every steps in between."""

    def __init__(self, cfg: TrainConfig, engine, *, tokenizer, chat_format: ChatFormat, settings: RunSettings):
        self.cfg, self.engine, self.tokenizer, self.chat_format, self.settings = cfg, engine, tokenizer, chat_format, settings

    def checkpoint_due(self, epoch: int, last: bool) -> bool:
        every = self.cfg.save_every
        return not self.cfg.no_save and (last or bool(every and (epoch + 1) % every == 0))

    def state_due(self, state: TrainState) -> bool:
        """A mid-run resume point is due (not where an epoch just ended with a checkpoint, which has its own)."""
        every = self.cfg.save_state_every
        if self.cfg.no_save or not every or state.global_step % every:
            return False
        return not (state.step_in_epoch == 0 and self.checkpoint_due(state.epoch - 1, last=False))

    def save_state(self, state: TrainState) -> None:
        save_state(self.engine, self.cfg.save_path, state, self.settings, self.cfg.to_json())
        log(f"saved DeepSpeed state at epoch {state.epoch} step-in-epoch {state.step_in_epoch} "
            f"(global step {state.global_step})")

    def save_checkpoint(self, state: TrainState, name: str) -> None:
        """The Hugging Face folder `name`, then the DeepSpeed state that records it as the last checkpoint."""
        path = os.path.join(self.cfg.save_path, name)
        save_hf_checkpoint(self.engine.module, path, tokenizer=self.tokenizer, chat_format=self.chat_format,
                           train_config_json=self.cfg.to_json())
        state.last_checkpoint = path
        log(f"saved {path}")
        self.save_state(state)
