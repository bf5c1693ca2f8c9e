"""The one-node LoRA linear layer (ochat.kernels.lora_linear) against peft's computation, on the CPU: the same output
and gradients (float64; an NF4 base in float32), no weight-gradient matmul for a frozen base weight, half the
elements written; and in a LoRA model, no gradient computed for any frozen weight."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ochat.kernels.lora_linear import lora_linear, lora_linear_reference
from ochat.model import lora, qlora
from ochat.model.transforms import ModelTransforms, apply_transforms
from tests.helpers.models import make_pack, make_pair

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.addmm.default, aten.addmm_.default, aten.bmm.default}
# the ops that write memory in these layers (views, transposes and detaches write none)
WRITES = MATMULS | {aten.mul.Tensor, aten.mul_.Tensor, aten.add.Tensor, aten.add_.Tensor, aten.sum.dim_IntList}


class Ops(TorchDispatchMode):
    """Records each aten op's name and its output shapes and element counts."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.calls.append((func, [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)],
                           sum(o.numel() for o in outs if isinstance(o, torch.Tensor))))
        return out

    def matmul_shapes(self) -> list[tuple]:
        return [s for func, shapes, _ in self.calls if func in MATMULS for s in shapes]

    def written(self) -> int:
        """Elements the computing ops wrote."""
        return sum(n for func, _, n in self.calls if func in WRITES)


def inputs(dtype, *, bias=True, trainable_weight=False, t=37, d_in=64, d_out=96, r=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, d_in, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(d_out, d_in, generator=g, dtype=dtype) / 8).requires_grad_(trainable_weight)
    b = torch.randn(d_out, generator=g, dtype=dtype).requires_grad_(trainable_weight) if bias else None
    a = torch.randn(r, d_in, generator=g, dtype=dtype).requires_grad_()
    bb = torch.randn(d_out, r, generator=g, dtype=dtype).requires_grad_()
    return x, w, b, a, bb


def run(fn, x, w, b, a, bb, scale=2.0):
    for t in (x, w, b, a, bb):
        if t is not None:
            t.grad = None
    out = fn(x, w, b, a, bb, scale)
    out.backward(torch.ones_like(out).mul_(torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype, device=out.device)))
    return out.detach(), [None if t is None or t.grad is None else t.grad.clone() for t in (x, w, b, a, bb)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("trainable_weight", [True, False])
def test_same_output_and_gradients_as_peft(bias, trainable_weight):
    tensors = inputs(torch.float64, bias=bias, trainable_weight=trainable_weight)
    (out, grads), (ref, ref_grads) = run(lora_linear, *tensors), run(lora_linear_reference, *tensors)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_nf4_base_weight_same_as_peft():
    x, w, b, a, bb = inputs(torch.float32)
    w = qlora.quantize(w.detach())
    (out, grads), (ref, ref_grads) = run(lora_linear, x, w, b, a, bb), run(lora_linear_reference, x, w, b, a, bb)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def forward_backward_ops(fn, tensors) -> Ops:
    grad = torch.randn(37, 96)
    with Ops() as ops:
        fn(*tensors, 2.0).backward(grad)
    return ops


def test_frozen_weight_gets_no_weight_gradient_matmul_and_half_the_writes():
    tensors = inputs(torch.float32)
    ours, peft = forward_backward_ops(lora_linear, tensors), forward_backward_ops(lora_linear_reference, tensors)
    for ops in (ours, peft):
        assert (96, 64) not in ops.matmul_shapes()  # dW = g^T x: [out, in]
    # per token: base output + adapter accumulated in place, input gradient + adapter's added in place (and the
    # rank-r products), against peft's extra adapter output, scaled copy, sum, scaled gradient and summed gradients
    assert ours.written() < 0.6 * peft.written()
    trainable = forward_backward_ops(lora_linear, inputs(torch.float32, trainable_weight=True))
    assert trainable.matmul_shapes().count((96, 64)) == 1


@pytest.mark.parametrize("quantized", [False, True])
def test_a_lora_model_computes_no_gradient_of_a_frozen_weight(quantized):
    cfg, model, _ = make_pair("llama2")
    apply_transforms(model, ModelTransforms(lora_rank=4, qlora=quantized))
    layers = lora.wrapped_layers(model)
    assert len(layers) == cfg.num_hidden_layers * 7 and all(m.forward.func is lora._one_node_forward for m in layers)
    frozen_shapes = {tuple(p.shape) for p in model.parameters() if not p.requires_grad and p.dim() == 2}
    frozen_shapes |= {tuple(m.base_layer.weight.shape) for m in layers}
    seqs, ids, pos, cu, mx = make_pack(cfg)
    assert len(ids) not in {n for s in frozen_shapes for n in s}  # no input-gradient shape looks like a weight's
    with Ops() as ops:
        model(ids, pos, cu, mx, labels=ids, label_weights=torch.ones(len(ids))).weighted_loss.backward()
    assert not frozen_shapes & set(ops.matmul_shapes())
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("nf4", [False, True])
def test_bf16_on_the_gpu_matches_peft_in_float32(nf4):
    """On a GPU in bf16 (a dense or an NF4 base weight): the output and gradients of peft's computation in float32
    on the same bf16 values, within bf16 rounding."""
    x, w, b, a, bb = (t.detach().cuda().to(torch.bfloat16) for t in inputs(torch.float32, t=4099, d_in=1024,
                                                                            d_out=2048, r=16))
    base = qlora.quantize(w) if nf4 else w
    ours = [x.requires_grad_(), base, b.requires_grad_(), a.requires_grad_(), bb.requires_grad_()]
    ref_base = qlora.dequantize(base) if nf4 else w
    refs = [t.detach().float().requires_grad_(t is not ref_base) for t in (x, ref_base, b, a, bb)]
    (out, grads), (ref, ref_grads) = run(lora_linear, *ours), run(lora_linear_reference, *refs)
    scale = ref.abs().max()
    assert (out.float() - ref).abs().max() < 2e-2 * scale
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if g is not None:
            assert (g.float() - r).abs().max() < 2e-2 * r.abs().max(), (g.float() - r).abs().max()
