"""Rotary position embedding on packed tokens (the Hugging Face "rotate half" convention).

`cos` and `sin` are per token `[T, rotary_dim]` (the two halves repeated), built by the model from
`position_ids`, so positions restart at 0 for every packed conversation. `rotary_dim` is the head size, or less
for partial rotary embeddings (Phi-4-mini's `partial_rotary_factor`): then only the first `rotary_dim` features
of each head rotate and the rest pass through, as transformers' Phi-3 does. On CUDA (unless switched off through
`ochat.kernels.fused`) one Triton kernel rotates q and k together, forward and backward.
"""
import torch

from ochat.kernels.fused import fused_enabled

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q `[T, Hq, D]` and k `[T, Hkv, D]` by per-token angles; cos/sin are `[T, D]`."""
    cos = cos.unsqueeze(1).to(q.dtype)
    sin = sin.unsqueeze(1).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


if triton is not None:

    @triton.jit
    def _rotate_heads(x_ptr, o_ptr, sx_t, sx_h, so_t, so_h, t, H, c1, c2, s1, s2, half,
                      BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
        heads = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (heads < H) & (d < half)
        xp = x_ptr + t * sx_t + heads * sx_h + d
        op = o_ptr + t * so_t + heads * so_h + d
        x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + half, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # transpose of the rotation: dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1
            o1 = x1 * c1 + x2 * s2
            o2 = x2 * c2 - x1 * s1
        else:  # o = x cos + rotate_half(x) sin, rotate_half(x) = [-x2, x1]
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        tl.store(op, o1.to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(op + half, o2.to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
                     sq_t, sq_h, sk_t, sk_h, sqo_t, sqo_h, sko_t, sko_h, sc_t,
                     HQ, HK, half,
                     BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
        """One program per token: all q heads and all k heads of that token."""
        t = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK_D)[None, :]
        dm = d < half
        c1 = tl.load(cos_ptr + t * sc_t + d, mask=dm, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + t * sc_t + half + d, mask=dm, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + t * sc_t + d, mask=dm, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + t * sc_t + half + d, mask=dm, other=0.0).to(tl.float32)
        _rotate_heads(q_ptr, qo_ptr, sq_t, sq_h, sqo_t, sqo_h, t, HQ, c1, c2, s1, s2, half, BLOCK_HQ, BLOCK_D, BACKWARD)
        _rotate_heads(k_ptr, ko_ptr, sk_t, sk_h, sko_t, sko_h, t, HK, c1, c2, s1, s2, half, BLOCK_HK, BLOCK_D, BACKWARD)


def _rope_launch(q, k, cos, sin, backward):
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cos = cos.contiguous()
    sin = sin.contiguous()
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    t, hq, d = q.shape
    hk = k.shape[1]
    if t:
        _rope_kernel[(t,)](
            q, k, qo, ko, cos, sin,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1),
            cos.stride(0), hq, hk, d // 2,
            BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(hk),
            BLOCK_D=triton.next_power_of_2(d // 2), BACKWARD=backward, num_warps=4,
        )
    return qo, ko


class _RotaryFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(q, k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _rope_launch(dq, dk, cos, sin, True)
        return dq, dk, None, None


def apply_rotary_triton(q, k, cos, sin):
    """Fused Triton rotary embedding of q and k (forward and backward); cos/sin get no gradient."""
    return _RotaryFn.apply(q, k, cos, sin)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k (of their first `cos.shape[-1]` features); the fastest implementation
    available for their device."""
    rotate = apply_rotary_reference
    if q.is_cuda and triton is not None and fused_enabled("rope"):
        rotate = apply_rotary_triton
    rd = cos.shape[-1]
    if rd == q.shape[-1]:
        return rotate(q, k, cos, sin)
    q_rot, k_rot = rotate(q[..., :rd], k[..., :rd], cos, sin)  # strided views: the kernel takes them as they are
    return torch.cat((q_rot, q[..., rd:]), -1), torch.cat((k_rot, k[..., rd:]), -1)
