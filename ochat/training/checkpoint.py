"""Checkpoints: Hugging Face folders that transformers loads, and DeepSpeed state for exact resume.

HF checkpoint = safetensors weights + config.json + tokenizer (end-of-turn token as eos) +
generation_config.json + training_args.json. It is written to `<dir>.tmp` and renamed, so a crash
never leaves a half checkpoint. Under ZeRO-3 the weights are gathered to rank 0 first.
"""
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def _full_state_dict(engine):
    """The module's full state dict on rank 0 (None elsewhere); every rank must call it."""
    if engine.zero_optimization_stage() == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict() if _rank() == 0 else None
    if sd is None:
        return None
    out, seen = {}, {}
    for k, v in sd.items():
        t = v.detach().cpu()
        if t.data_ptr() in seen:  # tied weights: safetensors refuses shared storage
            t = t.clone()
        seen[t.data_ptr()] = k
        out[k] = t.contiguous()
    return out


def _write_weights(state_dict, path):
    from safetensors.torch import save_file
    try:
        from huggingface_hub import split_torch_state_dict_into_shards
        split = split_torch_state_dict_into_shards(state_dict, max_shard_size="5GB")
    except ImportError:
        split = None
    if split is None or not split.is_sharded:
        save_file(state_dict, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    for fname, names in split.filename_to_tensors.items():
        save_file({n: state_dict[n] for n in names}, os.path.join(path, fname), metadata={"format": "pt"})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, fh, indent=2)


def _write_tokenizer(tokenizer, model_path, path, eot_token):
    if hasattr(tokenizer, "save_hf"):
        tokenizer.save_hf(path)
    else:  # copy the source checkpoint's tokenizer files
        for f in os.listdir(model_path):
            if f.startswith(("tokenizer", "special_tokens_map", "added_tokens")):
                shutil.copy(os.path.join(model_path, f), path)
    cfg_path = os.path.join(path, "tokenizer_config.json")
    tok_cfg = {}
    if os.path.exists(cfg_path):
        with open(cfg_path) as fh:
            tok_cfg = json.load(fh)
    tok_cfg["eos_token"] = eot_token
    with open(cfg_path, "w") as fh:
        json.dump(tok_cfg, fh, indent=2)


def save_hf_checkpoint(engine, hf_config: dict, tokenizer, train_config, path, *, model_path, eot_token, eot_id, bos_id):
    """Write a Hugging Face checkpoint of the engine's model to `path` (collective: every rank calls)."""
    state_dict = _full_state_dict(engine)
    if _rank() == 0:
        tmp = path.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        dtype = next(iter(state_dict.values())).dtype
        config = dict(hf_config)
        config["eos_token_id"] = eot_id
        config["bos_token_id"] = bos_id
        config["torch_dtype"] = str(dtype).replace("torch.", "")
        _write_weights(state_dict, tmp)
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(config, fh, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as fh:
            json.dump({"bos_token_id": bos_id, "eos_token_id": eot_id, "pad_token_id": eot_id}, fh, indent=2)
        with open(os.path.join(tmp, "training_args.json"), "w") as fh:
            fh.write(train_config.to_json())
        _write_tokenizer(tokenizer, model_path, tmp, eot_token)
        if os.path.exists(path):
            old = path.rstrip("/") + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(engine, save_path, *, epoch, step_in_epoch, global_step, sampler_epoch):
    """DeepSpeed state (weights, optimizer, scheduler) + client state, under save_path/ds_state."""
    client = {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
              "sampler_epoch": sampler_epoch, "rng": rng_state()}
    engine.save_checkpoint(os.path.join(save_path, "ds_state"), tag=f"step{global_step}", client_state=client)


def load_state(engine, save_path):
    """Load the latest DeepSpeed state; returns the client state, or None when there is nothing to resume."""
    d = os.path.join(save_path, "ds_state")
    if not os.path.exists(os.path.join(d, "latest")):
        return None
    _, client = engine.load_checkpoint(d, load_optimizer_states=True, load_lr_scheduler_states=True)
    if client is None:
        return None
    set_rng_state(client["rng"])
    return client
