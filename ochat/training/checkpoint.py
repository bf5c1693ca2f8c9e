"""Hugging Face checkpoint folders of the model being trained: what `ep_N/` and `final/` hold.

A folder (`ep_N/`, `final/`: ochat.training.run_folder says where) = config.json + safetensors weights
(ochat.model.hf_weights) + the tokenizer the data was made with, written to serve exactly as trained (ochat.data.save_serving_tokenizer: its chat template renders the
training ids; the end-of-turn token is EOS) + generation_config.json + train_config.json (the resolved run
configuration; `--config` reads it back). It is written as an atomic directory (ochat.utils.atomic), so a
crash never leaves a half checkpoint. Under ZeRO-3 the weights are gathered parameter by parameter to rank 0.
"""
from __future__ import annotations

import json
import os

import torch.nn as nn

from ochat.data import save_serving_tokenizer
from ochat.data.chat_formats import ChatFormat
from ochat.model import hf_weights
from ochat.utils.atomic import atomic_directory
from ochat.utils.log import log
from ochat.utils.ranks import barrier, is_main

CHECKPOINT_KIND = "checkpoint"  # the kind in the folder's ochat marker


def save_hf_checkpoint(module: nn.Module, path: str, *, tokenizer, chat_format: ChatFormat, train_config_json: str) -> None:
    """Write a Hugging Face checkpoint of `module` (a PackedCausalLM, possibly ZeRO-3 partitioned) to `path`.
    Collective: every rank calls it."""
    state_dict = hf_weights.full_state_dict(module)
    if is_main():
        with atomic_directory(path, CHECKPOINT_KIND, overwrite=True, notify=log) as tmp:
            generation = save_serving_tokenizer(tokenizer, chat_format, tmp)
            hf_weights.save_weights(tmp, state_dict, module.config, eos_token_id=tokenizer.eot_id,
                                    bos_token_id=tokenizer.bos_id)
            with open(os.path.join(tmp, "generation_config.json"), "w") as fh:
                json.dump(generation, fh, indent=2)
            with open(os.path.join(tmp, "train_config.json"), "w") as fh:
                fh.write(train_config_json)
    barrier()
