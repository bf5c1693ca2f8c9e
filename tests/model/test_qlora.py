"""QLoRA (ochat.model.qlora, --qlora) on the CPU, computing in float32 from NF4 weights quantised from bf16: the
forward is the bf16 base's within the stated bound and exactly transformers' on the dequantised weights (dense
models, and expert models whose stacked experts are NF4 too); only the adapters get gradients and a few optimizer
steps lower the loss, the NF4 base untouched; the adapter saves in PEFT's format and loads with peft on the
transformers model of the unquantised base; the refused combinations say why. The adapter gradients against
transformers + peft on the dequantised weights: tests/model/test_lora.py."""
import copy

import peft
import pytest
import torch
import torch.nn as nn

from ochat.config.errors import ConfigError
from ochat.config.train_config import parse_args
from ochat.model import hf_weights, lora, qlora
from ochat.model.config import ModelConfig
from ochat.model.transforms import ModelTransforms, apply_transforms, refusals
from tests.helpers.models import VARIANTS, as_in_transformers, assert_close, make_pack, make_pair
from tests.model.test_moe import MOE

# Measured on these tiny random models: relative RMS error of the logits 0.084-0.20 (Gemma 2's soft-capping the
# largest; the expert models 0.025-0.11), of each weight or expert stack 0.090-0.095. The bounds leave room; a
# different random model is ~1.4 away.
LOGITS_BOUND = 0.25
WEIGHT_BOUND = 0.12
NAMES = ["llama2", "qwen2_bias", "gemma2", "phi3_longrope", "qwen3_moe", "mixtral", "gpt_oss"]


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def qlora_pair(name, rank=4):
    """(config, the QLoRA model, its bf16 base unquantised), both computing in float32 (a dense model of VARIANTS or
    an expert one of MOE)."""
    cfg, ours, _ = make_pair(name, variants=MOE if name in MOE else VARIANTS)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(p.bfloat16().float())
    base = copy.deepcopy(ours)
    # device: the trainer's path, quantising layer by layer on the device (here the CPU, where it was loaded)
    apply_transforms(ours, ModelTransforms(lora_rank=rank, qlora=True), device="cpu")
    return cfg, ours, base


def nf4_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, qlora.NF4Linear)}


def nf4_weights(model) -> dict[str, torch.Tensor]:
    """Every NF4 weight of `model` by its buffer's name: the linear layers' and the expert stacks'."""
    return {n: t for n, t in model.named_buffers() if qlora.is_nf4(t)}


def dequantized(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (the plain model's: no peft names) with each weight that `model` holds in NF4 replaced by the float32
    values it stands for (an expert stack [E x out, in] back in its [E, out, in] shape)."""
    out = dict(state)
    for n, t in nf4_weights(model).items():
        plain = n.replace(".base_layer", "")
        out[plain] = qlora.dequantize(t).float().view(state[plain].shape)
    return out


def load_into_transformers(hf, state, cfg):
    """Load ochat's plain state dict into its transformers twin (gpt-oss's experts in transformers' layout)."""
    missing, unexpected = hf.load_state_dict(
        {k: v for n, t in state.items() for k, v in as_in_transformers(n, t, cfg).items()}, strict=False)
    assert not unexpected and all("inv_freq" in m for m in missing), (missing, unexpected)


@pytest.mark.parametrize("name", NAMES)
def test_logits_within_the_bound_of_the_bf16_base_and_exactly_the_dequantised_weights(name):
    """The reference: transformers' model of the bf16 base with each quantised weight (linear or expert stack)
    replaced by what NF4 holds, per conversation."""
    cfg, ours, base = qlora_pair(name)
    seqs, ids, pos, cu, mx = make_pack(cfg)
    with torch.no_grad():
        logits, ref = ours(ids, pos, cu, mx), base(ids, pos, cu, mx)
    assert rel_rms(logits, ref) < LOGITS_BOUND, f"{name}: {rel_rms(logits, ref):.3f}"

    state = base.state_dict()
    held = dequantized(ours, state)
    changed = [n for n in held if not torch.equal(held[n], state[n])]
    assert len(changed) == len(nf4_weights(ours))
    assert all(rel_rms(held[n], state[n]) < WEIGHT_BOUND for n in changed), changed
    _, _, hf = make_pair(name, variants=MOE if name in MOE else VARIANTS)
    load_into_transformers(hf, held, cfg)
    with torch.no_grad():
        for i, s in enumerate(seqs):
            assert_close(logits[cu[i]:cu[i + 1]], hf(input_ids=s[None]).logits[0], rtol=1e-5,
                         what=f"{name} conversation {i} vs transformers on the dequantised weights")


def test_every_decoder_linear_is_nf4_and_nothing_else():
    cfg, ours, _ = qlora_pair("qwen2_bias")
    layers = nf4_layers(ours)
    assert len(layers) == cfg.num_hidden_layers * 7  # q, k, v, o, gate, up, down
    assert all(n.startswith("model.layers.") and n.endswith(".base_layer") for n in layers)
    assert all(type(m.weight).__name__ == "NF4Tensor" and not m.weight.requires_grad for m in layers.values())
    assert not any(type(p).__name__ == "NF4Tensor" for p in ours.parameters())  # DeepSpeed sees no NF4 parameter
    assert not any(".base_layer.weight" in n for n in ours.state_dict())  # nor do state dicts (resume states)
    assert all(m.bias is not None and not m.bias.requires_grad for n, m in layers.items() if "self_attn.q" in n)
    assert isinstance(ours.lm_head.weight, nn.Parameter) and type(ours.lm_head.weight) is nn.Parameter
    w = next(iter(layers.values())).weight
    stored = sum(t.numel() * t.element_size() for t in (w.quantized_data, w.quantized_scalers, w.quantization_factor))
    assert stored < 0.52 * w.numel()  # vs 2 bytes per weight in bf16
    assert qlora.nf4_bytes_per_weight() == pytest.approx(0.516, abs=1e-3)


def test_expert_stacks_are_nf4_buffers_and_the_routers_stay():
    """qwen2_moe (a shared expert and its gate beside the routed ones): each stacked expert weight one NF4 buffer
    [E x out, in], not in state dicts; routers and the shared-expert gate full-precision parameters; the attention and
    shared-expert linears NF4 as in a dense model."""
    cfg, ours, _ = qlora_pair("qwen2_moe")
    weights = nf4_weights(ours)
    stacks = {n: t for n, t in weights.items() if ".mlp.experts." in n}
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
    assert len(stacks) == 2 * cfg.expert_layers and len(weights) == len(stacks) + 7 * cfg.num_hidden_layers
    assert all(t.shape == ((e * 2 * i, h) if n.endswith("gate_up_proj") else (e * h, i)) for n, t in stacks.items())
    assert not any(type(p).__name__ == "NF4Tensor" for p in ours.parameters())
    assert not any(".experts." in n and n.endswith("_proj") for n in ours.state_dict())
    for layer in ours.model.layers:
        assert type(layer.mlp.gate.weight) is nn.Parameter and layer.mlp.gate.weight.dtype == torch.float32
        assert type(layer.mlp.shared_expert_gate) is nn.Linear
    stack = next(iter(stacks.values()))
    stored = sum(t.numel() * t.element_size()
                 for t in (stack.quantized_data, stack.quantized_scalers, stack.quantization_factor))
    assert stored < 0.52 * stack.numel()


@pytest.mark.parametrize("chunk", [1, qlora.DEQUANTIZE_CHUNK])
def test_dequantize_stack_is_torchaos_dequantisation_bit_for_bit(chunk, monkeypatch):
    """In chunks of one scale factor's weights (64 x 32 here: an expert's 96 scales are not a multiple of 256, and a
    factor's never span two experts) or whole, in bf16 and cast to float32."""
    monkeypatch.setattr(qlora, "DEQUANTIZE_CHUNK", chunk)
    w = torch.randn(4, 96, 64) * 0.05
    nf4 = qlora.quantize_stack(w)
    assert nf4.scaler_block_size == 32 and nf4.shape == (4 * 96, 64)
    for dtype in (torch.bfloat16, torch.float32):
        want = qlora.dequantize(nf4).to(dtype).view(4, 96, 64)
        assert torch.equal(qlora.dequantize_stack(nf4, 4, dtype), want)


def test_a_stack_is_torchaos_nf4_of_it_with_the_mean_scale_summed_per_expert():
    """quantize_stack's own double quantisation is torchao's (`to_nf4` of the stack as [E x out, in]) wherever the
    scales' mean comes out the same (here: torchao's bf16 mean of the 4 x 96 scales equals the float64 sum per
    expert rounded to bf16); only that mean is computed differently, so that expert parallelism can gather it."""
    w = (torch.randn(4, 96, 64) * 0.05).bfloat16()
    ours, ref = qlora.quantize_stack(w), qlora._to_nf4()(w.view(-1, 64), qlora.BLOCK, 32)
    for part in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4"):
        assert torch.equal(getattr(ours, part), getattr(ref, part)), part
    with pytest.raises(ValueError, match="an expert of shape \\(3, 7\\) has 21 weights, not a multiple of the NF4 block"):
        qlora.quantize_stack(torch.randn(64, 3, 7))


def test_no_dequantised_expert_stack_is_kept_for_the_backward():
    """What autograd saves in an expert block of the NF4 model: the NF4 stacks, never a dequantised [E, out, in]
    one (it is made again in the backward)."""
    cfg, ours, _ = qlora_pair("mixtral")
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
    stack_shapes = {(e, 2 * i, h), (e, h, i), (e, h, 2 * i), (e, i, h)}
    saved = []
    seqs, ids, pos, cu, mx = make_pack(cfg)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours(ids, pos, cu, mx, labels=ids, label_weights=torch.ones(len(ids))).weighted_loss.backward()
    assert sum(qlora.is_nf4(t) for t in saved) == len(nf4_weights(ours))  # each NF4 weight once, stacks included
    assert not [t.shape for t in saved if tuple(t.shape) in stack_shapes and not qlora.is_nf4(t)]
    assert all(p.grad is not None for n, p in ours.named_parameters() if ".experts.lora_" in n)


@pytest.mark.parametrize("name", ["llama2", "qwen3_moe"])
def test_training_moves_only_the_adapters_and_lowers_the_loss(name):
    cfg, ours, _ = qlora_pair(name)
    frozen = {n: qlora.dequantize(t).clone() for n, t in nf4_weights(ours).items()}
    seqs, ids, pos, cu, mx = make_pack(cfg)
    labels = ids  # copy the input token: a task a rank-4 adapter learns within a few steps
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = ours(ids, pos, cu, mx, labels=labels, label_weights=torch.ones(len(ids))).weighted_loss
        loss.backward()
        assert all((p.grad is not None) == p.requires_grad for p in ours.parameters())
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.95 * losses[0], losses
    assert all(torch.equal(qlora.dequantize(t), frozen[n]) for n, t in nf4_weights(ours).items())


def test_saved_adapter_loads_in_peft_on_the_unquantised_transformers_model(tmp_path):
    cfg, ours, base = qlora_pair("llama2")
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.1)
    state = hf_weights.full_state_dict(ours, only=lora.is_adapter_weight)
    lora.save_adapter(str(tmp_path), state, lora.adapter_config(ours), cfg, "the/base")
    _, _, hf = make_pair("llama2")
    hf.load_state_dict(base.state_dict(), strict=False)  # the bf16 base the user gave, computing in float32
    model = peft.PeftModel.from_pretrained(hf, str(tmp_path))
    assert set(peft.get_peft_model_state_dict(model)) == set(lora.adapter_state_dict(state, cfg))
    # the same adapter on ochat's unquantised model: transformers + peft give its logits
    plain = copy.deepcopy(base)
    apply_transforms(plain, ModelTransforms(lora_rank=4))
    plain.load_state_dict(state, strict=False)
    seqs, ids, pos, cu, mx = make_pack(cfg)
    with torch.no_grad():
        logits = plain(ids, pos, cu, mx)
        for i, s in enumerate(seqs):
            assert_close(logits[cu[i]:cu[i + 1]], model(input_ids=s[None]).logits[0], what=f"conversation {i}")
        assert rel_rms(ours(ids, pos, cu, mx), logits) < LOGITS_BOUND


def test_refused_combinations():
    assert refusals(ModelTransforms(qlora=True)) == [
        "--qlora quantises the frozen base under LoRA adapters: add --lora-rank"]
    assert refusals(ModelTransforms(lora_rank=8, qlora=True), zero_stage=2) == []
    moe = ModelConfig.debug(**MOE["qwen3_moe"])  # an expert model: also with expert and sequence parallelism
    for parallel in ({}, dict(expert_parallel=2), dict(sequence_parallel=2)):
        assert refusals(ModelTransforms(lora_rank=8, qlora=True, **parallel), zero_stage=2, world_size=2,
                        model=moe) == []
    assert refusals(ModelTransforms(lora_rank=8, qlora=True), zero_stage=3)[0].startswith(
        "--qlora needs ZeRO stage 2 or lower")
    base = ["--model-path", "m", "--data-path", "d", "--save-path", "s", "--lora-rank", "8", "--qlora"]
    assert parse_args(base).transforms.qlora
    with pytest.raises(ConfigError, match="--merge-lora with --qlora is refused"):
        parse_args(base + ["--merge-lora"])
    with pytest.raises(ConfigError, match="--qlora needs ZeRO stage 2 or lower"):
        from ochat.config.deepspeed import load_deepspeed_config
        load_deepspeed_config("zero3", grad_accum=1, grad_clip=1.0, bf16=False,
                              transforms=parse_args(base).transforms)


def test_a_weight_not_in_blocks_of_64_is_a_clear_error():
    with pytest.raises(ValueError, match="not a multiple of the NF4 block of 64"):
        qlora.quantize(torch.randn(3, 7))
