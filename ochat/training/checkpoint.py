"""Checkpoints: Hugging Face folders that transformers loads, and DeepSpeed state for exact resume.

HF checkpoint = safetensors weights + config.json + tokenizer (end-of-turn token as eos) +
generation_config.json + training_args.json. It is written to `<dir>.tmp` and renamed, so a crash
never leaves a half checkpoint. Under ZeRO-3 the weights are gathered to rank 0 first, and the
starting checkpoint is loaded into an already partitioned model (`load_partitioned`).
"""
import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def load_partitioned(path, ds_config: dict, attn_impl: str = "auto"):
    """ZeRO-3: a PackedCausalLM built already partitioned over the ranks (`deepspeed.zero.Init`) and filled
    one parameter at a time (rank 0 reads it from the checkpoint, DeepSpeed keeps each rank's shard), so no
    rank ever holds the whole model: what lets a 70B model start on GPUs that cannot hold it whole.
    Collective: every rank calls it."""
    import deepspeed

    from ochat.training.model import CheckpointReader, PackedCausalLM
    from ochat.training.model_config import ModelConfig

    config = ModelConfig.from_hf_config(path)
    reader = CheckpointReader(path)
    # dtype from ds_config (bf16 or float32); an explicit dtype= is ignored on accelerators without fp16 (DeepSpeed 0.19)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = PackedCausalLM(config, attn_impl=attn_impl)
    params = dict(model.named_parameters())
    for name in reader.check_names(model):  # the same names in the same order on every rank (each gather is collective)
        with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):
            if _rank() == 0:
                params[name].data.copy_(reader.get(name))
    return model


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
    """Global RNG states; CUDA: the current device's only (each rank drives one GPU; rank 0's state is saved)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


KEEP_STATES = 2  # DeepSpeed tags kept under ds_state (full fp32 weights + optimizer each): the newest ones
_TAG = re.compile(r"step(\d+)$")


def save_state(engine, save_path, *, epoch, step_in_epoch, global_step, keep=KEEP_STATES):
    """DeepSpeed state (weights, optimizer, scheduler) + client state as tag `step<global_step>` under
    save_path/ds_state (collective: every rank calls). `latest` is pointed at the new tag only once every
    rank has written it, then rank 0 deletes all but the newest `keep` step* tags."""
    d = os.path.join(save_path, "ds_state")
    tag = f"step{global_step}"
    # (epoch, step_in_epoch) is the sampler's position: its packs are a pure function of seed and epoch
    client = {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step, "rng": rng_state()}
    # save_latest=False: DeepSpeed writes `latest` on rank 0 before the other ranks are known to be done;
    # save_checkpoint ends with a barrier, so past it the tag is complete on every rank
    engine.save_checkpoint(d, tag=tag, client_state=client, save_latest=False)
    if _rank() == 0:
        tmp = os.path.join(d, "latest.tmp")
        with open(tmp, "w") as fh:
            fh.write(tag)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, os.path.join(d, "latest"))  # atomic: a kill leaves the old or the new tag named
        _prune_states(d, tag, keep)
    if dist.is_initialized():
        dist.barrier()


def _prune_states(d, newest, keep):
    """Keep `newest` and the keep - 1 highest-numbered step* tags below it; delete the other step* folders
    (higher-numbered ones too: stale states of an earlier run in this folder, which `latest` no longer names)."""
    n = int(_TAG.match(newest).group(1))
    older = sorted((int(m.group(1)), name) for name in os.listdir(d)
                   if (m := _TAG.match(name)) and name != newest and os.path.isdir(os.path.join(d, name)))
    below = [name for step, name in older if step < n]
    kept = set(below[max(len(below) - (keep - 1), 0):])
    for _, name in older:
        if name not in kept:
            shutil.rmtree(os.path.join(d, name), ignore_errors=True)


def latest_hf_checkpoint(save_path) -> str | None:
    """The newest complete Hugging Face checkpoint folder (final/, else the highest ep_N/) under save_path."""
    if not os.path.isdir(save_path):
        return None
    epochs = [int(m.group(1)) for n in os.listdir(save_path) if (m := re.fullmatch(r"ep_(\d+)", n))]
    if os.path.isdir(os.path.join(save_path, "final")):
        return os.path.join(save_path, "final")
    return os.path.join(save_path, f"ep_{max(epochs)}") if epochs else None


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
