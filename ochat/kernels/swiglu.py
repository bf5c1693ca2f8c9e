"""Gated MLP activations: `act(gate) * up`, the elementwise core of the decoder's MLP.

- "silu": SwiGLU, `silu(gate) * up` (Llama, Mistral, Qwen, Phi-3, OLMo 2).
- "gelu_pytorch_tanh": GeGLU, `gelu(gate, approximate="tanh") * up` (Gemma 2/3).

`glu` is the entry point the model calls; `glu_reference` is the plain PyTorch definition that tests compare
the fused kernel against. Unfused, autograd runs two elementwise kernels each way and keeps `act(gate)` as a
third saved activation; the fused Triton kernel (switch name "swiglu" in `ochat.kernels.fused`, covering both
activations) reads gate and up once, computes in float32, and its backward recomputes the activation from the
saved gate.
"""
import torch
import torch.nn.functional as F

from ochat.kernels.fused import fused_enabled

try:
    import triton
    import triton.language as tl

    from ochat.kernels.triton_math import tanh
except ImportError:
    triton = None

ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # Hugging Face's `hidden_act` / `hidden_activation` names
_BLOCK = 1024


def glu_reference(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """`act(gate) * up`, as transformers' MLPs compute it."""
    if act == "silu":
        return F.silu(gate) * up
    if act == "gelu_pytorch_tanh":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"MLP activation {act!r} not supported (one of {ACTIVATIONS})")


if triton is not None:

    @triton.jit
    def _act_and_grad(g, GELU: tl.constexpr):
        """act(g) and d act / dg, float32."""
        if GELU:  # 0.5 g (1 + tanh(k (g + 0.044715 g^3))), k = sqrt(2 / pi)
            k = 0.7978845608028654
            t = tanh(k * (g + 0.044715 * g * g * g))
            a = 0.5 * g * (1.0 + t)
            da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * g * g)
        else:  # silu(g) = g s, d silu / dg = s (1 + g (1 - s))
            s = tl.sigmoid(g)
            a = g * s
            da = s * (1.0 + g * (1.0 - s))
        return a, da

    @triton.jit
    def _glu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr, GELU: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a, _ = _act_and_grad(g, GELU)
        tl.store(out_ptr + offs, (a * u).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _glu_bwd_kernel(dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr, GELU: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a, da = _act_and_grad(g, GELU)
        tl.store(dgate_ptr + offs, (dout * u * da).to(dgate_ptr.dtype.element_ty), mask=mask)
        tl.store(dup_ptr + offs, (dout * a).to(dup_ptr.dtype.element_ty), mask=mask)


class _GLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, act):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        gelu = act == "gelu_pytorch_tanh"
        if n:
            _glu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, BLOCK=_BLOCK, GELU=gelu)
        ctx.save_for_backward(gate, up)
        ctx.gelu = gelu
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            _glu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dout, gate, up, dgate, dup, n, BLOCK=_BLOCK, GELU=ctx.gelu)
        return dgate, dup, None


def glu_triton(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """Fused Triton `act(gate) * up` (forward and backward); gate and up of one shape and dtype."""
    if act not in ACTIVATIONS:
        raise ValueError(f"MLP activation {act!r} not supported (one of {ACTIVATIONS})")
    return _GLUFn.apply(gate, up, act)


def glu(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """`act(gate) * up`; the fastest implementation available for the tensors' device."""
    if gate.is_cuda and triton is not None and fused_enabled("swiglu"):
        return glu_triton(gate, up, act)
    return glu_reference(gate, up, act)
