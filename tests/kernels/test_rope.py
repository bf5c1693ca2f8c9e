"""Fused Triton rotary embedding vs the reference: CPU under TRITON_INTERPRET=1, GPU marked `gpu`."""
import os

import pytest
import torch

from ochat.kernels import rope


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _cos_sin(position_ids, d, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
    ang = position_ids.float()[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    return emb.cos(), emb.sin()


def _check(t, hq, hk, d, device, dtype, tol, seed=0, rotary_dim=None):
    g = torch.Generator().manual_seed(seed)
    # packed positions: restart at 0 per conversation
    pos = torch.cat([torch.arange(n) for n in (t // 2, t - t // 2)])
    cos, sin = (c.to(device, dtype) for c in _cos_sin(pos, rotary_dim or d))  # in the activations dtype, as the model passes them
    qkv = torch.randn(t, hq + 2 * hk, d, generator=g).to(device, dtype).requires_grad_()
    dq = torch.randn(t, hq, d, generator=g).to(device, dtype)
    dk = torch.randn(t, hk, d, generator=g).to(device, dtype)
    outs = []
    # on the CPU the kernel is called directly; the dispatcher (the kernel on CUDA) handles partial rotary
    tested = rope.apply_rotary_triton if device == "cpu" and rotary_dim is None else rope.apply_rotary
    for fn in (rope.apply_rotary_reference if rotary_dim is None else partial_rotary_reference, tested):
        qkv.grad = None
        q, k = qkv[:, :hq], qkv[:, hq:hq + hk]  # strided views, as a fused qkv projection gives
        qo, ko = fn(q, k, cos, sin)
        torch.autograd.backward((qo, ko), (dq, dk))
        outs.append((qo.detach(), ko.detach(), qkv.grad.clone()))
    for a, b in zip(outs[1], outs[0]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _rel(a, b) < tol


def test_interpreted_float32():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton interpreter off (CUDA present): the gpu tests cover the kernel")
    _check(7, 4, 2, 8, "cpu", torch.float32, 1e-6)


def partial_rotary_reference(q, k, cos, sin):
    """transformers' Phi-3 rotary embedding (partial_rotary_factor < 1), on [T, H, D] as ochat lays q and k out."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)  # cos [T, 1, rotary_dim] against [T, H, D]


def test_partial_rotary_matches_transformers_phi3():
    """Reference path on the CPU: only the first rotary_dim features rotate."""
    _check(9, 4, 2, 16, "cpu", torch.float32, 1e-6, rotary_dim=12)


def test_interpreted_partial_rotary_strided():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton interpreter off (CUDA present): the gpu tests cover the kernel")
    with pytest.MonkeyPatch.context() as mp:  # route the dispatcher to the kernel on CPU tensors
        mp.setattr(rope, "apply_rotary_reference", rope.apply_rotary_triton)
        g = torch.Generator().manual_seed(3)
        pos = torch.arange(6)
        cos, sin = _cos_sin(pos, 12)
        q, k = torch.randn(6, 4, 16, generator=g), torch.randn(6, 2, 16, generator=g)
        out = rope.apply_rotary(q, k, cos, sin)
    ref = partial_rotary_reference(q, k, cos, sin)
    for a, b in zip(out, ref):
        assert _rel(a, b) < 1e-6


def test_interpreted_heads_not_power_of_two():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton interpreter off (CUDA present): the gpu tests cover the kernel")
    _check(5, 3, 1, 6, "cpu", torch.float32, 1e-6, seed=1)


@pytest.mark.gpu
@pytest.mark.parametrize("rotary_dim", [None, 48])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_gpu(dtype, tol, rotary_dim):
    _check(4099, 32, 4, 64, "cuda", dtype, tol, rotary_dim=rotary_dim)
