"""Memory for very long packs: two pieces of DeepSpeed's ALST (Arctic Long Sequence Training), as switches.

- `tile_mlp(model, tiles)`: each decoder layer's MLP (whatever module `layer.mlp` is, so any activation) runs
  through DeepSpeed's `TiledMLP`: the forward goes over `tiles` slices of the tokens without keeping their
  [tokens, intermediate] activations; the backward recomputes and backpropagates one slice at a time. Costs
  one more MLP forward per layer (a checkpointed layer then runs it three times). An expert block does the same
  through `TiledExperts`, which also adds up the slices' routing sums (router and experts run per slice: each
  token's experts and weights are those of the untiled block, the load-balancing loss still the whole pack's).
- `offload_checkpoints(model, ds_config)`: checkpointed decoder layers are recomputed by DeepSpeed's
  non-reentrant activation checkpoint with `activation_checkpointing.cpu_checkpointing`, which moves each
  layer's input (the one [tokens, hidden] tensor a checkpointed layer keeps) to pinned CPU memory on a side
  stream and brings it back for the recompute. Costs PCIe traffic of 2 x tokens x hidden x 2 bytes per layer
  and step, mostly hidden behind compute. Needs a GPU: on a CPU there is nothing to offload to.

The loss needs neither: the chunked linear cross-entropy never holds the full logits.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _tiled_forward(mlp: torch.nn.Module, tiles: int):
    """mlp's forward through TiledMLP, over exactly `tiles` slices of the tokens on every rank: ZeRO-3 gathers
    the MLP's weights once per slice, so all ranks must run the same number of slices."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    forward, params = mlp.forward, list(mlp.parameters())

    def run(_module, x):
        return forward(x)

    def tiled(x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows < tiles or math.ceil(rows / math.ceil(rows / tiles)) != tiles:  # torch.chunk would make fewer
            padded = tiles * math.ceil(rows / tiles)
            return TiledMLP.apply(run, mlp, F.pad(x, (0, 0, 0, padded - rows)), tiles, params)[:rows]
        return TiledMLP.apply(run, mlp, x, tiles, params)

    return tiled


class TiledExperts(torch.autograd.Function):
    """DeepSpeed's TiledMLP for an expert block (ochat.model.experts.ExpertBlock: x [T, H] -> output [T, H], routing
    sums [2, E]): the block runs on each of `tiles` slices of the tokens alone (routing is per token), without
    keeping their activations; the outputs are concatenated and the routing sums added, so the load-balancing loss
    and the tokens per expert stay the whole pack's. The backward recomputes one slice at a time and backpropagates
    its rows of the output's gradient and the whole sums' gradient (each slice's sums are a term of the total)."""

    @staticmethod
    def forward(ctx, forward, x: torch.Tensor, tiles: int, params: list[torch.nn.Parameter]):
        ctx.forward, ctx.tiles, ctx.params = forward, tiles, [p for p in params if p.requires_grad]
        ctx.save_for_backward(x)
        with torch.no_grad():
            outs, sums = zip(*(forward(part) for part in x.tensor_split(tiles)))
        return torch.cat(outs), torch.stack(sums).sum(0)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, grad_sums: torch.Tensor):
        (x,) = ctx.saved_tensors
        grads = []
        for i, (part, grad) in enumerate(zip(x.detach().tensor_split(ctx.tiles), grad_out.tensor_split(ctx.tiles))):
            for p in ctx.params:  # ZeRO takes a parameter's gradient once, when the last slice has added to it
                p.ds_grad_is_ready = i == ctx.tiles - 1
            part.requires_grad_()
            with torch.enable_grad():
                out, sums = ctx.forward(part)
            torch.autograd.backward((out, sums), (grad, grad_sums))
            grads.append(part.grad)
        return None, torch.cat(grads), None, None


def _tiled_expert_forward(block: torch.nn.Module, tiles: int):
    """An expert block's forward through TiledExperts, over exactly `tiles` slices of the tokens on every rank (as
    `_tiled_forward`; some empty when there are fewer tokens: padding rows would be routed)."""
    forward, params = block.forward, list(block.parameters())
    return lambda x: TiledExperts.apply(forward, x, tiles, params)


def tile_mlp(model: torch.nn.Module, tiles: int) -> None:
    """Run every decoder layer's MLP or expert block over `tiles` slices of the tokens (DeepSpeed's TiledMLP,
    TiledExperts); 1 leaves them."""
    if tiles == 1:
        return
    for layer in model.model.layers:
        tiled = _tiled_expert_forward if layer.has_experts else _tiled_forward
        layer.mlp.forward = tiled(layer.mlp, tiles)


def _checkpoint_offloading_input(layer, x, *inputs):
    """DeepSpeed's non-reentrant checkpoint of one decoder layer. Only the hidden states x are its tensor
    argument (the rest reach the layer by closure): DeepSpeed frees the GPU storage of every tensor it
    offloads, and cos/sin/cu_seqlens are shared by all layers."""
    import deepspeed

    return deepspeed.checkpointing.non_reentrant_checkpoint(lambda h: layer(h, *inputs), x)


def offload_checkpoints(model: torch.nn.Module, ds_config: dict) -> None:
    """Recompute the checkpointed layers with DeepSpeed's checkpoint, configured from ds_config's
    "activation_checkpointing" (cpu_checkpointing: their inputs wait in CPU memory)."""
    import deepspeed

    deepspeed.checkpointing.configure(None, deepspeed_config=ds_config)
    model.checkpoint_fn = _checkpoint_offloading_input
