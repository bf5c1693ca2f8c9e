"""A LoRA linear layer in one autograd node: `x W^T + b + s (x A^T) B^T`, its backward computing only the gradients
that are needed.

peft's `lora.Linear` computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: besides the two thin matmuls
(rank r) it writes the adapter's [tokens, out] product, scales it in a second pass, adds it in a third, and in the
backward scales the [tokens, out] gradient again and adds two [tokens, in] input gradients. Those passes are
memory-bound: per token and linear layer about 18 x out + 12 x in bytes in bf16, which on a 1.1B Llama at 16k
tokens is as much time as the frozen base's weight gradients save (LoRA ran at full fine-tuning's speed).

Here the adapter's product is accumulated into the base output by the matmul itself (`addmm_`, the scale folded
into its alpha), and in the backward the adapter's input gradient into the base's the same way: about 8 x out +
8 x in bytes. Weight gradients are computed only for inputs that need them (`ctx.needs_input_grad`): a frozen
base weight gets no weight-gradient matmul. The base weight may be an NF4Tensor (QLoRA): the forward and the
backward each dequantise it. `lora_linear_reference` is peft's computation, for tests.

Given `out_of_place` (a context; under selective recompute, ochat.model.recompute), the adapter's product is added
out of place inside it instead, leaving the base GEMM's output as the GEMM wrote it: selective recompute keeps that
output, which an in-place add would change. That costs one more pass over the output (the add's copy), so the
common path keeps the in-place accumulation.
"""
from __future__ import annotations

from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                          b: torch.Tensor, scale: float) -> torch.Tensor:
    """`F.linear(x, weight, bias) + F.linear(F.linear(x, a), b) * scale`, as peft's LoRA layer computes it."""
    return F.linear(x, weight, bias) + F.linear(F.linear(x, a), b) * scale


class _LoRALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale, out_of_place):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        h = x2 @ a.t()  # [T, r]
        out = F.linear(x2, weight, bias)  # [T, out]; an NF4 weight is dequantised for this matmul alone
        if out_of_place is None:
            out.addmm_(h, b.t(), alpha=scale)
        else:
            with out_of_place:
                out = torch.addmm(out, h, b.t(), alpha=scale)
        ctx.save_for_backward(x2, weight, a, b, h)
        ctx.scale, ctx.shape = scale, shape
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, a, b, h = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        g = grad.reshape(-1, grad.shape[-1])
        gh = g @ b if need_x or need_a else None  # [T, r]: the gradient reaching the adapter's rank-r product
        dx = dw = dbias = da = db = None
        if need_x:
            dx = g @ weight.to(g.dtype)  # an NF4 weight dequantised again; a dense one is used as it is
            dx.addmm_(gh, a, alpha=ctx.scale)
            dx = dx.view(ctx.shape)
        if need_w:
            dw = g.t() @ x2
        if need_bias:
            dbias = g.sum(0)
        if need_a:
            da = (gh.t() @ x2).mul_(ctx.scale)
        if need_b:
            db = (g.t() @ h).mul_(ctx.scale)
        return dx, dw, dbias, da, db, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                scale: float, out_of_place: AbstractContextManager | None = None) -> torch.Tensor:
    """`x W^T + bias + scale (x A^T) B^T` for x [..., in], weight [out, in] (dense or NF4), a [r, in], b [out, r],
    all of x's dtype (a dense weight too); gradients only for the inputs that require them. `out_of_place`: None
    (the adapter's product accumulated into the base output), or the context to add it out of place in."""
    return _LoRALinearFn.apply(x, weight, bias, a, b, float(scale), out_of_place)
