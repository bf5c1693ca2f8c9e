"""Fused Triton SwiGLU and GeGLU vs the reference: CPU under TRITON_INTERPRET=1 (tiny shapes), GPU marked `gpu`."""
import os

import pytest
import torch

from ochat.kernels import swiglu as sg


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _check(shape, device, dtype, tol, act="silu", seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = (3 * torch.randn(*shape, generator=g)).to(device, dtype).requires_grad_()  # both tails of the activation
    up = torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()
    dout = torch.randn(*shape, generator=g).to(device, dtype)
    # float64 math is the reference; the fused kernel must be at least as close to it as the unfused op
    gate64, up64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    ref = sg.glu_reference(gate64, up64, act)
    ref.backward(dout.double())
    outs = {}
    for name, fn in (("reference", sg.glu_reference), ("fused", sg.glu_triton)):
        gate.grad = up.grad = None
        y = fn(gate, up, act)
        y.backward(dout)
        assert y.dtype == dtype and gate.grad.dtype == dtype and y.shape == gate.shape
        outs[name] = [_rel(y, ref), _rel(gate.grad, gate64.grad), _rel(up.grad, up64.grad)]
    for fused_err, ref_err in zip(outs["fused"], outs["reference"]):
        assert fused_err < tol and fused_err <= 2 * ref_err + 1e-7, outs


@pytest.mark.parametrize("act", sg.ACTIVATIONS)
def test_interpreted_float32(act):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton interpreter off (CUDA present): the gpu tests cover the kernel")
    _check((37, 45), "cpu", torch.float32, 1e-6, act)  # 1665 elements: two blocks, a ragged last one


def test_dispatch_cpu_is_reference_and_gelu_is_transformers():
    from transformers.activations import ACT2FN

    gate, up = torch.randn(4, 8), torch.randn(4, 8)
    for act in sg.ACTIVATIONS:
        assert torch.equal(sg.glu(gate, up, act), sg.glu_reference(gate, up, act))
        torch.testing.assert_close(sg.glu_reference(gate, up, act), ACT2FN[act](gate) * up, rtol=0, atol=0)
    with pytest.raises(ValueError, match="relu"):
        sg.glu(gate, up, "relu")


@pytest.mark.gpu
@pytest.mark.parametrize("act", sg.ACTIVATIONS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_gpu(dtype, tol, act):
    _check((4099, 5632), "cuda", dtype, tol, act)
