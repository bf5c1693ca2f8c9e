"""Attention dispatch: backend resolution, the SDPA reference against a dense masked attention, GPU backends."""
import logging

import pytest
import torch

from ochat.kernels import attention
from ochat.kernels.attention import resolve_backend, varlen_attention, varlen_attention_sdpa


def dense_reference(q, k, v, cu, window=None, scale=None, softcap=None):
    """One big attention with an explicit block-diagonal causal (and windowed) mask, float64."""
    t, hq, d = q.shape
    rep = hq // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
    i = torch.arange(t)
    mask = (seg[:, None] == seg[None, :]) & (i[:, None] >= i[None, :])
    if window is not None:
        mask &= (i[:, None] - i[None, :]) < window
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * (d ** -0.5 if scale is None else scale)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.double()).to(q.dtype)


def pack(lengths, hq=4, hkv=2, d=16, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q, k, v = (torch.randn(t, h, d, generator=g).to(device, dtype) for h in (hq, hkv, hkv))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return q, k, v, cu, max(lengths)


@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("scale", [None, 0.6])
@pytest.mark.parametrize("window", [None, 3])
def test_sdpa_reference_matches_dense_masked_attention(window, scale, softcap):
    q, k, v, cu, mx = pack([5, 1, 12, 7])
    out = varlen_attention(q, k, v, cu, mx, window=window, backend="sdpa", scale=scale, softcap=softcap)
    torch.testing.assert_close(out, dense_reference(q, k, v, cu.cpu(), window, scale, softcap), rtol=1e-5, atol=1e-6)
    if scale is not None or softcap is not None:  # the variant changes the result
        assert not torch.allclose(out, varlen_attention(q, k, v, cu, mx, window=window, backend="sdpa"), atol=1e-3)


def test_soft_capped_reference_matches_transformers_gemma2_eager_attention():
    """One conversation through transformers' own Gemma 2 eager attention (softcap, query_pre_attn_scalar)."""
    from types import SimpleNamespace

    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    q, k, v, cu, mx = pack([11])
    causal = torch.full((11, 11), float("-inf")).triu(1)[None, None]
    module = SimpleNamespace(num_key_value_groups=2, head_dim=16, training=False)
    ref, _ = eager_attention_forward(module, *(x.transpose(0, 1)[None] for x in (q, k, v)), causal,
                                     scaling=20 ** -0.5, softcap=2.0)
    out = varlen_attention(q, k, v, cu, mx, backend="sdpa", scale=20 ** -0.5, softcap=2.0)
    torch.testing.assert_close(out, ref[0], rtol=1e-5, atol=1e-6)


def test_a_backend_that_cannot_run_a_variant_falls_back_with_the_reason_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(attention, "available", lambda name, device: name != "flash_attn_4")  # a GPU with FA2, torch
    monkeypatch.setattr(attention, "_FA_PARAMS", set())  # a flash-attn without softcap
    monkeypatch.setattr(attention, "_logged", set())
    with caplog.at_level(logging.INFO, logger="ochat.kernels.attention"):
        assert resolve_backend("auto", "cpu", softcap=True, window=True, scale=True) == "sdpa"
        assert resolve_backend("torch_varlen", "cpu", softcap=True) == "sdpa"
        assert resolve_backend("auto", "cpu", window=True, scale=True) == "flash_attn"
    skips = [r.getMessage() for r in caplog.records if "cannot run" in r.getMessage()]
    assert len(skips) == 2 and "flash-attn >= 2.6" in skips[0] and "soft-capping" in skips[1]
    assert attention.unsupported("sdpa", softcap=True, window=True, scale=True) is None
    with pytest.raises(NotImplementedError, match="soft-capping"):
        varlen_attention(*pack([3])[:4], 3, backend="torch_varlen", softcap=1.0)


@pytest.mark.parametrize("window", [None, 3])
def test_sinks_reference_matches_a_float64_softmax_with_a_sink_logit(window):
    """gpt-oss's sinks: out = sum_j exp(s_j) v_j / (sum_j exp(s_j) + exp(sink_h)), computed here in float64 from scratch
    (each conversation alone, GQA, a window); the sinks' gradient too."""
    lengths = [5, 1, 12, 7]
    q, k, v, cu, mx = pack(lengths)
    sinks = torch.tensor([-1.0, 0.0, 0.7, 2.5], requires_grad=True)
    out = varlen_attention(q, k, v, cu, mx, window=window, backend="sdpa", sinks=sinks)
    proj = torch.randn_like(out)
    (out * proj).sum().backward()

    sinks64 = sinks.detach().double().requires_grad_()
    want = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        for t in range(a, b):
            for h in range(4):
                keys = [j for j in range(a, t + 1) if window is None or t - j < window]
                s = torch.stack([q[t, h].double() @ k[j, h // 2].double() / 4.0 for j in keys])  # scale 16 ** -0.5
                w = s.exp() / (s.exp().sum() + sinks64[h].exp())
                want.append(w @ torch.stack([v[j, h // 2].double() for j in keys]))
    want = torch.stack(want).view(sum(lengths), 4, 16)
    (want * proj.double()).sum().backward()
    torch.testing.assert_close(out, want.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sinks.grad, sinks64.grad.float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, varlen_attention(q, k, v, cu, mx, window=window, backend="sdpa"), atol=1e-3)
    with pytest.raises(ValueError, match="sinks of shape"):
        varlen_attention(q, k, v, cu, mx, backend="sdpa", sinks=sinks[:2])


@pytest.mark.parametrize("window", [None, 3])
def test_sink_as_a_key_equals_the_explicit_sinks_reference(window):
    """The GPU's sdpa path for sinks (one more key) against the explicit scores, on the CPU: output and gradients."""
    q, k, v, _, _ = pack([13], hq=4, hkv=4)
    sinks = torch.tensor([-1.0, 0.0, 0.7, 2.5])
    i = torch.arange(13)
    mask = (i[:, None] >= i[None, :]) & ((i[:, None] - i[None, :] < window) if window else True)
    results = []
    for run in ("key", "explicit"):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, sinks)]
        if run == "key":
            out = attention.sdpa_with_sink_key(*(x.transpose(0, 1) for x in leaves[:3]), mask, 0.25,
                                               leaves[3]).transpose(0, 1)
        else:
            out = varlen_attention_sdpa(*leaves[:3], torch.tensor([0, 13], dtype=torch.int32), window=window,
                                        sinks=leaves[3])
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out] + [x.grad for x in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_backends_without_sinks_fall_back():
    assert "no attention sinks" in attention.unsupported("flash_attn", sinks=True)
    assert "no attention sinks" in attention.unsupported("torch_varlen", sinks=True)
    assert attention.unsupported("sdpa", sinks=True, window=True, softcap=True) is None
    assert resolve_backend("auto", "cpu", sinks=True, window=True) == "sdpa"


def test_leaky_variant_differs():
    q, k, v, cu, mx = pack([5, 9])
    ok = varlen_attention_sdpa(q, k, v, cu)
    leak = varlen_attention_sdpa(q, k, v, cu.new_tensor([0, len(q)]))
    torch.testing.assert_close(ok[:5], leak[:5])  # nothing precedes the first conversation
    assert not torch.allclose(ok[5:], leak[5:])


def test_resolve_backend_on_cpu_and_logging(caplog):
    with caplog.at_level(logging.INFO, logger="ochat.kernels.attention"):
        assert resolve_backend("auto", "cpu") == "sdpa"  # logs the choice, unless an earlier test resolved it
        caplog.clear()
        assert resolve_backend("auto", "cpu") == "sdpa"
    assert not any("attention backend" in r.message for r in caplog.records)  # logged once
    with pytest.raises(RuntimeError, match="not available"):
        resolve_backend("flash_attn", "cpu")
    with pytest.raises(RuntimeError, match="not available"):
        resolve_backend("torch_varlen", "cpu")
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("xformers", "cpu")


def test_empty_pack():
    q = torch.zeros(0, 4, 16)
    k = torch.zeros(0, 2, 16)
    out = varlen_attention(q, k, k, torch.zeros(1, dtype=torch.int32), 0, backend="sdpa")
    assert out.shape == (0, 4, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn_4", "torch_varlen", "flash_attn", "sdpa"])
@pytest.mark.parametrize("window,scale,softcap", [(None, None, None), (64, None, None), (None, 0.1, None),
                                                  (64, 0.1, 2.0)])
def test_gpu_backend_matches_reference_bf16(backend, window, scale, softcap):
    if not torch.cuda.is_available() or not attention.available(backend, "cuda"):
        pytest.skip(f"{backend} not available")
    reason = attention.unsupported(backend, softcap=softcap is not None, window=window is not None,
                                   scale=scale is not None)
    if reason:
        pytest.skip(reason)
    q, k, v, cu, mx = pack([300, 1, 1024, 77, 513], hq=8, hkv=2, d=64, device="cuda", dtype=torch.bfloat16)
    for x in (q, k, v):
        x.requires_grad_(True)
    out = varlen_attention(q, k, v, cu, mx, window=window, backend=backend, scale=scale, softcap=softcap)
    q32, k32, v32 = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref = varlen_attention_sdpa(q32, k32, v32, cu, window=window, scale=scale, softcap=softcap)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel
    go = torch.randn_like(ref)
    out.backward(go.to(out.dtype))
    ref.backward(go)
    for a, b in ((q, q32), (k, k32), (v, v32)):
        assert ((a.grad.float() - b.grad).norm() / b.grad.norm()).item() < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn_4", "sdpa"])
@pytest.mark.parametrize("window", [None, 64])
def test_gpu_sinks_match_reference_bf16(backend, window):
    """gpt-oss's attention sinks through FlashAttention-4's learnable_sink and through the sdpa backend's sink key:
    output and the gradients of q, k, v and the sinks against the float32 explicit reference (on the CPU)."""
    if not torch.cuda.is_available() or not attention.available(backend, "cuda"):
        pytest.skip(f"{backend} not available")
    reason = attention.unsupported(backend, sinks=True, window=window is not None)
    if reason:
        pytest.skip(reason)
    q, k, v, cu, mx = pack([300, 1, 1024, 77, 513], hq=8, hkv=2, d=64, device="cuda", dtype=torch.bfloat16)
    sinks = torch.linspace(-2, 2, 8, device="cuda", dtype=torch.bfloat16)
    leaves = [x.requires_grad_(True) for x in (q, k, v, sinks)]
    out = varlen_attention(q, k, v, cu, mx, window=window, backend=backend, sinks=sinks)
    refs = [x.detach().float().cpu().requires_grad_(True) for x in leaves]
    ref = varlen_attention_sdpa(*refs[:3], cu.cpu(), window=window, sinks=refs[3])
    assert ((out.float().cpu() - ref).norm() / ref.norm()).item() < 1e-2
    go = torch.randn_like(ref)
    out.backward(go.to("cuda", out.dtype))
    ref.backward(go)
    for a, b in zip(leaves, refs):
        assert ((a.grad.float().cpu() - b.grad).norm() / b.grad.norm()).item() < 2e-2
