"""Fused weighted linear cross-entropy vs the full-logits reference.

CPU: the chunked PyTorch path, and the Triton kernel under TRITON_INTERPRET=1 (tiny shapes).
GPU (marker `gpu`): Triton path in float32 and bf16, and the peak-memory target.
"""
import functools
import os

import pytest
import torch

from ochat.kernels import linear_cross_entropy as lce
from ochat.kernels.fused import set_fused


def _inputs(n, h, v, device="cpu", dtype=torch.float32, seed=0, zero_frac=0.4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g) 
    weight = torch.randn(v, h, generator=g) / h**0.5
    labels = torch.randint(0, v, (n,), generator=g)
    w = torch.rand(n, generator=g)
    w[torch.rand(n, generator=g) < zero_frac] = 0.0
    w[w > 0.7] = 0.1  # a second condition weight, as in GPT3 data
    labels[w == 0] = -100  # weight-0 labels may be anything
    hidden = hidden.to(device, dtype).requires_grad_()
    weight = weight.to(device, dtype).requires_grad_()
    return hidden, weight, labels.to(device), w.to(device)


def _run(fn, hidden, weight, labels, w, grad_scale=0.7, **kw):
    hidden.grad = weight.grad = None
    sums = fn(hidden, weight, labels, w, **kw)
    (sums.weighted_loss * grad_scale).backward()
    return sums, hidden.grad.clone(), weight.grad.clone()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _check(fn, n=37, h=16, v=50, device="cpu", dtype=torch.float32, tol=1e-5, seed=0, **kw):
    args = _inputs(n, h, v, device, dtype, seed)
    ref, rgh, rgw = _run(lce.weighted_linear_cross_entropy_reference, *args, **kw)
    out, gh, gw = _run(fn, *args, **kw)
    assert abs(out.weighted_loss.item() - ref.weighted_loss.item()) <= tol * abs(ref.weighted_loss.item())
    assert out.weight.item() == pytest.approx(ref.weight.item(), rel=1e-6)
    assert out.targets.item() == ref.targets.item()
    if dtype == torch.float32:
        assert out.correct.item() == ref.correct.item()
    assert _rel(gh, rgh) < tol and _rel(gw, rgw) < tol
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()


def test_chunked_torch_matches_reference(monkeypatch):
    monkeypatch.setattr(lce, "_CHUNK_ELEMENTS", 500)  # several chunks, a ragged last one
    _check(lambda *a: lce.weighted_linear_cross_entropy_fused(*a, use_triton=False))


def test_triton_interpreted_matches_reference(monkeypatch):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton interpreter off (CUDA present): the gpu tests cover the kernel")
    monkeypatch.setattr(lce, "_CHUNK_ELEMENTS", 16 * 50)
    # Triton kernel on CPU tensors (interpreter); weight-0 rows stay in (no CPU compaction in the kernel).
    fn = lambda h, W, y, w: lce._FusedLinearCE.apply(h, W, y, w, True, None)  # noqa: E731
    args = _inputs(21, 8, 50, seed=1)
    ref, rgh, rgw = _run(lce.weighted_linear_cross_entropy_reference, *args)
    hidden, weight, labels, w = args
    hidden.grad = weight.grad = None
    loss, correct = fn(hidden, weight, labels, w)
    (loss * 0.7).backward()
    assert loss.item() == pytest.approx(ref.weighted_loss.item(), rel=1e-5)
    assert correct.item() == ref.correct.item()
    assert _rel(hidden.grad, rgh) < 1e-5 and _rel(weight.grad, rgw) < 1e-5


def _float64_reference(hidden, weight, labels, w, softcap, grad_scale=0.7):
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    sums = lce.weighted_linear_cross_entropy_reference(h64, w64, labels, w, softcap=softcap)
    (sums.weighted_loss * grad_scale).backward()
    return sums, h64.grad, w64.grad


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_soft_capped_loss_and_gradients_match_float64(monkeypatch, path):
    """Gemma 2's final-logit soft-capping inside the chunked loss, against float64 math on the capped logits."""
    if path == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton interpreter off (CUDA present): the gpu tests cover the kernel")
    monkeypatch.setattr(lce, "_CHUNK_ELEMENTS", 16 * 50)  # two chunks, a ragged last one
    hidden, weight, labels, w = _inputs(21, 8, 50, seed=4)
    with torch.no_grad():
        hidden.mul_(2.0)  # logits of a few units: a cap of 1.5 bends most of them
    cap = 1.5
    ref, rgh, rgw = _float64_reference(hidden, weight, labels, w, cap)
    uncapped = lce.weighted_linear_cross_entropy_reference(hidden, weight, labels, w)
    assert abs(uncapped.weighted_loss.item() - ref.weighted_loss.item()) > 0.1 * ref.weighted_loss.item()
    out = lce.weighted_linear_cross_entropy_fused(hidden, weight, labels, w, use_triton=path == "triton", softcap=cap)
    (out.weighted_loss * 0.7).backward()
    assert out.weighted_loss.item() == pytest.approx(ref.weighted_loss.item(), rel=1e-6)
    assert out.correct.item() == ref.correct.item()
    assert _rel(hidden.grad, rgh) < 1e-5 and _rel(weight.grad, rgw) < 1e-5


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_trained_rows_take_their_rows_of_the_whole_weights_gradient(monkeypatch, softcap, path):
    """A frozen weight with rows replaced by trained values (LoRA's trainable tokens, `rows`): the loss and hidden
    gradient of the weight with those values in place, and the values' gradient those rows of the whole weight's
    gradient, by the chunked path (which computes no [V, H] gradient) and by the reference."""
    if path == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton interpreter off (CUDA present): the gpu tests cover the kernel")
    monkeypatch.setattr(lce, "_CHUNK_ELEMENTS", 500)  # several chunks, a ragged last one
    hidden, weight, labels, w = _inputs(37, 16, 50, seed=5)
    weight.requires_grad_(False)
    ids = torch.tensor([41, 3, 7])
    labels[(w > 0).nonzero().squeeze(1)[::3]] = 41  # the trained rows among the labels too
    g = torch.Generator().manual_seed(6)
    values = (weight[ids] + 0.3 * torch.randn(3, 16, generator=g)).requires_grad_()
    whole = weight.index_copy(0, ids, values.detach()).requires_grad_()
    ref, ref_gh, ref_gw = _run(lce.weighted_linear_cross_entropy_reference, hidden, whole, labels, w, softcap=softcap)
    fused = functools.partial(lce.weighted_linear_cross_entropy_fused, use_triton=path == "triton")
    for fn in (fused, lce.weighted_linear_cross_entropy_reference):
        hidden.grad = values.grad = None
        out = fn(hidden, weight, labels, w, softcap=softcap, rows=(ids, values))
        (out.weighted_loss * 0.7).backward()
        assert out.weighted_loss.item() == pytest.approx(ref.weighted_loss.item(), rel=1e-6)
        assert _rel(hidden.grad, ref_gh) < 1e-6 and _rel(values.grad, ref_gw[ids]) < 1e-6
        assert weight.grad is None


def test_soft_capped_reference_is_transformers_gemma2_formula():
    logits = torch.randn(5, 7) * 40
    torch.testing.assert_close(lce.soft_cap(logits, 30.0), torch.tanh(logits / 30.0) * 30.0, rtol=0, atol=0)
    assert lce.soft_cap(logits, None) is logits


def test_all_weights_zero_and_switch():
    hidden, weight, labels, w = _inputs(9, 8, 20, seed=2)
    w.zero_()
    out = lce.weighted_linear_cross_entropy(hidden, weight, labels, w)
    assert out.weighted_loss.item() == 0 and out.targets.item() == 0
    out.weighted_loss.backward()
    assert hidden.grad.abs().sum() == 0
    set_fused("linear_ce", False)
    try:
        _check(lce.weighted_linear_cross_entropy)
    finally:
        set_fused("linear_ce", True)


def test_no_grad_forward():
    hidden, weight, labels, w = _inputs(11, 8, 20, seed=3)
    with torch.no_grad():
        out = lce.weighted_linear_cross_entropy(hidden, weight, labels, w)
        ref = lce.weighted_linear_cross_entropy_reference(hidden, weight, labels, w)
    assert out.weighted_loss.item() == pytest.approx(ref.weighted_loss.item(), rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 2e-2)])
def test_gpu_triton(dtype, tol, softcap, monkeypatch):
    monkeypatch.setattr(lce, "_CHUNK_ELEMENTS", 300 * 32002)
    # float32 matmuls may use tf32 on GPU: tolerance covers it
    _check(lce.weighted_linear_cross_entropy, n=1000, h=256, v=32002, device="cuda", dtype=dtype, tol=tol,
           softcap=softcap)
