"""Sequence parallelism (DeepSpeed Ulysses) on ochat's flat, packed layout: N ranks share one pack.

A pack of up to N x batch-max-len tokens is padded to a multiple of N and split into N contiguous slices, one
per rank of a sequence-parallel group. Each rank embeds its slice, applies RoPE with the slice's position ids and
runs every per-token layer (norms, projections, MLP, loss) on it alone. Only attention needs the whole
sequence: DeepSpeed's `DistributedAttention` exchanges q, k and v by all-to-all (each rank: its tokens of all
heads -> all tokens of 1/N of the heads), runs varlen attention with the pack's global `cu_seqlens` (so packed
conversations stay isolated and the result is exact) and exchanges the output back.

    N = 2, conversations [a a a a] and [b b b b b], one filler f of weight 0 to reach a multiple of N:
    pack          a a a a b | b b b b f      cu_seqlens [0 4 9 10] on both ranks
    rank 0 holds  a a a a b                  rank 1 holds b b b b f
    Labels are shifted on the whole pack first: rank 0's last b predicts rank 1's first b.

Groups follow DeepSpeed's `parallel_state_sp` (the `mpu` that `deepspeed.initialize` takes for Ulysses, whose
groups `deepspeed.utils.groups` then hands to ZeRO): ranks [i*N, (i+1)*N) form sequence-parallel group i; all
ranks together form the sequence-data-parallel group over which ZeRO shards and reduces gradients.

GQA with fewer KV heads than N (or a KV head count N does not divide) repeats the KV heads to lcm(Hkv, N), as
DeepSpeed's `UlyssesSPAttentionHF` does; the query heads must be a multiple of N. gpt-oss's attention sinks (one
learned logit per query head) go to the rank attending with those heads.

Mixture-of-experts layers route each token on its own, so a rank routes its slice alone; only the load-balancing
loss spans the pack (tokens per expert x mean router probability over all its tokens). Each rank returns its share
of it: the pack's tokens per expert and real tokens (one small all-reduce over the group per forward) with the
slice's probabilities (`PackedCausalLM._load_balancing`). The shares add up to the pack's loss and, like the
cross-entropy sums, their gradients to the pack's gradient (ochat.training.loss). The tokens per expert each rank
reports are its slice's; the step sums them over all ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ochat.kernels.attention import varlen_attention
from ochat.model.decoder import Attention


@dataclass(frozen=True)
class Layout:
    """Where a rank sits when `size` consecutive ranks share each pack (DeepSpeed's group order)."""

    world_size: int
    rank: int
    size: int = 1  # ranks per sequence-parallel group

    def __post_init__(self):
        if self.world_size % self.size:
            raise ValueError(f"--sequence-parallel {self.size} must divide the number of ranks ({self.world_size})")

    @property
    def data_parallel_size(self) -> int:
        """Groups, each training its own pack at a time."""
        return self.world_size // self.size

    @property
    def data_parallel_rank(self) -> int:
        return self.rank // self.size

    @property
    def sp_rank(self) -> int:
        """This rank's slice of its group's pack."""
        return self.rank % self.size


# the keys of a collated pack that hold one row per token (sliced per rank); the others describe the whole pack
_PER_TOKEN = ("input_ids", "position_ids", "labels", "label_weights")


def rank_slice(pack: dict, size: int, rank: int) -> dict:
    """Slice `rank` of a collated pack (ochat.training.collate) whose token count `size` divides: the per-token
    tensors cut to the slice; `cu_seqlens` and `max_seqlen` stay the whole pack's, `target_index` indexes the
    slice, `real_tokens` counts the slice's tokens that are not filler (the fillers come last), and
    `sequence_parallel` = size is added."""
    n = len(pack["input_ids"]) // size
    shard = {k: pack[k][rank * n:(rank + 1) * n] for k in _PER_TOKEN}
    shard["target_index"] = torch.nonzero(shard["label_weights"] > 0).flatten()
    real = min(max(pack.get("real_tokens", size * n) - rank * n, 0), n)
    return dict(shard, cu_seqlens=pack["cu_seqlens"], max_seqlen=pack["max_seqlen"], real_tokens=real,
                sequence_parallel=size)


def kv_repeats(num_heads: int, num_kv_heads: int, size: int) -> int:
    """How often each KV head is repeated so that `size` ranks can split the KV heads evenly with every query
    head on the rank of its KV head: lcm(num_kv_heads, size) / num_kv_heads. Errors when `size` does not
    divide the query heads."""
    if num_heads % size:
        raise ValueError(f"--sequence-parallel {size} must divide the model's {num_heads} attention heads "
                         f"(Ulysses gives each rank 1/{size} of them)")
    return size // math.gcd(num_kv_heads, size)


class UlyssesAttention:
    """`varlen_attention` with the signature of ochat.kernels.attention's, over a pack sharded on a group.

    q [T/N, Hq, D], k/v [T/N, Hkv, D] (this rank's tokens) -> [T/N, Hq, D]. `cu_seqlens` / `max_seqlen` are
    the whole pack's. A plain object (not an nn.Module): it holds no parameters and stays out of state dicts.
    """

    def __init__(self, group, num_heads: int, num_kv_heads: int):
        import deepspeed.comm as ds_dist
        from deepspeed.sequence.layer import DistributedAttention

        self.size, self.rank = ds_dist.get_world_size(group), ds_dist.get_rank(group)
        self.repeats = kv_repeats(num_heads, num_kv_heads, self.size)
        # seq-first layout [T, 1, H, D] (batch_dim_idx 1): scatter the heads (dim 2), gather the tokens (dim 0)
        self.exchange = DistributedAttention(self._attend_whole_pack, group, scatter_idx=2, gather_idx=0)

    @staticmethod
    def _attend_whole_pack(q, k, v, cu_seqlens, max_seqlen, window, backend, **variant):
        o = varlen_attention(q.squeeze(1), k.squeeze(1), v.squeeze(1), cu_seqlens, max_seqlen, window=window,
                             backend=backend, **variant)
        return o.unsqueeze(1)

    def __call__(self, q, k, v, cu_seqlens, max_seqlen, window=None, backend="auto", **variant):
        """`variant`: the model's attention variants (softmax scale, soft-capping, gpt-oss's sinks), passed on
        unchanged but for the sinks, one per query head: this rank's share of them (its heads in the exchange)."""
        if "sinks" in variant:
            variant["sinks"] = variant["sinks"].chunk(self.size)[self.rank]
        if self.repeats > 1:
            k, v = k.repeat_interleave(self.repeats, dim=1), v.repeat_interleave(self.repeats, dim=1)
        out = self.exchange(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), 1, None, cu_seqlens, max_seqlen,
                            window, backend, **variant)
        return out.squeeze(1)


def enable(model: torch.nn.Module, size: int) -> None:
    """Route every attention layer of `model` through UlyssesAttention on this rank's sequence-parallel group of
    `size` ranks and give the model the group (`PackedCausalLM.sequence_group`: an expert model's load-balancing
    loss needs the whole pack's routing counts); nothing when size is 1. The first call in a process creates
    DeepSpeed's groups: collective, every rank calls it."""
    if size == 1:
        return
    import deepspeed.comm as ds_dist
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    if mpu._SEQUENCE_PARALLEL_GROUP is None:  # made by the first call in this process
        mpu.initialize_sequence_parallel(sequence_parallel_size=size)
    assert mpu.get_sequence_parallel_world_size() == size, "the groups of another --sequence-parallel exist"
    layout = Layout(ds_dist.get_world_size(), ds_dist.get_rank(), size)
    assert mpu.get_sequence_parallel_rank() == layout.sp_rank, "DeepSpeed's group order changed"
    cfg, group = model.config, mpu.get_sequence_parallel_group()
    attention = UlyssesAttention(group, cfg.num_attention_heads, cfg.num_key_value_heads)
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    assert layers, "no attention layer found"
    for layer in layers:
        layer.attention_hook = attention
    model.sequence_group = group


def deepspeed_mpu(size: int):
    """DeepSpeed's `mpu` for `deepspeed.initialize(mpu=...)` once `enable` made the groups (ZeRO then shards and
    reduces over the sequence-data-parallel group), or None without sequence parallelism."""
    if size == 1:
        return None
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    return mpu


def gather(local: torch.Tensor) -> torch.Tensor:
    """The rows of a whole pack from each rank's slice (all-gather over this rank's sequence-parallel group,
    which `enable` created; no gradient)."""
    import deepspeed.comm as ds_dist
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    group = mpu.get_sequence_parallel_group()
    parts = [torch.empty_like(local) for _ in range(ds_dist.get_world_size(group))]
    ds_dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)
