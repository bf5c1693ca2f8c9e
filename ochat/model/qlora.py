"""QLoRA's frozen base: the decoder layers' linear weights and stacked experts held in 4-bit NF4 (torchao),
dequantised in each forward.

`quantize_base` replaces the base linear layer of every decoder-layer projection (the `base_layer` peft's LoRA
layer wraps, and the projections LoRA leaves alone) by an `NF4Linear`: its weight becomes torchao's NF4Tensor
(4-bit NormalFloat codes in blocks of 64 weights, each block's absmax scale itself quantised to 8 bits per
block of 256 scales: QLoRA's double quantisation), made from the bf16 weight. `F.linear` on an NF4Tensor
dequantises the whole weight to the input's dtype, multiplies, and frees it; its backward dequantises again for
the input gradient and computes no weight gradient. Embeddings, norms, biases and lm_head stay as they are.

Mixture-of-experts blocks (experts.Experts): each stacked expert weight (`gate_up_proj` [E, 2I, H], `down_proj` [E,
H, I]) becomes one NF4Tensor of the stack viewed as [E x out, in] (`quantize_experts`; torchao's NF4Tensor is 2-D).
One tensor per stack, not one per expert: `stacked_linear` dequantises the whole stack right before the grouped GEMM
(or the per-expert loop), a few kernels per 16M weights (`dequantize_stack`), and frees it after, where E tensors
would cost E calls (128 for Qwen3-30B-A3B) per projection and a copy to stack them for the grouped GEMM. Blocks of
64 are 64 consecutive weights of the stack, none mixing two experts (out x in must be a multiple of 64: the Hub's
expert models' H and I are), and so are the groups of 256 scales of the double quantisation (fewer where an
expert's scales are not a multiple of 256: tiny test models); only the one mean scale that the double quantisation
subtracts first spans the stack (`quantize_stack`: torchao's arithmetic but for that mean, from a float64 sum
per expert). Under expert parallelism (ochat.model.expert_parallel) a rank holds some experts of each layer and
quantises only those, with the whole layer's mean scale (the per-expert sums gathered from the expert-parallel
group): its NF4 stack holds exactly what the whole layer's quantised on one rank holds of its experts, so ranks
train the model one rank would. The backward dequantises again for the input gradient (no weight gradient); under
gradient checkpointing the recompute dequantises again too. The router (`mlp.gate`), Qwen2-MoE's
`shared_expert_gate` and gpt-oss's expert biases stay as they are: they are tiny, and routing must not flip.

The NF4 weight is a non-persistent buffer, not a parameter: DeepSpeed casts, broadcasts and checkpoints
parameters, none of which an NF4Tensor supports, while buffers it leaves alone (and resume states carry only the
adapters: the base is quantised again from --model-path, with the same result).

Memory of a quantised weight: 4 bits per weight + 8 bits per 64 (scales) + 32 bits per 16,384 (scale
factors) = 0.516 bytes per weight, against 2 in bf16 (3.9x less).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

BLOCK = 64  # weights per NF4 scale (QLoRA's)
SCALER_BLOCK = 256  # scales per scale factor (QLoRA's double quantisation), or the largest power of 2 dividing
DEQUANTIZE_CHUNK = 1 << 24  # weights an expert stack is dequantised by at a time (`dequantize_stack`)


def _to_nf4():
    """torchao's to_nf4 (torchao.quantization from 0.18, torchao.dtypes before)."""
    try:
        from torchao.quantization import to_nf4
    except ImportError:
        from torchao.dtypes import to_nf4
    return to_nf4


def nf4_bytes_per_weight() -> float:
    """What one NF4 weight takes: its 4-bit code, its share of an 8-bit block scale and of a float32 factor."""
    return 0.5 + 1 / BLOCK + 4 / (BLOCK * SCALER_BLOCK)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is an NF4Tensor (a non-persistent buffer); the bias stays a frozen
    parameter."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", quantize(linear.weight.detach()), persistent=False)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


def quantize(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (any float dtype, cast to bf16 first) as an NF4Tensor of the same shape and device."""
    n = weight.numel()
    if n % BLOCK:
        raise ValueError(f"--qlora: a weight of shape {tuple(weight.shape)} has {n} elements, not a multiple of the "
                         f"NF4 block of {BLOCK}")
    blocks = n // BLOCK
    scaler_block = SCALER_BLOCK
    while blocks % scaler_block:  # small test models: fewer scales per factor
        scaler_block //= 2
    return _to_nf4()(weight.to(torch.bfloat16).contiguous(), BLOCK, scaler_block)


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """The bf16 weight an NF4Tensor stands for (what the forward multiplies by)."""
    return weight.get_original_weight()


def is_nf4(t: torch.Tensor) -> bool:
    """Whether `t` is torchao's NF4Tensor (a quantised weight; checked by name: torchao is imported lazily)."""
    return type(t).__name__ == "NF4Tensor"


def quantize_stack(weight: torch.Tensor, group=None) -> torch.Tensor:
    """A stacked expert weight [E, out, in] (any float dtype, cast to bf16 first) as one NF4Tensor [E x out, in]:
    each expert in its own blocks and groups of scales, the scales' mean the whole layer's. `group`: the
    expert-parallel group whose ranks hold the layer's other experts, in order (`weight` holds this rank's); its
    per-expert scale sums are gathered from it (collective), so the result is the whole layer's NF4 stack cut to
    these experts."""
    experts, out, inp = weight.shape
    if (out * inp) % BLOCK:
        raise ValueError(f"--qlora: an expert of shape {(out, inp)} has {out * inp} weights, not a multiple of the "
                         f"NF4 block of {BLOCK}")
    per_expert = out * inp // BLOCK  # scales
    scaler_block = SCALER_BLOCK
    while per_expert % scaler_block:  # small test models: fewer scales per factor, never spanning two experts
        scaler_block //= 2
    flat = weight.to(torch.bfloat16).reshape(-1, inp).contiguous()
    nf4 = _to_nf4()(flat, BLOCK, scaler_block)  # the codes, each block scaled by its absmax
    scales = flat.view(-1, BLOCK).abs().amax(1)  # torchao's first quantisation: one bf16 absmax per block
    sums = scales.view(experts, per_expert).double().sum(1)
    if group is not None:
        parts = [torch.empty_like(sums) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, sums, group=group)
        sums = torch.cat(parts)
    mean = (sums.sum() / (len(sums) * per_expert)).to(torch.bfloat16)
    # torchao's double quantisation (NF4Tensor.double_quantize_scalers) about that mean
    centred = (scales - mean).view(-1, scaler_block)
    factor = 256 / (2 * centred.abs().amax(1, keepdim=True))
    nf4.quantized_scalers = (centred * factor).round().clamp(-128, 127).to(torch.int8).flatten()
    nf4.quantization_factor, nf4.scaler_mean = factor[:, 0].contiguous(), mean
    return nf4


def dequantize_stack(weight: torch.Tensor, experts: int, dtype: torch.dtype) -> torch.Tensor:
    """The [E, out, in] stack in `dtype` that the NF4Tensor [E x out, in] of `quantize_stack` stands for: the values
    of `dequantize` cast to `dtype`, bit for bit, written DEQUANTIZE_CHUNK weights at a time into the result. torchao's
    `get_original_weight` holds about 14 bytes of temporaries per weight (int64 codes among them) until it returns:
    5.6 GB for one of Qwen3-30B-A3B's gate_up stacks (403M weights), against 0.8 GB for the result."""
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)  # each bf16 value cast as it is written
    pairs = out.view(-1, 2)  # (even, odd) weights: the two codes of a byte
    block, per_factor = weight.block_size, weight.block_size * weight.scaler_block_size
    step = per_factor * max(1, DEQUANTIZE_CHUNK // per_factor)
    for start in range(0, weight.numel(), step):  # torchao's arithmetic, in its dtypes, on a slice of scale factors
        end = min(start + step, weight.numel())
        scales = weight.quantized_scalers[start // block:end // block].view(-1, weight.scaler_block_size)
        scales = (scales / weight.quantization_factor[start // per_factor:end // per_factor, None]).flatten()
        scales = (scales.to(weight.dtype) + weight.scaler_mean).repeat_interleave(block // 2)
        codes = weight.quantized_data[start // 2:end // 2]
        pairs[start // 2:end // 2, 0] = weight.nf4[(codes >> 4).long()] * scales
        pairs[start // 2:end // 2, 1] = weight.nf4[(codes & 0b1111).long()] * scales
    return out.view(experts, -1, weight.shape[-1])


class _StackedLinear(torch.autograd.Function):
    """x through a frozen NF4 stack: the forward and the backward each dequantise it for their matmuls alone, so no
    dequantised stack outlives its GEMM (autograd keeps only the NF4 tensor)."""

    @staticmethod
    def forward(ctx, x, weight, experts, linear):
        ctx.save_for_backward(weight)
        ctx.experts, ctx.linear = experts, linear
        return linear(x, dequantize_stack(weight, experts, x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        stack = dequantize_stack(weight, ctx.experts, grad.dtype)
        return ctx.linear(grad.contiguous(), stack.transpose(-2, -1)), None, None, None


def stacked_linear(x: torch.Tensor, weight: torch.Tensor, experts: int, linear) -> torch.Tensor:
    """`linear(x, W)` (each expert's rows of x times its W_e transposed: experts' grouped GEMM or per-expert loop) for
    the stack W [E, out, in] that the NF4Tensor `weight` [E x out, in] stands for, dequantised to x's dtype; the input
    gradient flows (x_e's is grad_e W_e, by the same `linear` on W transposed), the stack gets none."""
    return _StackedLinear.apply(x, weight, experts, linear)


def quantize_experts(experts: nn.Module) -> int:
    """Hold the stacked weights of `experts` (an experts.Experts, or this rank's share of them: ShardedExperts,
    quantised as the whole layer's, collective over its expert-parallel group) as non-persistent NF4 buffers
    [E x out, in] of the same names, in place (their biases stay frozen parameters); returns how many weights that
    quantised."""
    from ochat.model.expert_parallel import ShardedExperts

    group = experts.group if isinstance(experts, ShardedExperts) else None
    count = 0
    for name in ("gate_up_proj", "down_proj"):
        stack = getattr(experts, name).detach()
        delattr(experts, name)
        experts.register_buffer(name, quantize_stack(stack, group), persistent=False)
        count += stack.numel()
    return count


def quantize_base(model: nn.Module, device: torch.device | str | None = None) -> tuple[int, int]:
    """Replace every frozen linear layer inside the decoder layers of `model` (peft's `base_layer` where LoRA wraps
    one; the adapters are trainable) by an NF4Linear and hold every expert block's stacked experts in NF4
    (`quantize_experts`), in place; the routers and shared-expert gates stay. Each decoder layer is first moved to
    `device` where one is given (a base read into CPU memory reaches the GPU one bf16 layer at a time). Returns
    (modules quantised, weights quantised)."""
    from ochat.model.experts import ExpertBlock, Experts

    modules = weights = 0
    for layer in model.model.layers:
        if device is not None:
            layer.to(device)
        gates = {id(m.shared_expert_gate) for m in layer.modules() if isinstance(m, ExpertBlock)
                 and hasattr(m, "shared_expert_gate")}
        for module in list(layer.modules()):
            if isinstance(module, Experts):
                weights += quantize_experts(module)
                modules += 1
            for name, child in list(module.named_children()):
                if type(child) is nn.Linear and not child.weight.requires_grad and id(child) not in gates:
                    setattr(module, name, NF4Linear(child))
                    modules += 1
                    weights += child.weight.numel()
    return modules, weights
