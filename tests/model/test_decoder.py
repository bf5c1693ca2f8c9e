"""PackedCausalLM against transformers, per conversation (CPU, float32): logits, every gradient, loss sums."""
import pytest
import torch
import torch.nn.functional as F

from ochat.model import decoder as model_mod
from ochat.model.config import ModelConfig
from ochat.model.decoder import PackedCausalLM
from tests.helpers.models import (VARIANTS, assert_close, leaky_attention, make_pack, make_pair,
                                  packed_equals_alone)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_and_grads_match_transformers_per_conversation(name):
    cfg, ours, hf = make_pair(name)
    seqs, ids, pos, cu, mx = make_pack(cfg)
    proj = torch.randn(len(ids), cfg.vocab_size, generator=torch.Generator().manual_seed(2))

    logits = ours(ids, pos, cu, mx)
    (logits * proj).sum().backward()

    offs = cu.tolist()
    for i, s in enumerate(seqs):
        ref = hf(input_ids=s[None]).logits[0]
        assert_close(logits[offs[i]:offs[i + 1]].detach(), ref.detach(), what=f"{name} logits of conversation {i}")
        (ref * proj[offs[i]:offs[i + 1]]).sum().backward()  # accumulates over conversations
    hf_params = dict(hf.named_parameters())
    for n, p in ours.named_parameters():
        assert_close(p.grad, hf_params[n].grad, what=f"{name} grad {n}")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_packed_equals_alone_and_perturbing_one_conversation_leaves_the_others_bit_identical(name):
    cfg, ours, _ = make_pair(name)
    (seqs, ids, pos, cu, mx), a = packed_equals_alone(ours, cfg, name)
    with torch.no_grad():
        ids2 = ids.clone()
        s, e = cu[1].item(), cu[2].item()  # conversation 1 ... and conversation 3
        ids2[s:e] = (ids2[s:e] + 1) % cfg.vocab_size
        ids2[cu[3]:cu[4]] = (ids2[cu[3]:cu[4]] + 5) % cfg.vocab_size
        b = ours(ids2, pos, cu, mx)
    for i in (0, 2, 4):
        assert torch.equal(a[cu[i]:cu[i + 1]], b[cu[i]:cu[i + 1]])
    assert not torch.equal(a[cu[3]:cu[4]], b[cu[3]:cu[4]])


def test_a_leaky_attention_fails_the_comparison(monkeypatch):
    """The equivalence test above would catch attention across boundaries."""
    cfg, ours, hf = make_pair("llama2")
    seqs, ids, pos, cu, mx = make_pack(cfg)
    monkeypatch.setattr(model_mod, "varlen_attention", leaky_attention)
    with torch.no_grad():
        logits = ours(ids, pos, cu, mx)
        ref = hf(input_ids=seqs[2][None]).logits[0]
    with pytest.raises(AssertionError):
        assert_close(logits[cu[2]:cu[3]], ref)


@pytest.mark.parametrize("name", ["llama2", "tied", "gemma2", "phi3_longrope"])
@pytest.mark.parametrize("use_target_index", [False, True])
def test_loss_sums_match_plain_cross_entropy_of_transformers_logits(name, use_target_index):
    cfg, ours, hf = make_pair(name)
    seqs, ids, pos, cu, mx = make_pack(cfg)
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, cfg.vocab_size, (len(ids),), generator=g)
    weights = (torch.rand(len(ids), generator=g) < 0.6).float() * torch.where(torch.rand(len(ids), generator=g) < 0.5, 1.0, 0.1)
    kw = {}
    if use_target_index:
        kw["target_index"] = (weights > 0).nonzero().squeeze(1)
    sums = ours(ids, pos, cu, mx, labels=labels, label_weights=weights, **kw)
    sums.weighted_loss.backward()

    ref_logits = torch.cat([hf(input_ids=s[None]).logits[0] for s in seqs])
    ce = F.cross_entropy(ref_logits, labels, reduction="none")
    ref_loss = (weights * ce).sum()
    ref_loss.backward()
    assert_close(sums.weighted_loss.detach(), ref_loss.detach(), what="weighted loss")
    assert sums.weight.item() == pytest.approx(weights.sum().item())
    assert sums.targets.item() == (weights > 0).sum().item()
    correct = ((ref_logits.argmax(-1) == labels) & (weights > 0)).sum().item()
    assert sums.correct.item() == correct
    hf_params = dict(hf.named_parameters())
    for n, p in ours.named_parameters():
        assert_close(p.grad, hf_params[n].grad, rtol=1e-4, what=f"grad {n}")


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg, ours, _ = make_pair("llama2")
    seqs, ids, pos, cu, mx = make_pack(cfg)
    labels = torch.roll(ids, -1)
    w = torch.ones(len(ids))
    ours.train()
    ours(ids, pos, cu, mx, labels=labels, label_weights=w).weighted_loss.backward()
    g1 = {n: p.grad.clone() for n, p in ours.named_parameters()}
    for fraction, layers in ((1.0, {0, 1}), (0.5, {0})):
        ours.zero_grad()
        ours.gradient_checkpointing_enable(fraction)
        assert ours.checkpointed_layers == layers
        ours(ids, pos, cu, mx, labels=labels, label_weights=w).weighted_loss.backward()
        for n, p in ours.named_parameters():
            torch.testing.assert_close(p.grad, g1[n], rtol=1e-6, atol=1e-7)


def test_gradient_checkpointing_fraction_spreads_layers():
    ours = PackedCausalLM(ModelConfig.debug(num_hidden_layers=8))
    for fraction, layers in ((0.0, set()), (0.25, {0, 4}), (0.5, {0, 2, 4, 6}), (1.0, set(range(8)))):
        ours.gradient_checkpointing_enable(fraction)
        assert ours.checkpointed_layers == layers
    ours.gradient_checkpointing_disable()
    assert not ours.checkpointed_layers
    with pytest.raises(ValueError):
        ours.gradient_checkpointing_enable(1.5)


def test_config_counts_parameters_and_flops():
    for name in VARIANTS:
        cfg, ours, _ = make_pair(name)
        n = sum(p.numel() for p in ours.parameters())  # shared tied parameter counted once
        assert cfg.num_params() == n
    big = ModelConfig(vocab_size=32002, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4)  # TinyLlama 1.1B
    assert abs(big.num_params() - 1.1e9) < 0.01e9
    f1, f2 = big.flops_per_token(1000), big.flops_per_token(2000)
    assert f2 - f1 == pytest.approx(6 * 22 * 2048 * 1000)
    # sliding-window layers (window 8) stop growing at sum(len^2) / tokens = 2 * 8
    per_layer = 6 * 4 * 32
    gemma = ModelConfig.debug(**VARIANTS["gemma2"])  # one sliding layer, one global
    assert gemma.flops_per_token(10) - gemma.flops_per_token(6) == pytest.approx(2 * per_layer * 4)
    assert gemma.flops_per_token(60) - gemma.flops_per_token(20) == pytest.approx(per_layer * 40)
    mistral = ModelConfig.debug(**VARIANTS["mistral_window"])  # every layer slides
    assert mistral.flops_per_token(60) == mistral.flops_per_token(16) > mistral.flops_per_token(15)


def test_llama3_scaling_and_window_reach_transformers():
    cfg, ours, hf = make_pair("llama3_rope_scaling")
    inv = model_mod.rope_inv_freq(cfg.layer_rotary(0))
    assert not torch.allclose(inv, model_mod.rope_inv_freq(ModelConfig.debug(rope_theta=500000.0).layer_rotary(0)))
    torch.testing.assert_close(hf.model.rotary_emb.inv_freq.float(), inv)
    cfg, ours, hf = make_pair("mistral_window")
    assert hf.config.sliding_window == 8
    seqs, ids, pos, cu, mx = make_pack(cfg)
    with torch.no_grad():
        a = ours(ids, pos, cu, mx)
        ours.model.layers[0].self_attn.window = None
        b = ours(ids, pos, cu, mx)
    assert not torch.allclose(a[cu[2]:cu[3]], b[cu[2]:cu[3]])  # the window changes the long conversation


@pytest.mark.parametrize("name", ["llama2", "gemma2"])
def test_compiled_layers_match_transformers_with_recompute_and_a_new_pack_size(name):
    """compile_layers (torch.compile of each decoder layer, the norms/RoPE/GLU as the compiler fuses them, attention
    between two compiled pieces): loss sums and every gradient equal transformers' per conversation, with half the
    layers recomputed, for two pack sizes (the token count is dynamic: the second size reuses the compiled graph)."""
    from torch._dynamo.utils import counters

    cfg, ours, hf = make_pair(name)
    ours.compile_layers()
    ours.gradient_checkpointing_enable(0.5)
    ours.train()
    hf_params = dict(hf.named_parameters())
    counters.clear()
    graphs = []
    for lengths in ([7, 1, 64, 23, 40], [30, 9, 50]):
        seqs, ids, pos, cu, mx = make_pack(cfg, lengths)
        g = torch.Generator().manual_seed(len(ids))
        labels = torch.randint(0, cfg.vocab_size, (len(ids),), generator=g)
        weights = torch.rand(len(ids), generator=g)
        ours.zero_grad()
        hf.zero_grad()
        sums = ours(ids, pos, cu, mx, labels=labels, label_weights=weights)
        sums.weighted_loss.backward()
        ref_logits = torch.cat([hf(input_ids=s[None]).logits[0] for s in seqs])
        ref_loss = (weights * F.cross_entropy(ref_logits, labels, reduction="none")).sum()
        ref_loss.backward()
        assert_close(sums.weighted_loss.detach(), ref_loss.detach(), what=f"{name} {lengths} weighted loss")
        for n, p in ours.named_parameters():
            assert_close(p.grad, hf_params[n].grad, rtol=1e-4, what=f"{name} {lengths} grad {n}")
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 2 and graphs[1] == graphs[0], graphs  # compiled (before and after attention), then reused
