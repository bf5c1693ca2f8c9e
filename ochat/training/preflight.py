"""Checks before the first step: the user errors that would otherwise fail late (or silently), and the
self-check that refuses to train when the conversations of a pack can see each other.

Every check runs alike on every rank and raises TrainError with one line saying what to change.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from ochat.config.train_config import TrainConfig
from ochat.data import TokenizedDataset, load_tokenizer, open_dataset
from ochat.data.chat_formats import ChatFormat, get_chat_format
from ochat.data.tokenizer import Tokenizer
from ochat.kernels.attention import resolve_backend
from ochat.model import sequence_parallel
from ochat.model.config import ModelConfig
from ochat.model.transforms import refusals
from ochat.training.collate import collate_for_rank
from ochat.training.runtime import TrainError
from ochat.utils.log import log
from ochat.utils.ranks import rank, world_size


def open_training_data(cfg: TrainConfig) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """The train split and the eval split (None when the dataset has no eval conversations)."""
    if not os.path.exists(os.path.join(cfg.data_path, "meta.json")):
        raise TrainError(f"{cfg.data_path}/meta.json not found: pre-tokenize with `python -m ochat.data.generate_dataset`")
    try:
        train = open_dataset(cfg.data_path, "train")
        evaluation = open_dataset(cfg.data_path, "eval") if os.path.exists(os.path.join(cfg.data_path, "eval.arrow")) else None
    except (OSError, ValueError) as e:  # pyarrow's errors derive from these
        raise TrainError(f"cannot read the dataset {cfg.data_path}: {e}") from None
    return train, evaluation if evaluation is not None and len(evaluation) else None


def check_chat_format(cfg: TrainConfig, meta: dict) -> ChatFormat:
    """The model type the dataset was made for, with the chat template it used (and --model-type, if given,
    must be it)."""
    if cfg.model_type and cfg.model_type != meta["model_type"]:
        raise TrainError(f"the dataset was tokenized for model type {meta['model_type']!r}, not {cfg.model_type!r}: "
                         f"re-run ochat.data.generate_dataset with --model-type {cfg.model_type}")
    chat_template = meta.get("chat_template") if meta["model_type"] == "chat_template" else None
    return get_chat_format(meta["model_type"], chat_template)


def _probe_texts(dataset: TokenizedDataset, tokenizer: Tokenizer, count: int = 64) -> list[str]:
    """Texts of `count` conversations spread over the dataset, decoded with the tokenizer that made them."""
    picks = np.linspace(0, len(dataset) - 1, num=min(count, len(dataset))).astype(int)
    return [tokenizer.decode(dataset[int(i)][0]) for i in np.unique(picks)]


def check_tokenizer(cfg: TrainConfig, dataset: TokenizedDataset, chat_format: ChatFormat) -> Tokenizer:
    """The tokenizer the dataset was made with (else, when its file is not here, the model folder's), after
    checking that the model folder's tokenizer has its vocabulary and end-of-turn id and splits a sample of the
    data's text into the same ids. Checkpoints carry the returned tokenizer."""
    meta = dataset.meta

    def load(path):
        try:
            return load_tokenizer(path, chat_format)
        except Exception as e:  # any loading failure is the user's folder or file: one line
            raise TrainError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from None

    model_tok = load(cfg.model_path)
    if meta.get("vocab_size") != model_tok.vocab_size or meta.get("eot_token_id") != model_tok.eot_id:
        raise TrainError(f"{cfg.data_path} was tokenized with another tokenizer (vocab {meta.get('vocab_size')}, "
                         f"end-of-turn id {meta.get('eot_token_id')}) than {cfg.model_path}'s (vocab "
                         f"{model_tok.vocab_size}, end-of-turn id {model_tok.eot_id}): re-run "
                         f"ochat.data.generate_dataset with this tokenizer")
    data_path = meta.get("tokenizer")
    if not data_path or not os.path.exists(data_path):
        log(f"the dataset's tokenizer ({data_path}) is not on this machine: {cfg.model_path}'s was checked for its "
            f"vocabulary and end-of-turn id only, and checkpoints carry it")
        return model_tok
    if os.path.samefile(data_path, cfg.model_path):  # made with the model folder's tokenizer: nothing to compare
        return model_tok
    data_tok = load(data_path)
    for text in _probe_texts(dataset, data_tok):
        if model_tok.encode_batch([text]) != data_tok.encode_batch([text]):
            differing = next((t for t in text.splitlines() if model_tok.encode_batch([t]) != data_tok.encode_batch([t])),
                             text)
            raise TrainError(f"{cfg.model_path}'s tokenizer splits the data's text into other ids than {data_path}, "
                             f"which made {cfg.data_path}: e.g. {differing[:80]!r}. Train with the tokenizer the data "
                             f"was made with (put its files in the model folder) or re-tokenize with the model's")
    return data_tok


def resolve_trainable_tokens(cfg: TrainConfig, tokenizer: Tokenizer) -> TrainConfig:
    """`cfg` with --lora-trainable-tokens as token ids: each token string looked up in the training tokenizer, one
    it lacks refused."""
    ids = []
    for item in cfg.transforms.lora_trainable_tokens:
        token_id = item if isinstance(item, int) else tokenizer.token_id(item)
        if token_id is None:
            raise TrainError(f"--lora-trainable-tokens: the tokenizer has no token {item!r} (add it first with "
                             f"`python -m ochat.training.add_tokens`, or give its id)")
        ids.append(token_id)
    if not ids:
        return cfg
    named = [f"{item}={i}" for item, i in zip(cfg.transforms.lora_trainable_tokens, ids) if isinstance(item, str)]
    if named:
        log(f"--lora-trainable-tokens: {', '.join(named)}")
    return dataclasses.replace(cfg, lora_trainable_tokens=",".join(map(str, ids)))


def check_vocabulary(vocab_size: int, tokenizer: Tokenizer) -> None:
    """The model's vocabulary must hold the tokenizer's, the end-of-turn token included."""
    if tokenizer.eot_id >= vocab_size or tokenizer.vocab_size > vocab_size:
        raise TrainError(f"the model's vocabulary ({vocab_size}) lacks the end-of-turn token {tokenizer.eot_token!r} "
                         f"(id {tokenizer.eot_id}): add it first with `python -m ochat.training.add_tokens`")


def check_attention(attn_impl: str, device: torch.device) -> str:
    """The attention backend --attn-impl means on this device (one that is not installed is refused here)."""
    try:
        return resolve_backend(attn_impl, device)
    except RuntimeError as e:
        raise TrainError(f"--attn-impl {attn_impl}: {e}") from None


def check_lengths(batch_max_len: int, sequence_parallel: int = 1, **splits: TokenizedDataset | None) -> None:
    """Every conversation must fit one pack (sequence_parallel x batch_max_len tokens)."""
    limit = f"--batch-max-len {batch_max_len}" + (f" x --sequence-parallel {sequence_parallel}"
                                                  if sequence_parallel > 1 else "")
    for name, ds in splits.items():
        if ds is not None and len(ds) and int(ds.lengths.max()) > batch_max_len * sequence_parallel:
            raise TrainError(f"the {name} split has a conversation of {int(ds.lengths.max())} tokens, longer than "
                             f"{limit}: raise --batch-max-len or --sequence-parallel, or re-tokenize with a lower "
                             f"--max-length")


def check_transforms(cfg: TrainConfig, world_size: int, device: torch.device, zero_stage: int | None = None) -> None:
    """The model transforms the flags ask for must work with this many ranks, this device, the DeepSpeed config's
    ZeRO stage and the model's shape (ochat.model.transforms.refusals: --sequence-parallel must divide the ranks and
    the attention heads, --offload-activations needs a GPU, mixture-of-experts models take none of the transforms
    not yet built for them, LoRA on experts not under ZeRO-3, --expert-parallel must divide the experts and the
    ranks, --lora-trainable-tokens' ids within the vocabulary). The model's config.json is read only when a flag
    depends on it."""
    t = cfg.transforms
    shaped = (t.sequence_parallel > 1 or t.lora_rank or t.fp8 or t.compile or t.tiled_mlp > 1 or t.offload_activations
              or t.router_aux_loss_coef is not None or t.expert_parallel > 1)
    try:
        model = ModelConfig.from_hf_config(cfg.model_path) if shaped else None
    except (OSError, ValueError) as e:
        raise TrainError(f"cannot read the model config in {cfg.model_path}: {e}") from None
    problems = refusals(cfg.transforms, zero_stage=zero_stage, cuda=device.type == "cuda", model=model,
                        world_size=world_size)
    if problems:
        raise TrainError(problems[0])


def self_check(model, vocab_size: int, device: torch.device, bf16: bool, sequence_parallel_size: int = 1,
               token_multiple: int = 1, pack_wide_scales: bool = False) -> None:
    """Refuse to train if conversations of a pack can see each other. Two comparisons on random packs:

    - isolation: replacing the first conversation's tokens must leave the later conversations' logits
      unchanged. Same shapes, same kernels: an isolated attention changes them by exactly 0 (tolerance
      1e-3 of the logit scale), while a leak changes them by about the logits' own size, in any dtype.
    - equivalence: packed logits equal each conversation run alone, to 1e-4 of the scale in float32. In
      bf16 the two runs have different shapes, so they round differently, and that noise grows with the
      model (0.22 on logits of 6.2 for a random 7B model): there only a gross mismatch (10%) is refused.

    `pack_wide_scales` (fp8 with tensorwise scaling): each linear layer quantizes the whole pack's activations
    with one scale, so a conversation's values shift the others' rounding (a few percent of the logits, not
    attention; 20% of the logit scale on a random 1.1B model): both comparisons then allow 50% of the logit scale,
    which a leaking attention still exceeds (it moves them by about their own size), and the coupling measured is
    reported. `token_multiple`: packs padded as in training (fp8 needs multiples of 16).
    """
    g = torch.Generator().manual_seed(1234)
    lens = [7, 3, 12]
    convs = [torch.randint(0, vocab_size, (n,), generator=g) for n in lens]
    other_first = torch.randint(0, vocab_size, (lens[0],), generator=g)

    layout = sequence_parallel.Layout(world_size(), rank(), sequence_parallel_size)

    def logits(conversations):
        items = [(c.numpy().astype(np.int32), np.ones(len(c), np.float32)) for c in conversations]
        b = collate_for_rank(items, 0, layout, token_multiple)
        out = model(b["input_ids"].to(device), b["position_ids"].to(device), b["cu_seqlens"].to(device),
                    b["max_seqlen"]).float()
        if sequence_parallel_size > 1:
            out = sequence_parallel.gather(out)
        return out[:sum(len(c) for c in conversations)]

    was_training = model.training
    model.eval()
    with torch.no_grad():
        packed = logits(convs)
        perturbed = logits([other_first] + convs[1:])
        alone = torch.cat([logits([c]) for c in convs])
    model.train(was_training)
    scale = max(1.0, alone.abs().max().item())
    leak = (packed - perturbed)[lens[0]:].abs().max().item()
    diff = (packed - alone).abs().max().item()
    if not leak <= (0.5 if pack_wide_scales else 1e-3) * scale:
        raise TrainError(f"self-check failed: changing one conversation of a pack changed the logits of the others by "
                         f"{leak:.3g} (logit scale {scale:.3g}): the attention backend lets conversations see each "
                         f"other. Try another --attn-impl.")
    if not diff <= (0.5 if pack_wide_scales else 0.1 if bf16 else 1e-4) * scale:
        raise TrainError(f"self-check failed: packed logits differ from per-conversation logits by {diff:.3g} "
                         f"(logit scale {scale:.3g}): positions or attention are wrong for packed input. "
                         f"Try another --attn-impl.")
    log(f"self-check passed (a pack's conversations do not see each other: {leak:.1e}; "
        f"packed vs per-conversation logits: max diff {diff:.2e} on a scale of {scale:.2g})")
    if pack_wide_scales:
        log(f"note: with --fp8 tensorwise a pack shares each layer's float8 scale, so one conversation moves another's "
            f"logits by rounding ({leak:.2g} here, on a scale of {scale:.2g}); --fp8 rowwise keeps them exactly apart")
