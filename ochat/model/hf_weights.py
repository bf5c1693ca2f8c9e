"""Hugging Face weights in and out: the one owner of checkpoint tensors for the model, the trainer and add_tokens.

- `CheckpointReader`: a checkpoint folder's tensors by name (safetensors read lazily, .bin memory-mapped), so
  no caller needs the whole state dict in memory; `check_names` compares them with a model's parameters.
- `read_state_dict`: every tensor of a checkpoint folder by name, checked against a model (what add_tokens
  edits).
- `load_weights`: fill a model built on the meta device (no second copy of the weights).
- `load_partitioned`: ZeRO-3, a model built already partitioned, filled one parameter at a time.
- `full_state_dict`: the module's tensors on rank 0, gathered parameter by parameter under ZeRO-3 (a no-op
  gather otherwise), so a checkpoint is written the same way whatever the DeepSpeed stage.
- `save_weights`: config.json + safetensors, sharded with Hugging Face's index above 5 GB; `save_config`:
  config.json alone.

Expert layers: ochat stacks each layer's experts in one parameter per projection, the checkpoints keep the Hub's
per-expert tensors (gpt-oss: transformers' stacked tensors, in their own layout); `checkpoint_names` /
`from_checkpoint` / `to_checkpoint` (ochat.model.experts) map between them, so every reader and writer here deals in
the model's parameter names.

MXFP4 checkpoints (the Hub's gpt-oss): `CheckpointReader` lists each pair `<name>_blocks` / `<name>_scales` as the
one tensor `<name>`, with transformers' dequantised shape, and dequantises it (to bfloat16, exactly: ochat.model.mxfp4)
when it is read: one tensor at a time, an expert-parallel rank only its experts. Every writer writes plain tensors.

Tied embeddings: `lm_head.weight` is the embedding matrix itself; it is never read from nor written to a
checkpoint (transformers does the same), so every writer and reader treats a tied model alike.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Callable

import torch
import torch.nn as nn

from ochat.model import expert_parallel, mxfp4
from ochat.model.config import ModelConfig
from ochat.model.experts import checkpoint_names, from_checkpoint, to_checkpoint
from ochat.utils.ranks import is_main

TIED_NAME = "lm_head.weight"
MAX_SHARD_BYTES = 5 * 2**30


class CheckpointReader:
    """Tensors of a Hugging Face checkpoint folder, read one at a time by name."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._where: dict[str, str] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._bin: dict[str, dict] = {}
        for f in _weight_files(self.path):
            try:
                shapes = self._open(f)
            except Exception as e:  # safetensors' and pickle's errors: a damaged or foreign file, one line
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ValueError(f"{f}: cannot read its weights ({first})") from None
            shapes = {k: v for k, v in shapes.items() if not k.endswith("rotary_emb.inv_freq")}
            self._shape.update(shapes)
            self._where.update((k, f) for k in shapes)
        self._packed = mxfp4.packed_names(self._where)  # MXFP4 weights: listed by their dequantised name and shape
        for name, (blocks, scales) in self._packed.items():
            try:
                self._shape[name] = mxfp4.dequantized_shape(name, self._shape.pop(blocks), self._shape.pop(scales))
            except ValueError as e:
                raise ValueError(f"{self.path}: {e}") from None

    def _open(self, f: str) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor of one weights file (a .bin is memory-mapped, and refused if its pickle
        holds anything but tensors and plain values)."""
        if f.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(f, framework="pt") as fh:
                return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        self._bin[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        return {k: tuple(v.shape) for k, v in self._bin[f].items()}

    def names(self) -> set[str]:
        """The checkpoint's tensors (an MXFP4 weight by its dequantised name, not its blocks' and scales')."""
        return set(self._shape)

    def check_names(self, model: nn.Module, config: ModelConfig) -> list[str]:
        """The model's parameter names (a tied lm_head counted once), after checking that the checkpoint
        has the tensors of each of them and nothing else; raises ValueError naming the differences."""
        params = [n for n, _ in model.named_parameters()]  # deduplicated: a tied lm_head.weight is not listed
        shapes = {}
        for n, p in model.named_parameters():
            meta = torch.empty(_full_shape(p, config), device="meta")
            shapes.update((k, tuple(t.shape)) for k, t in to_checkpoint(n, meta, config).items())
        wanted = list(shapes)
        have = self.names()
        if config.tie_word_embeddings:
            have.discard(TIED_NAME)
        elif TIED_NAME not in have:
            raise ValueError(f"{self.path}: {TIED_NAME} missing and tie_word_embeddings is false")
        missing, unexpected = sorted(set(wanted) - have), sorted(have - set(wanted))
        if missing or unexpected:
            raise ValueError(f"{self.path}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
        wrong = [n for n in wanted if self._shape[n] != shapes[n]]
        if wrong:
            n = wrong[0]
            raise ValueError(f"{self.path}: {n} has shape {list(self._shape[n])} where config.json makes it "
                             f"{list(shapes[n])} ({len(wrong)} tensor(s) differ): config.json does not describe "
                             f"these weights")
        return params

    def parameter(self, name: str, config: ModelConfig, experts: range | None = None) -> torch.Tensor:
        """The model parameter `name` from its checkpoint tensor(s); of stacked experts only `experts` (expert
        parallelism: a rank's share), read alone."""
        names = checkpoint_names(name, config)
        if experts is not None and len(names) == 1:  # all the layer's experts in one tensor (gpt-oss): read a slice
            return from_checkpoint(name, [self.get(names[0], experts)], config)
        if experts is not None:
            per_expert = len(names) // config.num_experts
            names = names[experts.start * per_expert:experts.stop * per_expert]
        return from_checkpoint(name, [self.get(n) for n in names], config)

    def get(self, name: str, rows: range | None = None) -> torch.Tensor:
        """The tensor `name` (only `rows` of its first dimension, read alone, when given); an MXFP4 weight
        dequantised to bfloat16 (exactly: ochat.model.mxfp4)."""
        if name in self._packed:
            return mxfp4.dequantize(*(self._read(n, rows) for n in self._packed[name]))
        return self._read(name, rows)

    def _read(self, name: str, rows: range | None) -> torch.Tensor:
        f = self._where[name]
        if f in self._bin:
            t = self._bin[f][name]
            return t if rows is None else t[rows.start:rows.stop]
        from safetensors import safe_open
        with safe_open(f, framework="pt") as fh:
            return fh.get_tensor(name) if rows is None else fh.get_slice(name)[rows.start:rows.stop]


def _full_shape(p: torch.Tensor, config: ModelConfig) -> tuple[int, ...]:
    """A parameter's shape in the whole model: a ZeRO-3 partition's `ds_shape`, all the layer's experts of an
    expert-parallel shard."""
    if expert_parallel.held_experts(p) is not None:
        return (config.num_experts,) + tuple(p.shape[1:])
    return tuple(getattr(p, "ds_shape", p.shape))


def _weight_files(path) -> list[str]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        p = os.path.join(path, index)
        if os.path.exists(p):
            try:
                with open(p) as f:
                    names = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{p}: not a weights index ({type(e).__name__}: {e})") from None
            outside = [n for n in names if not isinstance(n, str) or os.path.isabs(n)
                       or ".." in n.replace("\\", "/").split("/")]
            if outside:
                raise ValueError(f"{p}: shard {outside[0]!r} is not a file name inside the folder: refused")
            return [os.path.join(path, n) for n in names]
    for pattern in ("model.safetensors", "*.safetensors", "pytorch_model.bin", "*.bin"):
        files = sorted(f for f in glob.glob(os.path.join(path, pattern)) if not f.endswith("training_args.bin"))
        if files:
            return files
    raise FileNotFoundError(f"no safetensors or .bin weights in {path}")


def read_state_dict(path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of a checkpoint folder by its name in `model` (a tied lm_head.weight the checkpoint holds
    too), in the checkpoint's dtype, after checking that they are the parameters of `model` (built from the folder's
    config.json, on the meta device) with their shapes (a ValueError naming the first difference otherwise)."""
    reader = CheckpointReader(path)
    names = reader.check_names(model, model.config)
    out = {name: reader.parameter(name, model.config) for name in names}
    if TIED_NAME in reader.names() and TIED_NAME not in out:
        out[TIED_NAME] = reader.get(TIED_NAME)
    return dict(sorted(out.items()))


def tie_embeddings(model: nn.Module, config: ModelConfig) -> None:
    """Make lm_head use the embedding matrix (after the embedding was assigned a new tensor)."""
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def load_weights(model: nn.Module, path, dtype: torch.dtype, device) -> nn.Module:
    """Fill `model` (built on the meta device) with the checkpoint's tensors, cast to dtype on device; of the
    expert layers of an expert-parallel model (ochat.model.expert_parallel) only the experts this rank holds are
    read."""
    reader = CheckpointReader(path)
    names = reader.check_names(model, model.config)
    params = dict(model.named_parameters())
    tensors = {n: reader.parameter(n, model.config, expert_parallel.held_experts(params[n]))
               .to(device=device, dtype=dtype) for n in names}  # each cast as read: never the model in two dtypes
    model.load_state_dict(tensors, strict=False, assign=True)
    for n, before in params.items():  # assign=True made new Parameters: keep the marks set on the old ones
        model.get_parameter(n).__dict__.update(before.__dict__)
    tie_embeddings(model, model.config)
    return model


def load_partitioned(model: nn.Module, path) -> nn.Module:
    """ZeRO-3: fill `model`, built already partitioned over the ranks (under `deepspeed.zero.Init`), one parameter
    at a time: rank 0 reads it from the checkpoint and DeepSpeed keeps each rank's shard, so no rank ever holds the
    whole model (what lets a 70B model start on GPUs that cannot hold it whole). Collective: every rank calls it."""
    import deepspeed

    reader = CheckpointReader(path)
    params = dict(model.named_parameters())
    for name in reader.check_names(model, model.config):  # the same order on every rank: each gather is collective
        with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):
            if is_main():
                params[name].data.copy_(reader.parameter(name, model.config))
    return model


def full_state_dict(module: nn.Module, only: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor] | None:
    """Every parameter of `module` (or those whose name `only` accepts) as a contiguous CPU tensor on rank 0 (None
    on other ranks), without a tied lm_head. Under ZeRO-3 each parameter is gathered in turn, so no rank holds
    more than one extra tensor on the GPU; the experts of an expert-parallel model are gathered from their group
    (every expert, as without expert parallelism). Collective: every rank calls it."""
    import deepspeed

    out = {} if is_main() else None
    for name, p in module.named_parameters():  # a tied lm_head is listed once, as the embedding
        if only is not None and not only(name):
            continue
        if expert_parallel.held_experts(p) is not None:
            whole = expert_parallel.gather(p)
            if out is not None:
                out[name] = whole.to("cpu", copy=True).contiguous()
            continue
        with deepspeed.zero.GatheredParameters([p]):  # no-op for parameters that are not partitioned
            if out is not None:
                out[name] = p.data.detach().to("cpu", copy=True).contiguous()
    return out


def save_weights(path, state_dict: dict[str, torch.Tensor], config: ModelConfig, *,
                 max_shard_bytes: int = MAX_SHARD_BYTES, **config_overrides) -> None:
    """Write config.json (`ModelConfig.to_hf_config`: what the model type's transformers config reads) and the
    weights (`state_dict` by the model's parameter names) as safetensors under their checkpoint names, sharded above
    `max_shard_bytes` with Hugging Face's index. `config_overrides` update config.json."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    state_dict = {name: t for k, v in state_dict.items() if not (config.tie_word_embeddings and k == TIED_NAME)
                  for name, t in to_checkpoint(k, v, config).items()}
    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=max_shard_bytes)
    for fname, names in split.filename_to_tensors.items():
        save_file({n: state_dict[n] for n in names}, os.path.join(path, fname), metadata={"format": "pt"})
    if split.is_sharded:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, fh, indent=2)
    save_config(path, config, next(iter(state_dict.values())).dtype, **config_overrides)


def save_config(path, config: ModelConfig, dtype: torch.dtype, **config_overrides) -> None:
    """Write config.json (`ModelConfig.to_hf_config`, torch_dtype `dtype`, updated by `config_overrides`)."""
    hf = config.to_hf_config()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    hf.update(config_overrides)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(hf, fh, indent=2)
