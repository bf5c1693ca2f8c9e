"""Collate one pack of conversations into flat, padding-free tensors: the one owner of collation.

Example: a pack of two conversations, tokens [a b c] and [d e] with target weights [0 1 1], [0 1]:

    input_ids    = [a b c d e]
    position_ids = [0 1 2 0 1]          (restart at 0 per conversation)
    cu_seqlens   = [0 3 5]              (int32 boundaries for varlen attention)
    labels       = [b c 0 e 0]          (next token inside the same conversation)
    label_weights= [1 1 0 1 0]          (weight of the label as a target; last token of each conversation 0)
    target_index = [0 1 3]              (rows with weight > 0, computed here on the CPU)

`collate_for_rank` is what training collates: a pack padded with weight-0 filler tokens (a conversation of
their own, after the `real_tokens` of the pack) to the multiple that float8 matmuls or sequence parallelism
need, then, under sequence parallelism, this rank's slice of it (`ochat.model.sequence_parallel.rank_slice`).
"""
from __future__ import annotations

import numpy as np
import torch

from ochat.model.sequence_parallel import Layout, rank_slice


def collate_pack(items):
    """items: list of (tokens int32 [L], weights float32 [L]) -> dict of CPU tensors (see module doc)."""
    lengths = np.fromiter((len(t) for t, _ in items), dtype=np.int64, count=len(items))
    total = int(lengths.sum())
    input_ids = np.empty(total, dtype=np.int64)
    position_ids = np.empty(total, dtype=np.int64)
    labels = np.zeros(total, dtype=np.int64)
    label_weights = np.zeros(total, dtype=np.float32)
    cu = np.zeros(len(items) + 1, dtype=np.int32)
    pos = 0
    for i, (tokens, weights) in enumerate(items):
        n = len(tokens)
        input_ids[pos:pos + n] = tokens
        position_ids[pos:pos + n] = np.arange(n)
        if n > 1:
            labels[pos:pos + n - 1] = tokens[1:]
            label_weights[pos:pos + n - 1] = weights[1:]  # weights[i] is the weight of token i as a target
        pos += n
        cu[i + 1] = pos
    target_index = np.flatnonzero(label_weights > 0).astype(np.int64)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "position_ids": torch.from_numpy(position_ids),
        "cu_seqlens": torch.from_numpy(cu if items else np.zeros(0, dtype=np.int32)),
        "max_seqlen": int(lengths.max()) if len(items) else 0,
        "labels": torch.from_numpy(labels),
        "label_weights": torch.from_numpy(label_weights),
        "target_index": torch.from_numpy(target_index),
        "real_tokens": total,  # tokens that are not filler (collate_for_rank's fillers come after them)
    }


def collate_for_rank(items, filler_token: int, layout: Layout = Layout(1, 0), token_multiple: int = 1) -> dict:
    """This rank's collated share of a pack of (tokens, weights) items shared by `layout.size` ranks.

    The pack is padded with weight-0 `filler_token`s, as a conversation of their own in cu_seqlens, to a positive
    multiple of `layout.size` x `token_multiple` (an empty pack becomes that many fillers, so every rank joins
    every collective; float8 matmuls need each rank's token count divisible by 16: ochat.model.fp8), collated
    whole (labels shifted across slice boundaries), then cut to this rank's slice.
    """
    total, multiple = sum(len(t) for t, _ in items), layout.size * token_multiple
    pad = -total % multiple if total else multiple
    if pad:
        items = list(items) + [(np.full(pad, filler_token, np.int32), np.zeros(pad, np.float32))]
    pack = collate_pack(items) | {"real_tokens": total}  # without the fillers
    return pack if layout.size == 1 else rank_slice(pack, layout.size, layout.sp_rank)
