"""Mixture-of-experts models against transformers (CPU, float32, tiny random configs): logits, the load-balancing
loss and every gradient per conversation, packed = alone, grouped GEMMs = the per-expert loop, tied routing,
checkpoints both ways, the aux-loss coefficient."""
import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F
import transformers

from ochat.config.train_config import parse_args
from ochat.model import experts as experts_mod
from ochat.model import hf_weights
from ochat.model.config import ModelConfig
from ochat.model.decoder import PackedCausalLM
from ochat.model.transforms import ModelTransforms, apply_transforms, refusals
from tests.helpers.models import (as_in_transformers, assert_close, make_pack, make_pair, packed_equals_alone,
                                  rope_pairs)

MOE = {
    # top-4 of 8, renormalised; q/k norms per head; layer 1 dense (mlp_only_layers)
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=4, moe_intermediate_size=32,
                      norm_topk_prob=True, mlp_only_layers=(1,), router_aux_loss_coef=0.1),
    # top-2 of 4, always renormalised; experts of intermediate_size; Hub names block_sparse_moe.experts.{e}.w1/w2/w3
    "mixtral": dict(model_type="mixtral", num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.1),
    # top-2 of 8, not renormalised; q/k norms over the projection
    "olmoe": dict(model_type="olmoe", num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.1),
    # a sigmoid-gated shared expert beside the routed ones; q/k/v biases
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, router_aux_loss_coef=0.1),
    # biased router and experts, the clamped SwiGLU (a limit the tiny model's activations cross), attention sinks and
    # q/k/v/o biases, a sliding then a full layer, YaRN (conversations beyond its original context of 16)
    "gpt_oss": dict(model_type="gpt_oss", num_experts=4, num_experts_per_tok=2, head_dim=16, attention_bias=True,
                    swiglu_limit=0.1, sliding_window=8, layer_types=("sliding_attention", "full_attention"),
                    rope_theta=150000.0, rope_scaling=rope_pairs(rope_type="yarn", factor=4.0, beta_fast=32.0,
                                                                 beta_slow=1.0, truncate=False,
                                                                 original_max_position_embeddings=16),
                    router_aux_loss_coef=0.1),
}


def pair(name):
    return make_pair(name, variants=MOE)


def padded(seqs):
    """The conversations as one right-padded batch and its attention mask."""
    n = max(map(len, seqs))
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return ids, mask


def targets(n, vocab, seed=3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (n,), generator=g)
    weights = (torch.rand(n, generator=g) < 0.6).float() * torch.where(torch.rand(n, generator=g) < 0.5, 1.0, 0.1)
    return labels, weights


@pytest.mark.parametrize("name, tiles", [(name, 1) for name in MOE] + [("qwen3_moe", 3), ("qwen2_moe", 3)])
def test_logits_aux_loss_and_grads_match_transformers(name, tiles):
    """Logits per conversation alone, the load-balancing loss of the conversations as one padded batch (its
    attention mask leaves the padding out), and every gradient of weighted CE + coef x aux; also with the MLPs and
    expert blocks tiled (--tiled-mlp)."""
    cfg, ours, hf = pair(name)
    apply_transforms(ours, ModelTransforms(tiled_mlp=tiles))
    seqs, ids, pos, cu, mx = make_pack(cfg)
    labels, weights = targets(len(ids), cfg.vocab_size)
    out = ours(ids, pos, cu, mx, labels=labels, label_weights=weights)
    (out.weighted_loss + out.aux_loss).backward()

    with torch.no_grad():
        logits = ours(ids, pos, cu, mx)
        for i, s in enumerate(seqs):
            assert_close(logits[cu[i]:cu[i + 1]], hf(input_ids=s[None]).logits[0], what=f"{name} logits {i}")
    batch, mask = padded(seqs)
    ref = hf(input_ids=batch, attention_mask=mask, output_router_logits=True)
    ref_logits = ref.logits[mask.bool()]  # the real tokens, in pack order
    ce = F.cross_entropy(ref_logits, labels, reduction="none")
    coef = cfg.router_aux_loss_coef
    ((weights * ce).sum() + coef * len(ids) * ref.aux_loss).backward()

    assert_close(out.aux_loss.detach() / (coef * len(ids)), ref.aux_loss.detach(), what=f"{name} aux loss")
    hf_params = dict(hf.named_parameters())
    for n, p in ours.named_parameters():
        for hf_name, grad in as_in_transformers(n, p.grad, cfg).items():
            assert_close(grad, hf_params[hf_name].grad, what=f"{name} grad {n}")
    assert out.expert_tokens.shape == (cfg.expert_layers, cfg.num_experts)
    assert out.expert_tokens.sum().item() == cfg.expert_layers * len(ids) * cfg.num_experts_per_tok


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe", "gpt_oss"])
def test_packed_equals_alone(name):
    cfg, ours, _ = pair(name)
    packed_equals_alone(ours, cfg, name)


def _loss_and_grads(model, pack, labels, weights) -> tuple:
    """(loss sums, {name: gradient} of the trained parameters) of weighted CE + the aux term on a pack (ids, pos, cu,
    max_seqlen)."""
    model.zero_grad()
    out = model(*pack, labels=labels, label_weights=weights)
    (out.weighted_loss + out.aux_loss).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_step(got, got_grads: dict, want, want_grads: dict) -> None:
    """The loss and the aux loss (rtol 1e-5), the tokens per expert (exactly) and every gradient (rtol 1e-5) agree."""
    assert_close(got.weighted_loss, want.weighted_loss, what="loss")
    assert_close(got.aux_loss, want.aux_loss, what="aux loss")
    assert torch.equal(got.expert_tokens, want.expert_tokens)
    for n, g in want_grads.items():
        assert_close(got_grads[n], g, what=f"grad {n}")


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_grouped_gemms_equal_the_per_expert_loop(name):
    """torch._grouped_mm runs on the CPU (torch >= 2.9): forward and every gradient equal the per-expert loop (gpt-oss:
    with each row's expert's biases); the sorted bookkeeping also holds with an expert that gets no token."""
    cfg, ours, _ = pair(name)
    seqs, ids, pos, cu, mx = make_pack(cfg)
    labels, weights = targets(len(ids), cfg.vocab_size)
    x = torch.randn(len(ids), cfg.hidden_size)
    assert experts_mod.grouped_mm_runs(x, ours.model.layers[0].mlp.experts.gate_up_proj)
    results = {}
    for impl in ("grouped", "loop"):
        for m in ours.modules():
            if isinstance(m, experts_mod.Experts):
                m.impl = impl
        out, grads = _loss_and_grads(ours, (ids, pos, cu, mx), labels, weights)
        results[impl] = out.weighted_loss.detach(), grads
    assert_close(results["grouped"][0], results["loop"][0], rtol=1e-6, what="loss")
    for n, g in results["loop"][1].items():
        assert_close(results["grouped"][1][n], g, rtol=1e-6, what=f"grad {n}")

    experts = ours.model.layers[0].mlp.experts
    idx = torch.tensor([[0, 2], [2, 3], [0, 3]])  # expert 1 idle
    w = torch.rand(3, 2)
    xs = torch.randn(3, cfg.hidden_size)
    experts.impl = "grouped"
    got = experts(xs, w, idx, experts_mod.assignments(idx, experts.num_experts))
    want = torch.zeros_like(xs)
    for t in range(3):
        for j in range(2):
            e = idx[t, j]
            b1, b2 = (getattr(experts, f"{p}_bias")[e] if name == "gpt_oss" else None for p in ("gate_up_proj", "down_proj"))
            gate, up = F.linear(xs[t], experts.gate_up_proj[e], b1).chunk(2)
            act = experts_mod.clamped_swiglu(gate, up, 1.702, 0.1) if name == "gpt_oss" else F.silu(gate) * up
            want[t] += w[t, j] * F.linear(act, experts.down_proj[e], b2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, lora_rank", [("qwen3_moe", 0), ("qwen2_moe", 0), ("qwen2_moe", 4)])
def test_tiled_mlp_keeps_routing_the_aux_loss_and_every_gradient(name, lora_rank):
    """--tiled-mlp on expert blocks (memory.TiledExperts), recomputed layers around them: each slice of the tokens
    routed on its own and the routing sums added, so the loss, the load-balancing loss, the tokens per expert and
    every gradient are the untiled model's; also with more slices than tokens (empty ones). qwen3_moe's dense layer 1
    goes through DeepSpeed's TiledMLP, qwen2_moe's shared expert through TiledExperts; with LoRA, the gradients of
    the adapters on attention, the shared expert and the stacked experts."""
    cfg, ours, _ = pair(name)
    if lora_rank:
        apply_transforms(ours, ModelTransforms(lora_rank=lora_rank))
        with torch.no_grad():
            for n, p in ours.named_parameters():
                if ".lora_B." in n:
                    p.normal_(std=0.3)  # peft starts B at zero: random here, so that every adapter gradient counts
    for tiles, lengths, seed in ((3, [19, 1, 40, 33], 11), (8, [2, 3], 12)):
        tiled = copy.deepcopy(ours)
        apply_transforms(tiled, ModelTransforms(tiled_mlp=tiles, recompute=1.0))
        assert all("forward" in vars(layer.mlp) for layer in tiled.model.layers)  # replaced by the tiled one
        *_, ids, pos, cu, mx = make_pack(cfg, lengths, seed)
        labels, weights = targets(len(ids), cfg.vocab_size, seed)
        (want, want_grads), (got, got_grads) = (_loss_and_grads(m, (ids, pos, cu, mx), labels, weights)
                                                for m in (ours, tiled))
        _assert_same_step(got, got_grads, want, want_grads)


def test_compiled_expert_layers_equal_eager_with_recompute_and_a_new_pack_size():
    """--compile on an expert model (mixtral): the layers compiled around attention and the expert blocks; loss, aux
    loss, tokens per expert and every gradient are the eager model's, half the layers recomputed, for two pack sizes
    (the second reuses the compiled graphs)."""
    from torch._dynamo.utils import counters

    cfg, ours, _ = pair("mixtral")
    compiled = copy.deepcopy(ours)
    apply_transforms(compiled, ModelTransforms(compile=True, recompute=0.5))
    counters.clear()
    graphs = []
    for lengths, seed in (([19, 1, 40, 33], 21), ([30, 9, 50], 22)):
        *_, ids, pos, cu, mx = make_pack(cfg, lengths, seed)
        labels, weights = targets(len(ids), cfg.vocab_size, seed)
        (want, want_grads), (got, got_grads) = (_loss_and_grads(m, (ids, pos, cu, mx), labels, weights)
                                                for m in (ours, compiled))
        _assert_same_step(got, got_grads, want, want_grads)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 2 and graphs[1] == graphs[0], graphs


def test_tied_router_scores_pick_transformers_experts():
    """All router logits equal (router weights zero): the same experts as transformers, so the same logits."""
    cfg, ours, hf = pair("qwen3_moe")
    with torch.no_grad():
        for model in (ours, hf):
            for n, p in model.named_parameters():
                if n.endswith("mlp.gate.weight"):
                    p.zero_()
        x = torch.randn(20, cfg.hidden_size)
        _, w, e = ours.model.layers[0].mlp.gate(x)
        _, hf_w, hf_e = hf.model.layers[0].mlp.gate(x)
        assert torch.equal(e, hf_e) and torch.equal(w, hf_w)
        seqs, ids, pos, cu, mx = make_pack(cfg)
        logits = ours(ids, pos, cu, mx)
        for i, s in enumerate(seqs):
            assert_close(logits[cu[i]:cu[i + 1]], hf(input_ids=s[None]).logits[0], what=f"conversation {i}")


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_checkpoints_round_trip_with_the_hubs_per_expert_names(tmp_path, name):
    """gpt-oss: transformers' fused tensors (gate and up columns interleaved) instead of per-expert ones."""
    cfg, ours, hf = pair(name)
    hf.save_pretrained(tmp_path / "hf")
    loaded = PackedCausalLM.from_pretrained(tmp_path / "hf", attn_impl="sdpa")
    assert loaded.config == cfg
    for (n, a), b in zip(loaded.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), n
    loaded.save_pretrained(tmp_path / "ours")
    from safetensors import safe_open
    with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as f, \
            safe_open(tmp_path / "hf" / "model.safetensors", "pt") as g:
        assert set(f.keys()) == set(g.keys())
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
    block = {"mixtral": "block_sparse_moe.experts.3.w3.weight", "qwen2_moe": "mlp.experts.7.up_proj.weight",
             "gpt_oss": "mlp.experts.gate_up_proj_bias"}[name]
    assert f"model.layers.1.{block}" in set(safe_open(tmp_path / "ours" / "model.safetensors", "pt").keys())
    if name == "gpt_oss":  # an expert-parallel rank reads its slice of the fused tensors
        reader = hf_weights.CheckpointReader(tmp_path / "hf")
        for n in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj_bias"):
            assert torch.equal(reader.parameter(n, cfg, range(1, 3)), ours.get_parameter(n)[1:3])
    theirs, from_ours = (transformers.AutoModelForCausalLM.from_pretrained(tmp_path / d).eval() for d in ("hf", "ours"))
    assert type(from_ours) is type(hf)
    ids = torch.randint(0, cfg.vocab_size, (1, 40))
    with torch.no_grad():
        assert torch.equal(from_ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_config_reads_transformers_defaults_and_counts_active_parameters(tmp_path):
    for mt, kw in (("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16)),
                   ("mixtral", dict(num_local_experts=4)), ("olmoe", dict(num_experts=4, num_experts_per_tok=2)),
                   ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16))):
        hf_cfg = transformers.AutoConfig.for_model(mt, vocab_size=64, hidden_size=32, intermediate_size=48,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                   **kw)
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
        cfg = ModelConfig.from_hf_config(hf_cfg.to_dict())
        assert cfg.router_aux_loss_coef == hf_cfg.router_aux_loss_coef > 0
        assert cfg.num_params() == sum(p.numel() for p in hf.parameters())
        i = cfg.expert_intermediate_size
        per_expert = 3 * 32 * i + (2 * i + 32 if mt == "gpt_oss" else 0)  # gpt-oss: + the biases
        routed = cfg.expert_layers * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
        assert cfg.num_params() - cfg.num_params(active=True) == routed
    mixtral = ModelConfig.from_hf_config(MOE["mixtral"] | {"model_type": "mixtral"})
    assert mixtral.to_hf_config()["num_local_experts"] == 4  # the Hub's spelling
    for mt, bad in (("mixtral", dict(router_jitter_noise=0.1)), ("olmoe", dict(clip_qkv=8.0)),
                    ("qwen3_moe", dict(use_sliding_window=True, sliding_window=16))):
        with pytest.raises(ValueError, match="not supported"):
            ModelConfig.from_hf_config(dict(model_type=mt, **bad))


def test_aux_loss_coefficient_zero_switches_it_off_and_the_flag_overrides_config_json(tmp_path):
    cfg, ours, _ = pair("olmoe")
    seqs, ids, pos, cu, mx = make_pack(cfg)
    labels, weights = targets(len(ids), cfg.vocab_size)
    on = ours(ids, pos, cu, mx, labels=labels, label_weights=weights, real_tokens=len(ids) - 7)
    apply_transforms(ours, ModelTransforms(router_aux_loss_coef=0.0))
    off = ours(ids, pos, cu, mx, labels=labels, label_weights=weights)
    assert on.aux_loss > 0 and off.aux_loss is None
    assert torch.equal(on.weighted_loss, off.weighted_loss) and torch.equal(on.expert_tokens, off.expert_tokens)
    apply_transforms(ours, ModelTransforms(router_aux_loss_coef=0.5))
    half = ours(ids, pos, cu, mx, labels=labels, label_weights=weights, real_tokens=len(ids) - 7)
    assert_close(half.aux_loss.detach(), on.aux_loss.detach() * 5, what="coefficient 0.5 vs config.json's 0.1")

    args = ["--model-path", str(tmp_path), "--data-path", str(tmp_path), "--save-path", str(tmp_path / "out")]
    assert parse_args(args).transforms.router_aux_loss_coef is None  # config.json's
    assert parse_args(args + ["--router-aux-loss-coef", "0"]).transforms.router_aux_loss_coef == 0.0
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    moe = ModelConfig.from_hf_config(tmp_path)
    assert moe.router_aux_loss_coef == 0.1
    for t in (ModelTransforms(fp8="tensorwise"), ModelTransforms(offload_activations=True, recompute=1.0)):
        assert any("mixture-of-experts" in p for p in refusals(t, model=moe)), t
    assert refusals(ModelTransforms(router_aux_loss_coef=0.1), model=ModelConfig.debug())
    assert not refusals(ModelTransforms(router_aux_loss_coef=0.1, recompute=1.0), model=moe)
    assert not refusals(ModelTransforms(lora_rank=4), model=moe)  # LoRA: tests/model/test_lora.py
    assert not refusals(ModelTransforms(lora_rank=4, qlora=True), model=moe)  # QLoRA: tests/model/test_qlora.py


@pytest.mark.gpu
def test_grouped_gemms_on_the_gpu_equal_the_per_expert_loop_in_bf16():
    """GPU (compute capability 9.0+, bf16): the grouped path runs and equals the loop within bf16 rounding, forward
    and every gradient (experts of a Qwen3-MoE-like width, a few thousand tokens)."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("grouped GEMMs need compute capability 9.0+")
    cfg = ModelConfig.debug(model_type="qwen3_moe", hidden_size=512, num_attention_heads=8, num_experts=32,
                            num_experts_per_tok=4, moe_intermediate_size=256, norm_topk_prob=True)
    torch.manual_seed(0)
    block = experts_mod.ExpertBlock(cfg).cuda()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.05)
    block = block.bfloat16()
    x = torch.randn(3000, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    proj = torch.randn_like(x)
    assert experts_mod.grouped_mm_runs(x, block.experts.gate_up_proj, block.experts.down_proj)
    results = {}
    for impl in ("grouped", "loop"):
        block.experts.impl = impl
        block.zero_grad()
        xi = x.clone().requires_grad_()
        out, _ = block(xi)
        (out.float() * proj).sum().backward()
        results[impl] = [out.float(), xi.grad.float()] + [p.grad.float() for p in block.parameters()]
    for a, b in zip(results["grouped"], results["loop"]):
        assert_close(a, b, rtol=2e-2, what="grouped vs loop (bf16)")


@pytest.mark.gpu
@pytest.mark.parametrize("with_biases", [False, True])
def test_grouped_gemms_with_lora_adapters_on_the_gpu_equal_the_loop_in_bf16(with_biases):
    """GPU (compute capability 9.0+, bf16): the experts with rank-16 LoRA adapters on both projections (and gpt-oss's
    biases and clamped SwiGLU) through the grouped GEMMs equal the per-expert loop, forward and every gradient."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("grouped GEMMs need CUDA with compute capability 9.0+")
    torch.manual_seed(0)
    e, h, i, r, rows = 16, 512, 256, 16, 3000

    def param(*shape, std=0.05):
        return (torch.randn(*shape, device="cuda") * std).bfloat16().requires_grad_()

    weights = [param(e, 2 * i, h), param(e, h, i)]
    biases = [param(e, 2 * i), param(e, h)] if with_biases else [None, None]
    factors = [param(e, r, h), param(e, 2 * i, r), param(e, r, i), param(e, h, r)]
    adapters = {"gate_up_proj": (factors[0], factors[1], 2.0), "down_proj": (factors[2], factors[3], 2.0)}
    act = functools.partial(experts_mod.clamped_swiglu, alpha=1.702, limit=7.0) if with_biases else "silu"
    counts = torch.bincount(torch.randint(0, e, (rows,), device="cuda"), minlength=e)
    x = torch.randn(rows, h, device="cuda").bfloat16()
    proj = torch.randn(rows, h, device="cuda")
    leaves = [t for t in weights + biases + factors if t is not None]
    results = {}
    for run in (experts_mod.expert_grouped, experts_mod.expert_loop):
        xi = x.clone().requires_grad_()
        out = run(xi, counts, *weights, act, *biases, adapters=adapters)
        grads = torch.autograd.grad((out.float() * proj).sum(), [xi] + leaves)
        results[run.__name__] = [out.float()] + [g.float() for g in grads]
    names = ["out", "x"] + [n for n, t in zip(("gate_up", "down", "gate_up_bias", "down_bias"), weights + biases)
                            if t is not None] + ["A gate_up", "B gate_up", "A down", "B down"]
    for name, a, b in zip(names, results["expert_grouped"], results["expert_loop"]):
        assert_close(a, b, rtol=2e-2, what=f"grouped vs loop with LoRA adapters (bf16): {name}")


def test_gpt_oss_config_defaults_yarn_and_quantization_configs(tmp_path):
    """transformers' GptOssConfig defaults read (YaRN with truncate false, alternating layers, clamped SwiGLU), YaRN's
    frequencies and attention factor as transformers computes them (truncated or not); the Hub's MXFP4
    quantization_config read (tests/model/test_mxfp4.py loads such weights) and not written back, any other
    quantisation refused in one line naming its config.json."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from ochat.model.decoder import rope_attention_factor, rope_inv_freq

    hf_cfg = transformers.GptOssConfig(num_hidden_layers=4, num_local_experts=4)
    cfg = ModelConfig.from_hf_config(hf_cfg.to_dict())
    assert (cfg.swiglu_alpha, cfg.swiglu_limit, cfg.sliding_window, cfg.num_experts) == (1.702, 7.0, 128, 4)
    assert [cfg.layer_window(i) for i in range(4)] == [128, None, 128, None]
    assert cfg.rope_scaling_dict["rope_type"] == "yarn" and cfg.rope_scaling_dict["truncate"] is False
    for truncate in (False, True):
        hf_cfg.rope_parameters["truncate"] = truncate
        want, factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
        rotary = ModelConfig.from_hf_config(hf_cfg.to_dict()).layer_rotary(0)
        assert torch.equal(rope_inv_freq(rotary), want) and rope_attention_factor(rotary) == factor

    mxfp4 = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    quantized = ModelConfig.from_hf_config(hf_cfg.to_dict() | {"quantization_config": mxfp4})
    assert quantized == ModelConfig.from_hf_config(hf_cfg.to_dict())
    assert "quantization_config" not in quantized.to_hf_config()
    for mt, quant in (("gpt_oss", {"quant_method": "fp8"}), ("qwen3_moe", mxfp4)):
        cfg = transformers.AutoConfig.for_model(mt).to_dict() | {"quantization_config": quant}
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=rf"config.json: {mt} weights quantised as '{quant['quant_method']}' "
                                             r"\(quantization_config\) not supported: ochat reads unquantised weights, "
                                             r"and mxfp4 for gpt_oss$"):
            PackedCausalLM.from_pretrained(tmp_path)


def test_gpt_oss_expert_biases_and_sinks_get_no_weight_decay():
    from ochat.training.engine import weight_decay_groups

    cfg = ModelConfig.debug(**MOE["gpt_oss"])
    model = PackedCausalLM(cfg, attn_impl="sdpa")
    decayed = {id(p) for p in weight_decay_groups(model, 0.1)[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and "model.layers.0.mlp.gate.weight" in names
    assert not any(n.endswith("bias") or n.endswith("sinks") for n in names)
    assert model.model.layers[0].mlp.experts.gate_up_proj_bias.abs().sum() == 0  # initialised to zero, as biases are
