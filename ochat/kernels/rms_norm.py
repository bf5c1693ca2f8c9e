"""RMSNorm: `x / sqrt(mean(x^2) + eps)` computed in float32, then scaled by `weight + offset`.

Two conventions, both covered by the fused kernel:
- Llama, Mistral, Qwen, Phi-3: cast the normalised x back to x's dtype, then multiply by `weight`.
- `scale_in_float32=True` (Gemma 2/3 with `offset=1.0`, i.e. `(1 + w)`; OLMo 2 with `offset=0.0`): multiply in
  float32, then cast to x's dtype.
In float32 the two agree; in bf16 they round differently, so each model uses the one transformers uses.

`rms_norm` is the entry point the model calls; `rms_norm_reference` is the plain PyTorch definition that
tests compare fused kernels against. On CUDA (unless switched off through `ochat.kernels.fused`) a Triton
kernel computes forward and backward in one pass each.
"""
import torch

from ochat.kernels.fused import fused_enabled

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                       scale_in_float32: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension in float32, scaled by `weight + offset` (see the module docstring)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if scale_in_float32:
        return (normed * (weight.float() + offset)).to(x.dtype)
    scale = weight + offset if offset else weight
    return scale * normed.to(x.dtype)


if triton is not None:

    @triton.jit
    def _rms_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, N, eps, offset, BLOCK: tl.constexpr,
                        SCALE_F32: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
        normed = x * rstd
        if not SCALE_F32:
            normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)  # cast back first, as Llama does
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
        tl.store(y_ptr + row * N + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, M, N, offset, ROWS: tl.constexpr,
                        BLOCK: tl.constexpr, SCALE_F32: tl.constexpr, WRITE_DW: tl.constexpr):
        """Each program handles ROWS rows and (WRITE_DW) writes one row of partial dw sums."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(ROWS):
            row = (pid * ROWS + i).to(tl.int64)
            if row < M:
                x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(rstd_ptr + row)
                n = x * rstd
                if WRITE_DW:
                    if SCALE_F32:
                        dw += dy * n
                    else:
                        dw += dy * n.to(x_ptr.dtype.element_ty).to(tl.float32)
                dn = dy * w
                dx = rstd * (dn - n * (tl.sum(dn * n, 0) / N))
                tl.store(dx_ptr + row * N + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if WRITE_DW:
            tl.store(dw_ptr + pid * N + cols, dw, mask=mask)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, scale_in_float32):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        m, n = x2.shape
        out_dtype = x.dtype if scale_in_float32 else torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty((m, n), dtype=out_dtype, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n)
        if m:
            _rms_fwd_kernel[(m,)](x2, weight, y, rstd, n, eps, offset, BLOCK=block, SCALE_F32=scale_in_float32,
                                  num_warps=8 if block >= 2048 else 4)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape, ctx.offset, ctx.scale_in_float32 = shape, offset, scale_in_float32
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = dy.reshape(m, n).contiguous()
        dx = torch.empty_like(x2)
        need_dw = ctx.needs_input_grad[1]  # a frozen weight (LoRA) gets no partial sums and no reduction
        rows = 16 if x2.is_cuda else 4
        if not need_dw:
            rows = 1  # one row per program, as many programs as rows: no dw to accumulate per program
        grid = max(1, triton.cdiv(m, rows))
        dw_part = torch.zeros((grid, n) if need_dw else (1, 1), dtype=torch.float32, device=x2.device)
        block = triton.next_power_of_2(n)
        if m:
            _rms_bwd_kernel[(grid,)](dy2, x2, weight, rstd, dx, dw_part, m, n, ctx.offset, ROWS=rows, BLOCK=block,
                                     SCALE_F32=ctx.scale_in_float32, WRITE_DW=need_dw,
                                     num_warps=8 if block >= 2048 else 4)
        return dx.view(ctx.shape), dw_part.sum(0).to(weight.dtype) if need_dw else None, None, None, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                    scale_in_float32: bool = False) -> torch.Tensor:
    """Fused Triton RMSNorm (forward and backward); same result as the reference."""
    return _RMSNormFn.apply(x, weight, eps, float(offset), bool(scale_in_float32))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             scale_in_float32: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension; the fastest implementation available for x's device."""
    if x.is_cuda and triton is not None and fused_enabled("rms_norm"):
        return rms_norm_triton(x, weight, eps, offset, scale_in_float32)
    return rms_norm_reference(x, weight, eps, offset, scale_in_float32)
