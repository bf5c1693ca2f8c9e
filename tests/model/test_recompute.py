"""Recompute modes of the decoder layers (ochat.model.recompute): selective recompute gives the loss and gradients of
no recompute (bit-exact on the CPU in float32, the fused Triton kernels interpreted included), keeps packs isolated,
holds less than no recompute and more than full recompute, reruns no GEMM; with LoRA and QLoRA the loss and adapter
gradients of no recompute, rerunning only the adapters' rank-r GEMMs and keeping no dequantised weight; and `auto`'s
plan for a given memory budget (which step is measured, the second, once the optimizer's states exist, needs a GPU:
checked on an H100, see bench/RESULTS.md)."""
import contextlib
import gc
from collections import Counter

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ochat.model import recompute
from ochat.model.recompute import MEMORY_BUDGET, SELECTIVE, Plan, layer_modes, recompute_plan
from ochat.model.transforms import ModelTransforms, apply_transforms
from tests.helpers.models import make_pack, make_pair
from tests.model.test_lora import lora_pair
from tests.model.test_moe import MOE

GiB = 2**30
MODES = ("none", "selective", "selective-attention", "full")


def set_mode(model, mode):
    if mode == "none":
        model.gradient_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(1.0, mode)


def loss_and_grads(model, pack, mode, watch=None):
    """The loss and the gradients of one step in `mode` (None: the layers' modes as they are), the backward run
    inside `watch` (a dispatch mode) when given."""
    _, ids, pos, cu, mx = pack
    model.train()
    model.zero_grad()
    if mode is not None:
        set_mode(model, mode)
    labels = torch.cat([torch.roll(ids[a:b], -1) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])  # per conversation
    out = model(ids, pos, cu, mx, labels=labels, label_weights=torch.ones(len(ids)))
    loss = out.weighted_loss + (out.aux_loss if out.aux_loss is not None else 0.0)
    with watch or contextlib.nullcontext():
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class Gemms(TorchDispatchMode):
    """The GEMMs run while active, each as (op, reduction length K)."""

    def __init__(self):
        super().__init__()
        self.ran = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in recompute.GEMMS:
            self.ran.append((func, (args[1] if func == torch.ops.aten.addmm.default else args[0]).shape[-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["llama2", "qwen2_bias", "qwen3_qk_norm", "gemma2", "phi3_longrope", "olmo2",
                                  "qwen3_moe", "mixtral"])
def test_selective_recompute_gives_the_loss_and_gradients_of_none(name):
    cfg, model, _ = make_pair(name, variants=MOE) if name in MOE else make_pair(name)
    pack = make_pack(cfg)
    loss, grads = loss_and_grads(model, pack, "none")
    for mode in ("selective", "selective-attention"):
        for step in range(2):  # the second one drops the last GEMM's output (its count known from the first)
            got_loss, got = loss_and_grads(model, pack, mode)
            assert torch.equal(got_loss, loss), (mode, step)
            assert got.keys() == grads.keys()
            for n in grads:
                if name in MOE:  # the experts' sums accumulate in another order, as with full recompute
                    torch.testing.assert_close(got[n], grads[n], rtol=1e-6, atol=1e-5, msg=f"{mode} {n}")
                else:
                    assert torch.equal(got[n], grads[n]), f"{mode} step {step}: {n}"


def test_fused_triton_kernels_under_selective_recompute(monkeypatch):
    """The fused RMSNorm, RoPE and GLU (autograd Functions launching Triton, not aten ops) are rerun whole."""
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton interpreter off (CUDA present): the gpu tests cover the kernels")
    from ochat.kernels.rms_norm import rms_norm_triton
    from ochat.kernels.rope import apply_rotary_triton
    from ochat.kernels.swiglu import glu_triton
    from ochat.model import decoder

    monkeypatch.setattr(decoder, "rms_norm", rms_norm_triton)
    monkeypatch.setattr(decoder, "apply_rotary", apply_rotary_triton)
    monkeypatch.setattr(decoder, "glu", glu_triton)
    cfg, model, _ = make_pair("qwen3_qk_norm")
    pack = make_pack(cfg, lengths=[5, 3, 8])
    loss, grads = loss_and_grads(model, pack, "none")
    for mode in ("selective", "selective-attention"):
        got_loss, got = loss_and_grads(model, pack, mode)
        assert torch.equal(got_loss, loss)
        for n in grads:
            assert torch.equal(got[n], grads[n]), f"{mode}: {n}"


@pytest.mark.parametrize("mode", ["selective", "selective-attention"])
def test_packed_gradients_are_the_sum_of_each_conversation_alone(mode):
    cfg, model, _ = make_pair("mistral_window")
    seqs, ids, pos, cu, mx = make_pack(cfg)
    _, packed = loss_and_grads(model, (seqs, ids, pos, cu, mx), mode)
    alone = {n: torch.zeros_like(g) for n, g in packed.items()}
    for s in seqs:
        _, g = loss_and_grads(model, (None, s, torch.arange(len(s)), torch.tensor([0, len(s)], dtype=torch.int32),
                                      len(s)), mode)
        for n in g:
            alone[n] += g[n]
    for n in packed:
        torch.testing.assert_close(packed[n], alone[n], rtol=1e-5, atol=1e-6, msg=n)


class _Storages(TorchDispatchMode):
    """Every storage an op creates while active (weakly), with its size."""

    def __init__(self):
        super().__init__()
        self.made = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                self.made.setdefault(ref.cdata, (ref, t.untyped_storage().nbytes()))
        return out


def held_for_backward(model, pack) -> int:
    """Bytes the forward leaves alive for the backward: storages it made that outlive it, its output's aside."""
    _, ids, pos, cu, mx = pack
    with _Storages() as made:
        hidden = model.hidden_states(ids, pos, cu, mx)
    gc.collect()
    out = hidden.untyped_storage()._cdata
    return sum(size for cdata, (ref, size) in made.made.items() if not ref.expired() and cdata != out)


@pytest.mark.parametrize("name", ["llama2", "qwen3_moe"])
def test_each_mode_holds_less_than_the_one_before(name):
    cfg, model, _ = make_pair(name, variants=MOE) if name in MOE else make_pair(name)
    pack = make_pack(cfg)
    held = {}
    for mode in MODES:
        loss_and_grads(model, pack, mode)  # a first step: the layers' GEMM counts known
        held[mode] = held_for_backward(model, pack)
    print(name, held)
    assert held["none"] > held["selective"] > held["selective-attention"] > held["full"]


def test_selective_recompute_reruns_no_gemm():
    """The backward's GEMMs are the gradients' own (two per linear layer): none of the forward's is rerun."""
    cfg, model, _ = make_pair("llama2")
    pack = make_pack(cfg)
    loss_and_grads(model, pack, "selective")
    _, ids, pos, cu, mx = pack
    hidden = model.hidden_states(ids, pos, cu, mx)
    with Gemms() as gemms:
        hidden.sum().backward()
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    assert len(gemms.ran) == 2 * linears


# ------------------------------------------------------------------------------------------------ LoRA, QLoRA
def max_relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("name,quantized,dropout", [("llama2", False, 0.0), ("qwen2_bias", False, 0.1),
                                                    ("qwen3_moe", True, 0.0)])
def test_lora_under_selective_recompute_gives_the_loss_and_adapter_grads_of_none(name, quantized, dropout):
    """LoRA on every linear layer and the routed experts (QLoRA: over the NF4 base, expert stacks too; dropout:
    peft's forward, the masks drawn alike): in each selective mode the loss and adapter gradients of no recompute
    within 1e-5, none for the base. The backward's GEMMs are those without recompute plus one per adapter (a wrapped
    linear layer or an expert stack's grouped GEMM) on its rank-r product: B's, rerun, not kept; no base GEMM is
    rerun."""
    rank = 4
    cfg, model, _ = lora_pair(name, rank=rank, qlora=quantized, dropout=dropout)
    pack = make_pack(cfg)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    # peft's forward saves B's input before B's GEMM: in the down projection, the layer's last, the recompute stops
    # there (torch's early stop)
    reruns = sum(".lora_B." in n for n in trained) - (cfg.num_hidden_layers if dropout else 0)
    torch.manual_seed(0)
    plain = Gemms()
    loss, grads = loss_and_grads(model, pack, "none", watch=plain)
    assert grads.keys() == trained
    for mode in SELECTIVE:  # one step each: no layer here drops its last GEMM's output (no plain down projection)
        torch.manual_seed(0)
        gemms = Gemms()
        got_loss, got = loss_and_grads(model, pack, mode, watch=gemms)
        assert got.keys() == trained, mode
        assert max_relative_error(got_loss, loss) <= 1e-5, mode
        for n in grads:
            assert max_relative_error(got[n], grads[n]) <= 1e-5, (mode, n)
        rerun = Counter(gemms.ran) - Counter(plain.ran)
        assert not Counter(plain.ran) - Counter(gemms.ran)
        assert [k for _, k in rerun.elements()] == [rank] * reruns, (mode, rerun)


def test_selective_qlora_layers_hold_what_lora_layers_do():
    """Beyond a fully checkpointed layer, a selective QLoRA layer holds exactly what a LoRA layer does: no
    dequantised weight is kept (the parameters' storages, held either way, cancel out)."""
    held = []
    for quantized in (False, True):
        cfg, model, _ = lora_pair("llama2", qlora=quantized)
        pack = make_pack(cfg)
        model.train()
        for mode in ("selective", "full"):
            set_mode(model, mode)
            held.append(held_for_backward(model, pack))
    assert held[0] - held[1] == held[2] - held[3] > 0


# ------------------------------------------------------------------------------------------------ auto
@pytest.mark.parametrize("peak, layer, expect", [
    (40 * GiB, 1 * GiB, 0.0),        # room for all 32 layers' activations: nothing recomputed
    (60 * GiB, 2 * GiB, 26 / 32),    # room for 6 layers (72 GiB budget)
    (71.9 * GiB, 1 * GiB, 1.0),      # no room: every layer
    (75 * GiB, 1 * GiB, 1.0),        # the measured step is already above the budget: every layer, nothing to gain
])
def test_without_selective_the_plan_keeps_as_many_layers_as_fit(peak, layer, expect):
    capacity = 80 * GiB
    plan = recompute_plan(peak, capacity, layer, None, 32)
    assert plan.selective == 0 and plan.full / 32 == pytest.approx(expect)
    assert peak + plan.none * layer <= max(MEMORY_BUDGET * capacity, peak)


@pytest.mark.parametrize("peak, expect", [
    (71 * GiB, Plan(0, 2, 30)),      # 1 GiB of room: two layers selective (0.5 GiB each), the rest full
    (60 * GiB, Plan(0, 24, 8)),      # 12 GiB: 24 selective
    (50 * GiB, Plan(3, 29, 0)),      # 22 GiB: all selective (16 GiB), then 6 GiB / (2.5 - 0.5) GiB: 3 not at all
    (30 * GiB, Plan(13, 19, 0)),     # 42 GiB: all selective (16 GiB), then 26 GiB / 2 GiB: 13 not at all
    (80 * GiB, Plan(0, 0, 32)),      # above the budget: every layer full
])
def test_the_plan_turns_full_layers_selective_first_then_plain(peak, expect):
    plan = recompute_plan(peak, 80 * GiB, 2.5 * GiB, 0.5 * GiB, 32)
    assert plan == expect
    used = plan.none * 2.5 * GiB + plan.selective * 0.5 * GiB
    assert peak + used <= max(MEMORY_BUDGET * 80 * GiB, peak)


def test_layer_modes_spread_full_then_selective_layers():
    assert layer_modes(Plan(0, 0, 4)) == {0: "full", 1: "full", 2: "full", 3: "full"}
    assert layer_modes(Plan(4, 0, 0)) == {}
    assert recompute_plan(0, 80 * GiB, 2 * GiB, 1 * GiB, 32) == Plan(32, 0, 0)  # 64 GiB fit in the 72 GiB budget
    assert layer_modes(Plan(0, 2, 2)) == {0: "full", 2: "full", 1: "selective", 3: "selective"}
    assert layer_modes(Plan(2, 1, 1)) == {0: "full", 1: "selective"}
    modes = layer_modes(Plan(3, 3, 2))
    assert sorted(modes.values()) == ["full"] * 2 + ["selective"] * 3 and len(modes) == 5


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_a_mixed_plan_gives_the_gradients_of_none(lora_rank):
    """Layers none, selective and full side by side, as auto may choose them (with LoRA too: its adapters'
    gradients, B drawn at random so that A's are not zero)."""
    cfg, model, _ = make_pair("four_layers", variants={"four_layers": dict(num_hidden_layers=4)})
    if lora_rank:
        apply_transforms(model, ModelTransforms(lora_rank=lora_rank))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.normal_(std=0.1)
    pack = make_pack(cfg)
    loss, grads = loss_and_grads(model, pack, "none")
    assert grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    model.layer_recompute = layer_modes(Plan(1, 2, 1))
    for _ in range(2):
        got_loss, got = loss_and_grads(model, pack, None)
        assert torch.equal(got_loss, loss)
        for n in grads:
            assert torch.equal(got[n], grads[n]), n
