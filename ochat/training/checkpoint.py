"""Hugging Face checkpoint folders of the model being trained: what `ep_N/` and `final/` hold.

A folder (`ep_N/`, `final/`: ochat.training.run_folder says where) = config.json + safetensors weights
(ochat.model.hf_weights) + the tokenizer the data was made with, written to serve exactly as trained (ochat.data.save_serving_tokenizer: its chat template renders the
training ids; the end-of-turn token is EOS) + generation_config.json + train_config.json (the resolved run
configuration; `--config` reads it back). It is written as an atomic directory (ochat.utils.atomic), so a
crash never leaves a half checkpoint. Under ZeRO-3 the weights are gathered parameter by parameter to rank 0.

With LoRA (--lora-rank) the folder holds the adapters in PEFT's format in `adapter/` (adapter_config.json +
adapter_model.safetensors, for `peft.PeftModel.from_pretrained` on the --model-path model), and config.json without
weights; with --merge-lora also the full model, adapters merged, as safetensors beside them.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from ochat.data import save_serving_tokenizer
from ochat.data.chat_formats import ChatFormat
from ochat.model import hf_weights, lora
from ochat.utils.atomic import atomic_directory
from ochat.utils.log import log
from ochat.utils.ranks import barrier, is_main

CHECKPOINT_KIND = "checkpoint"  # the kind in the folder's ochat marker


def save_hf_checkpoint(module: nn.Module, path: str, *, tokenizer, chat_format: ChatFormat, train_config_json: str,
                       base_model: str = "", merge_lora: bool = False) -> None:
    """Write a Hugging Face checkpoint of `module` (a PackedCausalLM, possibly ZeRO-3 partitioned) to `path`. With
    LoRA adapters: `adapter/` in PEFT's format (base_model_name_or_path: `base_model`), and the model's weights
    only with `merge_lora` (merged). Collective: every rank calls it."""
    adapter = lora.adapter_config(module)
    adapter_only = adapter is not None and not merge_lora
    state_dict = hf_weights.full_state_dict(module, only=lora.is_adapter_weight if adapter_only else None)
    if is_main():
        ids = dict(eos_token_id=tokenizer.eot_id, bos_token_id=tokenizer.bos_id)
        with atomic_directory(path, CHECKPOINT_KIND, overwrite=True, notify=log) as tmp:
            generation = save_serving_tokenizer(tokenizer, chat_format, tmp)
            if adapter is not None:
                lora.save_adapter(os.path.join(tmp, lora.ADAPTER_FOLDER), state_dict, adapter, module.config,
                                  base_model)
            if adapter_only:
                hf_weights.save_config(tmp, module.config, _frozen_dtype(module), **ids)
            else:
                weights = state_dict if adapter is None else lora.merged_state_dict(state_dict, adapter)
                hf_weights.save_weights(tmp, weights, module.config, **ids)
            with open(os.path.join(tmp, "generation_config.json"), "w") as fh:
                json.dump(generation, fh, indent=2)
            with open(os.path.join(tmp, "train_config.json"), "w") as fh:
                fh.write(train_config_json)
    barrier()


def _frozen_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the base model trained in (its frozen weights')."""
    return next(p.dtype for p in module.parameters() if not p.requires_grad)
