"""Fused Triton RMSNorm (Llama, Gemma `(1 + w)`, OLMo 2 float32 scaling) vs the reference: CPU under TRITON_INTERPRET=1 (tiny shapes), GPU marked `gpu`."""
import os

import pytest
import torch

from ochat.kernels import rms_norm as rn


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


STYLES = {"llama": (0.0, False), "gemma": (1.0, True), "olmo2": (0.0, True)}


def _check(shape, device, dtype, tol, style="llama", seed=0):
    offset, scale_in_float32 = STYLES[style]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(device, dtype).requires_grad_()
    dy = torch.randn(*shape, generator=g).to(device, dtype)
    outs = []
    for fn in (rn.rms_norm_reference, rn.rms_norm_triton):
        x.grad = w.grad = None
        y = fn(x, w, 1e-6, offset, scale_in_float32)
        y.backward(dy)
        outs.append((y.detach(), x.grad.clone(), w.grad.clone()))
    for a, b in zip(outs[1], outs[0]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _rel(a, b) < tol


def _check_frozen_weight(shape, device, dtype, style):
    """A frozen weight (LoRA): the kernel's input gradient is the trainable weight's, and no weight gradient is
    computed (the backward returns None for it)."""
    offset, scale_in_float32 = STYLES[style]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(device, dtype)
    dy = torch.randn(*shape, generator=g).to(device, dtype)
    grads = []
    for trainable in (True, False):
        x.grad = None
        w.requires_grad_(trainable)
        y = rn.rms_norm_triton(x, w, 1e-6, offset, scale_in_float32)
        if not trainable:
            assert y.grad_fn.apply(dy)[1] is None  # what the backward returns for the weight
        y.backward(dy)
        grads.append(x.grad.clone())
    assert w.grad is not None and torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("style", list(STYLES))
def test_interpreted_frozen_weight_gets_no_gradient(style):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton interpreter off (CUDA present): the gpu tests cover the kernel")
    _check_frozen_weight((3, 5, 24), "cpu", torch.float32, style)


@pytest.mark.gpu
@pytest.mark.parametrize("style", list(STYLES))
def test_gpu_frozen_weight_gets_no_gradient(style):
    _check_frozen_weight((4099, 2048), "cuda", torch.bfloat16, style)


@pytest.mark.parametrize("style", list(STYLES))
def test_interpreted_float32(style):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton interpreter off (CUDA present): the gpu tests cover the kernel")
    _check((3, 5, 24), "cpu", torch.float32, 1e-5, style)  # 15 rows (ragged vs the backward's row groups), N not a power of 2


def test_dispatch_cpu_is_reference():
    x = torch.randn(4, 8)
    w = torch.randn(8)
    assert torch.equal(rn.rms_norm(x, w, 1e-5), rn.rms_norm_reference(x, w, 1e-5))
    assert torch.equal(rn.rms_norm(x, w, 1e-5, 1.0, True), rn.rms_norm_reference(x, w, 1e-5, 1.0, True))


@pytest.mark.parametrize("module", ["gemma2.modeling_gemma2.Gemma2RMSNorm", "olmo2.modeling_olmo2.Olmo2RMSNorm",
                                    "llama.modeling_llama.LlamaRMSNorm"])
def test_reference_is_transformers_bit_for_bit_in_bf16(module):
    """The cast order matters in bf16: each style equals its transformers norm exactly."""
    import importlib

    path, cls = module.rsplit(".", 1)
    norm = getattr(importlib.import_module(f"transformers.models.{path}"), cls)(16, eps=1e-6)
    style = "gemma" if "Gemma" in cls else "olmo2" if "Olmo" in cls else "llama"
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
        x = torch.randn(5, 16).bfloat16()
        for w in (norm.weight, norm.weight.bfloat16()):
            norm.weight.data = w
            offset, scale_in_float32 = STYLES[style]
            assert torch.equal(rn.rms_norm_reference(x, w, 1e-6, offset, scale_in_float32), norm(x))


@pytest.mark.gpu
@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_gpu(dtype, tol, style):
    _check((4099, 2048), "cuda", dtype, tol, style)
