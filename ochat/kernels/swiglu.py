"""SwiGLU gating: `silu(gate) * up`, the elementwise core of the LLaMA MLP.

`swiglu` is the entry point the model calls; `swiglu_reference` is the plain PyTorch definition that
tests compare the fused kernel against. Unfused, autograd runs two elementwise kernels each way and
keeps `silu(gate)` as a third saved activation; the fused Triton kernel reads gate and up once, computes
in float32, and its backward recomputes the sigmoid from the saved gate.
"""
import torch
import torch.nn.functional as F

from ochat.kernels.fused import fused_enabled

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

_BLOCK = 1024


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up`, as transformers' LlamaMLP computes it."""
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = g * tl.sigmoid(g) * u
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        # d silu(g) / dg = s * (1 + g * (1 - s))
        tl.store(dgate_ptr + offs, (dout * u * s * (1.0 + g * (1.0 - s))).to(dgate_ptr.dtype.element_ty), mask=mask)
        tl.store(dup_ptr + offs, (dout * g * s).to(dup_ptr.dtype.element_ty), mask=mask)


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        if n:
            _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, BLOCK=_BLOCK)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dout, gate, up, dgate, dup, n, BLOCK=_BLOCK)
        return dgate, dup


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Fused Triton `silu(gate) * up` (forward and backward); gate and up of one shape and dtype."""
    return _SwiGLUFn.apply(gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up`; the fastest implementation available for the tensors' device."""
    if gate.is_cuda and triton is not None and fused_enabled("swiglu"):
        return swiglu_triton(gate, up)
    return swiglu_reference(gate, up)
