"""Expert parallelism (`--expert-parallel N`): the N ranks of a group split each expert layer's experts, and every
token reaches its experts on whichever rank holds them by all-to-all.

Groups are DeepSpeed's (`deepspeed.utils.groups._create_expert_and_data_parallel`, named `ep_size_N`), carved out of
the data-parallel ranks as in DeepSpeed-MoE and Megatron:

    8 ranks, N = 4:   expert-parallel groups       [0 1 2 3] [4 5 6 7]   (all-to-all; rank r holds experts of slot r % N)
                      expert-data-parallel groups  [0 4] [1 5] [2 6] [3 7]   (the same experts: their gradients reduced)
                      data parallel                [0 .. 7]   (every rank trains its own packs)

Every rank runs its own packs; attention, norms, embeddings, the router and any shared expert are replicated (data
parallel over all ranks). Of each layer's E stacked experts a rank holds the E / N of its slot (`ShardedExperts`,
experts [slot x E/N, (slot + 1) x E/N), still named `mlp.experts.gate_up_proj` / `down_proj` and gpt-oss's biases
`gate_up_proj_bias` / `down_proj_bias`), replicated over its
expert-data-parallel group of world / N ranks.

Dispatch and combine, in `ShardedExperts.run_sorted` (the router ran on this rank's tokens, in float32, as without
expert parallelism; the (token, expert) rows arrive sorted by expert, hence by the rank holding it):

    1. the rows per expert are exchanged (all-to-all of counts [N, E/N]): what each rank will send and receive;
    2. the rows go to the ranks holding their experts (all-to-all with uneven splits), arriving by source rank;
    3. re-sorted by local expert, they run through the local experts (grouped GEMMs or the loop, as unsharded);
    4. sorted back by source rank, they return by the reverse all-to-all; `Experts.forward` weights and adds them.

`AllToAll` carries gradients back through both exchanges (its backward is the reverse exchange), so a rank's expert
weights get the gradient of every row they computed, from all the group's ranks. The load-balancing loss stays
each rank's own (from the router on its tokens).

Gradient reduction is DeepSpeed's for its MoE parameters: the expert weights are marked `allreduce = False`,
`group_name = "ep_size_N"` (`deepspeed.moe.utils.is_moe_param`; `mark`); ZeRO-1/2 reduces them over the
expert-data-parallel group only, every other parameter over all ranks, and divides both by the world size. That sum
over the expert-data-parallel group of what each rank's experts received from its expert-parallel group is the sum
over every rank's tokens, so the averaged gradients equal those of the same packs without expert parallelism.
DeepSpeed's engine does this only for a model it finds a `deepspeed.moe.layer.MoE` in: `show_deepspeed` adds one
that holds nothing (where an expert shard or adapter trains: `trains_experts`).

With sequence parallelism (ochat.model.sequence_parallel, M consecutive ranks sharing each pack) the groups stay as
above, made without regard to the sequence-parallel ones: an expert-parallel group may lie inside a
sequence-parallel group, be one, or span several packs' ranks.

    4 ranks, M = 2:   sequence-parallel groups     [0 1] [2 3]   (two packs at a time, each sliced over 2 ranks)
                      N = 2: expert-parallel [0 1] [2 3], expert-data-parallel [0 2] [1 3]
                      N = 4: expert-parallel [0 1 2 3], expert-data-parallel [0] [1] [2] [3]

Every layout is exact: a rank routes its slice's tokens and the exchange does not care which pack a row came from;
the Ulysses all-to-all's backward brings each shard the whole step loss's gradient for every row it computed, and
the expert-data-parallel group holds one rank of each expert-parallel group, all ranks together. ZeRO-2 divides
every bucket, expert shards included, by world / M under sequence parallelism, the R of
ochat.training.loss.grad_average_ranks, so the loss scaling stays exact (tested through ochat's engine and step).

LoRA (ochat.model.lora): the experts' adapters cover this rank's experts only (A's rows, B's columns of them, in
peft's layout), made as for the whole layer (`whole_experts`: the same random A as one rank draws) and then cut to
the held experts; they run with the local experts after the dispatch and are marked as the expert weights are,
so their gradients are reduced the same way; `gather` joins them back into peft's whole-layer adapters. The
attention adapters and any others are ordinary data-parallel parameters.

Resume states: DeepSpeed saves the ZeRO optimizer states (fp32 master weights and moments, partitioned by the MoE
groups already) and, from rank 0 only, the module's weights, which every rank loads: rank 0's expert shards among
them. DeepSpeed's per-expert files (`layer_L_expert_E_...`) are written and read for the experts of its own MoE
modules only; the parameterless one counts none (`num_local_experts = 0`), so it neither writes nor looks for them.
Each expert-parallel rank's trainable shards (with LoRA: its experts' adapters; the frozen experts are reloaded from
the model) are saved beside DeepSpeed's files instead (`shards`, by ochat.training.run_folder) and copied back over
what DeepSpeed loaded (`load_shards`).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

from ochat.model.experts import ExpertBlock, Experts


def group_name(size: int) -> str:
    """DeepSpeed's name of the expert-parallel groups of `size` ranks (and of their expert-data-parallel groups)."""
    return f"ep_size_{size}"


def check_sizes(num_experts: int | None, size: int, world_size: int | None) -> None:
    """Raise ValueError (one line) unless `size` ranks can split `num_experts` experts and divide `world_size`
    (None: not known yet)."""
    if num_experts is not None and num_experts % size:
        raise ValueError(f"--expert-parallel {size} must divide the model's {num_experts} experts per layer")
    if world_size is not None and world_size % size:
        raise ValueError(f"--expert-parallel {size} must divide the number of ranks ({world_size})")


class AllToAll(torch.autograd.Function):
    """`all_to_all_single` with uneven splits, differentiable: the backward sends the gradients back the way the
    rows came (the reverse exchange)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """Rows x [sum(send), ...]: send[j] of them to rank j of `group`; returns [sum(recv), ...], by source rank."""
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """`send[j]` rows of x to rank j of `group`, `recv[j]` rows from it (by source rank), with gradients."""
    return AllToAll.apply(x, send, recv, group)


class ShardedExperts(Experts):
    """A layer's experts as one rank of an expert-parallel group holds them: experts `held` of `num_experts`, the
    rows routed to them from every rank of the group computed here (module docstring)."""

    def __init__(self, full: Experts, group, size: int, rank: int):
        nn.Module.__init__(self)  # the parameters are slices of `full`'s, not new ones from a config
        local = full.num_experts // size
        self.held = range(rank * local, (rank + 1) * local)
        for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            p = getattr(full, name, None)
            if p is None:  # biases: gpt-oss only
                continue
            shard = nn.Parameter(p.data[self.held.start:self.held.stop].clone(), requires_grad=p.requires_grad)
            mark(shard, size, self.held)
            setattr(self, name, shard)
        self.num_experts, self.act, self.impl = full.num_experts, full.act, full.impl
        self.group, self.size = group, size

    def run_sorted(self, rows: torch.Tensor, counts: torch.Tensor, adapters=None) -> torch.Tensor:
        """This rank's rows sorted by expert (`counts` [num_experts]) through whichever rank holds each expert:
        dispatch, the local experts (with `adapters`: LoRA's factors of the local experts), combine (module
        docstring); one host read of the exchanged counts."""
        n, local = self.size, len(self.held)
        send = counts.view(n, local)  # [destination rank, its expert]
        recv = torch.empty_like(send)  # [source rank, my expert]
        dist.all_to_all_single(recv, send.contiguous(), group=self.group)
        send_rows, recv_rows = send.sum(1).tolist(), recv.sum(1).tolist()
        arrived = all_to_all(rows, send_rows, recv_rows, self.group)  # by source rank, then expert
        segment = torch.arange(n * local, device=rows.device).repeat_interleave(recv.flatten())
        by_expert = (segment % local).argsort(stable=True)
        y = super().run_sorted(arrived[by_expert], recv.sum(0), adapters)
        return all_to_all(y[by_expert.argsort()], recv_rows, send_rows, self.group)


def mark(p: nn.Parameter, size: int, held: range, experts_last: bool = False) -> None:
    """Mark `p` as holding the experts `held` of its layer, split by expert-parallel groups of `size` ranks:
    DeepSpeed's MoE parameter marks (ZeRO reduces its gradient over the expert-data-parallel group only) and
    `held_experts`. `experts_last`: p's last dimension is [r, experts] with the expert fastest (a LoRA B of stacked
    experts, peft's layout), not experts first."""
    p.allreduce, p.group_name = False, group_name(size)
    p.held_experts = held
    if experts_last:
        p.experts_last = True


def enable(model: nn.Module, size: int) -> None:
    """Create DeepSpeed's expert-parallel groups of `size` ranks (once) and keep in each expert layer of `model` only
    this rank's experts (`ShardedExperts`, sliced from the layer's, or meta tensors on a meta model; layers sharded
    already stay as they are). Nothing when size is 1. Before LoRA (whose expert adapters it would not cut).
    Collective: every rank calls it after torch.distributed started."""
    if size == 1:
        return
    import deepspeed.comm as ds_dist
    from deepspeed.utils import groups

    check_sizes(model.config.num_experts, size, ds_dist.get_world_size())
    name = group_name(size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(size)
    rank = groups._get_expert_parallel_rank(name)
    assert rank == ds_dist.get_rank() % size, "DeepSpeed's expert-parallel group order changed"
    blocks = [m for m in model.modules() if isinstance(m, ExpertBlock)]
    assert blocks, "no expert layer found"
    for block in blocks:
        if any(isinstance(m, ShardedExperts) for m in block.modules()):  # sharded at load, maybe adapted since
            continue
        assert isinstance(block.experts, Experts), "expert parallelism goes before LoRA's adapters"
        block.experts = ShardedExperts(block.experts, groups._get_expert_parallel_group(name), size, rank)


@contextlib.contextmanager
def whole_experts(model: nn.Module):
    """Within: each sharded expert parameter of `model` stands in its whole layer's shape (this rank's dtype, on the
    CPU, one element expanded: no memory), so that what is built from the shapes (LoRA's expert adapters, drawn at
    random) is what one rank builds for the whole model; the shards are back after."""
    held = [(m, name, p) for m in model.modules() if isinstance(m, ShardedExperts)
            for name, p in m.named_parameters(recurse=False)]
    try:
        for m, name, p in held:
            whole = torch.empty((), dtype=p.dtype).expand(m.num_experts, *p.shape[1:])
            m._parameters[name] = nn.Parameter(whole, requires_grad=False)
        yield
    finally:
        for m, name, p in held:
            m._parameters[name] = p


def held_experts(p: torch.Tensor) -> range | None:
    """The experts a sharded expert parameter holds (None for any other parameter)."""
    return getattr(p, "held_experts", None)


def ranks(size: int) -> tuple[int, int]:
    """This rank's place in its expert-parallel group of `size` ranks (which experts it holds) and in its
    expert-data-parallel group (which of the ranks holding them it is)."""
    from deepspeed.utils import groups

    name = group_name(size)
    return groups._get_expert_parallel_rank(name), groups._get_expert_data_parallel_rank(name)


def _trained_shards(model: nn.Module) -> dict[str, nn.Parameter]:
    """This rank's trainable expert shards (with LoRA: its experts' adapters) by parameter name."""
    return {n: p for n, p in model.named_parameters() if held_experts(p) is not None and p.requires_grad}


def trains_experts(model: nn.Module) -> bool:
    """Whether any expert shard of `model` trains (the expert weights, or their LoRA adapters)."""
    return bool(_trained_shards(model))


def shards(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's trainable expert shards by parameter name, copied to the CPU (what a resume state needs of the
    experts beyond DeepSpeed's files: the frozen ones are the model's)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in _trained_shards(model).items()}


def load_shards(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy `saved` (what `shards` returned on a rank holding the same experts) into this rank's trainable expert
    shards; ValueError (one line) unless it holds exactly them, shape for shape."""
    params = _trained_shards(model)
    wrong = sorted(params.keys() ^ saved.keys()) or [n for n, p in params.items() if saved[n].shape != p.shape]
    if wrong:
        raise ValueError(f"its expert shards do not fit this model ({wrong[0]})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])


def gather(p: torch.Tensor) -> torch.Tensor:
    """A sharded expert parameter with every expert of its layer, gathered from its expert-parallel group (no
    gradient): experts first, or a LoRA B's [out, r x experts] with the expert fastest (`mark`). Collective over
    the group."""
    from deepspeed.utils import groups

    group = groups._get_expert_parallel_group(p.group_name)
    shard = p.data.contiguous()
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard, group=group)
    if getattr(p, "experts_last", False):  # each [out, r, held]: joined along the experts into [out, r, all]
        return torch.cat([t.unflatten(-1, (-1, len(p.held_experts))) for t in parts], dim=-1).flatten(-2)
    return torch.cat(parts)


def show_deepspeed(model: nn.Module, size: int) -> None:
    """Make DeepSpeed's engine treat `model` as a mixture of experts (it looks for `deepspeed.moe.layer.MoE`
    modules): a parameterless `MoE` on the model, so ZeRO reduces the marked expert shards over their
    expert-data-parallel group. Nothing when size is 1."""
    if size == 1:
        return
    from deepspeed.moe.layer import MoE

    class ExpertLayers(MoE):
        """ochat's expert layers as DeepSpeed counts them; holds nothing, never runs."""

        def __init__(self):
            nn.Module.__init__(self)  # DeepSpeed's MoE would build its own experts
            self.num_experts, self.ep_size, self.expert_group_name = model.config.num_experts, size, group_name(size)
            self.num_local_experts = 0  # DeepSpeed's per-expert checkpoint files: none (module docstring)

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # `enable` made the groups

    model.deepspeed_moe = ExpertLayers()
