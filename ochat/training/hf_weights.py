"""Hugging Face weights in and out: the one owner of checkpoint tensors for the model, the trainer and add_tokens.

- `CheckpointReader`: a checkpoint folder's tensors by name (safetensors read lazily, .bin memory-mapped), so
  no caller needs the whole state dict in memory; `check_names` compares them with a model's parameters.
- `read_state_dict`: every tensor of a checkpoint folder by name (what add_tokens edits).
- `load_weights`: fill a model built on the meta device (no second copy of the weights).
- `load_partitioned`: ZeRO-3, a model built already partitioned and filled one parameter at a time.
- `full_state_dict`: the module's tensors on rank 0, gathered parameter by parameter under ZeRO-3 (a no-op
  gather otherwise), so a checkpoint is written the same way whatever the DeepSpeed stage.
- `save_weights`: config.json + safetensors, sharded with Hugging Face's index above 5 GB.

Tied embeddings: `lm_head.weight` is the embedding matrix itself; it is never read from nor written to a
checkpoint (transformers does the same), so every writer and reader treats a tied model alike.
"""
from __future__ import annotations

import glob
import json
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from ochat.training.model_config import ModelConfig

TIED_NAME = "lm_head.weight"
MAX_SHARD_BYTES = 5 * 2**30


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class CheckpointReader:
    """Tensors of a Hugging Face checkpoint folder, read one at a time by name."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._where: dict[str, str] = {}
        self._bin: dict[str, dict] = {}
        for f in _weight_files(self.path):
            if f.endswith(".safetensors"):
                from safetensors import safe_open
                with safe_open(f, framework="pt") as fh:
                    keys = list(fh.keys())
            else:
                self._bin[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                keys = list(self._bin[f])
            self._where.update((k, f) for k in keys if not k.endswith("rotary_emb.inv_freq"))

    def names(self) -> set[str]:
        return set(self._where)

    def check_names(self, model: nn.Module, config: ModelConfig) -> list[str]:
        """The model's parameter names (a tied lm_head counted once), after checking that the checkpoint
        has each of them and nothing else; raises ValueError naming the differences."""
        wanted = [n for n, _ in model.named_parameters()]  # deduplicated: a tied lm_head.weight is not listed
        have = self.names()
        if config.tie_word_embeddings:
            have.discard(TIED_NAME)
        elif TIED_NAME not in have:
            raise ValueError(f"{self.path}: {TIED_NAME} missing and tie_word_embeddings is false")
        missing, unexpected = sorted(set(wanted) - have), sorted(have - set(wanted))
        if missing or unexpected:
            raise ValueError(f"{self.path}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
        return wanted

    def get(self, name: str) -> torch.Tensor:
        f = self._where[name]
        if f in self._bin:
            return self._bin[f][name]
        from safetensors import safe_open
        with safe_open(f, framework="pt") as fh:
            return fh.get_tensor(name)


def _weight_files(path) -> list[str]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        p = os.path.join(path, index)
        if os.path.exists(p):
            with open(p) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, n) for n in names]
    for pattern in ("model.safetensors", "*.safetensors", "pytorch_model.bin", "*.bin"):
        files = sorted(f for f in glob.glob(os.path.join(path, pattern)) if not f.endswith("training_args.bin"))
        if files:
            return files
    raise FileNotFoundError(f"no safetensors or .bin weights in {path}")


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, by its Hugging Face name, in the checkpoint's dtype."""
    reader = CheckpointReader(path)
    return {name: reader.get(name) for name in sorted(reader.names())}


def tie_embeddings(model: nn.Module, config: ModelConfig) -> None:
    """Make lm_head use the embedding matrix (after the embedding was assigned a new tensor)."""
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def load_weights(model: nn.Module, path, dtype: torch.dtype, device) -> nn.Module:
    """Fill `model` (built on the meta device) with the checkpoint's tensors, cast to dtype on device."""
    reader = CheckpointReader(path)
    names = reader.check_names(model, model.config)
    model.load_state_dict({n: reader.get(n).to(device=device, dtype=dtype) for n in names}, strict=False, assign=True)
    tie_embeddings(model, model.config)
    return model


def load_partitioned(path, ds_config: dict, attn_impl: str = "auto") -> nn.Module:
    """ZeRO-3: a PackedCausalLM built already partitioned over the ranks (`deepspeed.zero.Init`) and filled
    one parameter at a time (rank 0 reads it from the checkpoint, DeepSpeed keeps each rank's shard), so no
    rank ever holds the whole model: what lets a 70B model start on GPUs that cannot hold it whole.
    Collective: every rank calls it."""
    import deepspeed

    from ochat.training.model import PackedCausalLM

    config = ModelConfig.from_hf_config(path)
    reader = CheckpointReader(path)
    # dtype from ds_config (bf16 or float32)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = PackedCausalLM(config, attn_impl=attn_impl)
    params = dict(model.named_parameters())
    for name in reader.check_names(model, config):  # the same order on every rank: each gather is collective
        with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):
            if _rank() == 0:
                params[name].data.copy_(reader.get(name))
    return model


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """Every parameter of `module` as a contiguous CPU tensor on rank 0 (None on other ranks), without a tied
    lm_head. Under ZeRO-3 each parameter is gathered in turn, so no rank holds more than one extra tensor on
    the GPU. Collective: every rank calls it."""
    import deepspeed

    out = {} if _rank() == 0 else None
    for name, p in module.named_parameters():  # a tied lm_head is listed once, as the embedding
        with deepspeed.zero.GatheredParameters([p]):  # no-op for parameters that are not partitioned
            if out is not None:
                out[name] = p.data.detach().to("cpu", copy=True).contiguous()
    return out


def save_weights(path, state_dict: dict[str, torch.Tensor], config: ModelConfig, *,
                 max_shard_bytes: int = MAX_SHARD_BYTES, **config_overrides) -> None:
    """Write config.json (`ModelConfig.to_hf_config`: what the model type's transformers config reads) and the
    weights as safetensors, sharded above `max_shard_bytes` with Hugging Face's index. `config_overrides` update
    config.json."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    state_dict = {k: v for k, v in state_dict.items() if not (config.tie_word_embeddings and k == TIED_NAME)}
    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=max_shard_bytes)
    for fname, names in split.filename_to_tensors.items():
        save_file({n: state_dict[n] for n in names}, os.path.join(path, fname), metadata={"format": "pt"})
    if split.is_sharded:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, fh, indent=2)
    hf = config.to_hf_config()
    hf["torch_dtype"] = str(next(iter(state_dict.values())).dtype).removeprefix("torch.")
    hf.update(config_overrides)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(hf, fh, indent=2)
