"""QLoRA's frozen base: the decoder layers' linear weights held in 4-bit NF4 (torchao), dequantised in each forward.

`quantize_base` replaces the base linear layer of every decoder-layer projection (the `base_layer` peft's LoRA
layer wraps, and the projections LoRA leaves alone) by an `NF4Linear`: its weight becomes torchao's NF4Tensor
(4-bit NormalFloat codes in blocks of 64 weights, each block's absmax scale itself quantised to 8 bits per
block of 256 scales: QLoRA's double quantisation), made from the bf16 weight. `F.linear` on an NF4Tensor
dequantises the whole weight to the input's dtype, multiplies, and frees it; its backward dequantises again for
the input gradient and computes no weight gradient. Embeddings, norms, biases and lm_head stay as they are.

The NF4 weight is a non-persistent buffer, not a parameter: DeepSpeed casts, broadcasts and checkpoints
parameters, none of which an NF4Tensor supports, while buffers it leaves alone (and resume states carry only the
adapters: the base is quantised again from --model-path, with the same result).

Memory of a quantised weight: 4 bits per weight + 8 bits per 64 (scales) + 32 bits per 16,384 (scale
factors) = 0.516 bytes per weight, against 2 in bf16 (3.9x less).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCK = 64  # weights per NF4 scale (QLoRA's)
SCALER_BLOCK = 256  # scales per scale factor (QLoRA's double quantisation), or the largest power of 2 dividing


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


def quantize_base(model: nn.Module) -> int:
    """Replace every frozen linear layer inside the decoder layers of `model` (peft's `base_layer` where LoRA wraps
    one; the adapters are trainable) by an NF4Linear, in place; returns how many."""
    count = 0
    for layer in model.model.layers:
        for module in list(layer.modules()):
            for name, child in list(module.named_children()):
                if type(child) is nn.Linear and not child.weight.requires_grad:
                    setattr(module, name, NF4Linear(child))
                    count += 1
    return count
