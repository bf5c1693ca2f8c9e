"""LoRA (ochat.model.lora) against transformers + peft, per conversation (CPU, float32): the weighted loss and every
adapter gradient (and trained token rows', against peft's trainable tokens); packed equals alone; only the adapters
(and the listed token rows) train; the saved adapter loads in peft and the merged weights in transformers, with
ochat's logits."""
import copy
import os

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers

from ochat.model import hf_weights, lora
from ochat.model.config import ModelConfig
from ochat.model.experts import Experts
from ochat.model.transforms import ModelTransforms, apply_transforms
from ochat.training.engine import weight_decay_groups
from tests.helpers.models import VARIANTS, assert_close, make_pack, make_pair
from tests.model.test_moe import MOE, padded


def lora_pair(name, targets="all", rank=4, tokens=(), qlora=False, dropout=0.0):
    """ochat's tiny model with LoRA adapters (B random, not peft's zeros, so every gradient is non-trivial) and its
    transformers twin wrapped by peft with the same adapter weights (a dense model of VARIANTS or an expert one of
    MOE); with `tokens`, their embedding and lm_head rows trained too (moved off the base rows, so that a base row
    read in their place would show); `qlora`: the decoder's frozen linears and expert stacks in NF4, the twin holding
    the weights they stand for; `dropout`: on the adapters' input (peft's forward)."""
    cfg, ours, hf = make_pair(name, variants=MOE if name in MOE else VARIANTS)
    plain = ours.state_dict()
    apply_transforms(ours, ModelTransforms(lora_rank=rank, lora_targets=targets, lora_trainable_tokens=tuple(tokens),
                                           qlora=qlora, lora_dropout=dropout))
    if qlora:
        from tests.model.test_qlora import dequantized, load_into_transformers

        load_into_transformers(hf, dequantized(ours, plain), cfg)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.1)
            elif lora.is_token_rows(n):
                p.add_(torch.randn_like(p), alpha=0.05)
    twin = peft.get_peft_model(hf, copy.deepcopy(lora.adapter_config(ours)))
    result = peft.set_peft_model_state_dict(twin, lora.adapter_state_dict(dict(ours.named_parameters()), cfg))
    assert not result.unexpected_keys
    return cfg, ours, twin


def pack_tokens(name, count=3) -> tuple[int, ...]:
    """The first `count` distinct tokens of the pack make_pack gives for VARIANTS[name]: trained rows that the
    embedding reads (every lm_head row gets a gradient through the softmax)."""
    _, ids, *_ = make_pack(ModelConfig.debug(**VARIANTS[name]))
    return tuple(dict.fromkeys(ids.tolist()))[:count]


def weighted_labels(cfg, n):
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, cfg.vocab_size, (n,), generator=g)
    return labels, (torch.rand(n, generator=g) < 0.6).float() * torch.where(torch.rand(n, generator=g) < 0.5, 1.0, 0.1)


ALL = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def backward_both_and_compare_losses(ours, twin, seqs, pack, labels, weights, name):
    """ochat's weighted loss on the pack and the transformers twin's per conversation: both backpropagated, equal."""
    loss = ours(*pack, labels=labels, label_weights=weights).weighted_loss
    loss.backward()
    ref_logits = torch.cat([twin(input_ids=s[None]).logits[0] for s in seqs])
    ref = (weights * F.cross_entropy(ref_logits, labels, reduction="none")).sum()
    ref.backward()
    assert_close(loss.detach(), ref.detach(), what=f"{name} weighted loss")


@pytest.mark.parametrize("name,targets,wrapped", [("llama2", "all", ALL), ("qwen3_qk_norm", "all", ALL),
                                                  ("gemma2", "attention", {"q_proj", "k_proj", "v_proj", "o_proj"}),
                                                  ("phi3_longrope", "mlp", {"gate_up_proj", "down_proj"}),
                                                  ("phi3_longrope", "attention", {"qkv_proj", "o_proj"}),
                                                  ("mistral_window", "all", ALL), ("qwen2_bias", "all", ALL),
                                                  ("gemma3", "all", ALL), ("olmo2", "all", ALL)])
def test_loss_and_adapter_grads_match_transformers_with_peft_per_conversation(name, targets, wrapped):
    cfg, ours, twin = lora_pair(name, targets)
    seqs, ids, pos, cu, mx = make_pack(cfg)
    labels, weights = weighted_labels(cfg, len(ids))
    backward_both_and_compare_losses(ours, twin, seqs, (ids, pos, cu, mx), labels, weights, name)

    trained = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    twin_params = dict(twin.named_parameters())
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trained} == wrapped
    assert len(trained) == 2 * cfg.num_hidden_layers * len(wrapped)
    for n, p in trained.items():
        assert_close(p.grad, twin_params[lora.PEFT_PREFIX + n].grad, what=f"{name} grad {n}")
    assert all(p.grad is None for p in ours.parameters() if not p.requires_grad)


@pytest.mark.parametrize("name", ["llama2", "tied", "gemma2"])
def test_trainable_tokens_loss_and_grads_match_transformers_with_peft_per_conversation(name):
    """--lora-trainable-tokens against peft's trainable tokens (LoraConfig(trainable_token_indices=...)): the loss
    and the gradients of the adapters and of the token rows. llama2: rows of the embedding and of lm_head; tied and
    gemma2 (scaled embeddings, soft-capped logits): one set of rows for both, as peft ties them. Fresh inputs whose
    labels include the trained tokens."""
    tokens = pack_tokens(name)
    cfg, ours, twin = lora_pair(name, tokens=tokens)
    seqs, ids, pos, cu, mx = make_pack(cfg)
    labels, weights = weighted_labels(cfg, len(ids))
    for k, token in enumerate(tokens):
        labels[k::8] = token
    backward_both_and_compare_losses(ours, twin, seqs, (ids, pos, cu, mx), labels, weights, name)

    trained = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    rows = [n for n in trained if lora.is_token_rows(n)]
    assert rows == ["model.embed_tokens" + lora.TOKEN_ROWS] + ([] if cfg.tie_word_embeddings else
                                                                ["lm_head" + lora.TOKEN_ROWS])
    twin_params = dict(twin.named_parameters())
    for n, p in trained.items():
        peft_name = lora.PEFT_PREFIX + n + (f".{lora.ADAPTER}" if n in rows else "")
        assert_close(p.grad, twin_params[peft_name].grad, what=f"{name} grad {n}")
    assert all(p.grad is None for p in ours.parameters() if not p.requires_grad)


def test_a_repeated_token_trains_one_row():
    cfg, ours, _ = lora_pair("llama2", tokens=(5, 9, 5))
    assert ours.lm_head.token_adapter.trainable_tokens_delta.shape == (2, cfg.hidden_size)
    assert lora.adapter_config(ours).trainable_token_indices == {"embed_tokens": [5, 9], "lm_head": [5, 9]}


@pytest.mark.parametrize("name,targets,impl,qlora", [
    ("qwen3_moe", "all", "auto", False), ("mixtral", "mlp", "auto", False), ("olmoe", "attention", "auto", False),
    ("qwen2_moe", "all", "auto", False), ("qwen2_moe", "all", "loop", False), ("gpt_oss", "all", "auto", False),
    ("gpt_oss", "mlp", "loop", False), ("qwen3_moe", "all", "auto", True), ("mixtral", "all", "loop", True),
    ("gpt_oss", "all", "auto", True)])
def test_expert_models_loss_and_adapter_grads_match_transformers_with_peft(name, targets, impl, qlora):
    """Attention, dense-MLP and shared-expert linears as peft's LoRA layers, the routed experts' stacked weights as
    peft's ParamWrapper (target_parameters); the router untouched. Weighted CE per conversation plus the
    load-balancing loss, against the conversations as one padded batch; the experts by grouped GEMMs (rank 4 in
    float32: aligned rows) or by the per-expert loop. gpt-oss: transformers' fused experts (x @ W, gate and up
    columns interleaved), whose gate_up_proj adapter is ochat's with B's rows interleaved (adapter_state_dict), for
    the weights copied into peft and the gradients compared. With `qlora` the base (expert stacks too) in NF4, the
    twin on the dequantised weights."""
    cfg, ours, twin = lora_pair(name, targets, qlora=qlora)
    for m in ours.modules():
        if isinstance(m, Experts):
            m.impl = impl
    seqs, ids, pos, cu, mx = make_pack(cfg)
    labels, weights = weighted_labels(cfg, len(ids))
    out = ours(ids, pos, cu, mx, labels=labels, label_weights=weights)
    (out.weighted_loss + out.aux_loss).backward()
    batch, mask = padded(seqs)
    ref = twin(input_ids=batch, attention_mask=mask, output_router_logits=True)
    ce = F.cross_entropy(ref.logits[mask.bool()], labels, reduction="none")
    ref_aux = cfg.router_aux_loss_coef * len(ids) * ref.aux_loss
    ((weights * ce).sum() + ref_aux).backward()
    assert_close(out.weighted_loss.detach(), (weights * ce).sum().detach(), what=f"{name} weighted loss")
    assert_close(out.aux_loss.detach(), ref_aux.detach(), what=f"{name} aux loss")

    trained = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    experts = [n for n in trained if ".experts." in n]
    assert len(experts) == (0 if targets == "attention" else 2 * 2 * cfg.expert_layers)  # A, B of gate_up, down
    assert not any(".gate." in n or "shared_expert_gate" in n for n in trained)  # routers and the shared gate frozen
    config = lora.adapter_config(ours)
    assert not config.rank_pattern and not config.alpha_pattern  # one rank: peft's v4-to-v5 remapping had nothing to do
    if name == "qwen3_moe":  # its dense layer's gate/up/down_proj: peft would read them as the experts' (lora.py)
        assert not any(n.startswith("model.layers.1.mlp.") for n in trained)
    if name == "qwen2_moe":
        assert {n.split(".mlp.")[1].split(".lora_")[0] for n in trained if ".mlp." in n} == {
            "experts", "experts.base_layer", "shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"}
    twin_grads = {n.replace(f".{lora.ADAPTER}.", "."): p.grad for n, p in twin.named_parameters()
                  if p.requires_grad}
    grads = lora.adapter_state_dict({n: p.grad for n, p in trained.items()}, cfg)
    assert grads.keys() == twin_grads.keys()
    for n, g in grads.items():
        assert_close(g, twin_grads[n], what=f"{name} grad {n}")
    assert all(p.grad is None for p in ours.parameters() if not p.requires_grad)


@pytest.mark.parametrize("name,qlora", [("llama2", False), ("gemma2", False), ("gpt_oss", False),
                                        ("qwen3_moe", True)])
def test_packed_equals_alone_and_recompute_gives_the_same_grads(name, qlora):
    """With `qlora` (an expert model's NF4 stacks too) the recompute dequantises again: the same gradients."""
    cfg, ours, _ = lora_pair(name, qlora=qlora)
    seqs, ids, pos, cu, mx = make_pack(cfg)
    labels, weights = weighted_labels(cfg, len(ids))
    with torch.no_grad():
        packed = ours(ids, pos, cu, mx)
        for i, s in enumerate(seqs):
            alone = ours(s, torch.arange(len(s)), torch.tensor([0, len(s)], dtype=torch.int32), len(s))
            assert_close(packed[cu[i]:cu[i + 1]], alone, rtol=1e-6, what=f"{name} conversation {i} packed vs alone")
    grads = []
    for fraction in (0.0, 1.0):
        ours.zero_grad()
        ours.gradient_checkpointing_enable(fraction)
        ours(ids, pos, cu, mx, labels=labels, label_weights=weights).weighted_loss.backward()
        grads.append([p.grad.clone() for p in ours.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        if name in MOE:  # the experts' row gather adds its gradient back in a thread-dependent order on the CPU
            assert_close(b, a, rtol=1e-6, what=f"{name} recomputed grad")
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("name,quantized", [("llama2", False), ("llama2", True), ("qwen3_moe", True)])
def test_tiled_mlp_gives_the_same_loss_and_adapter_grads(name, quantized):
    """Tiled MLP after LoRA (or QLoRA: the NF4 weights are buffers, the tiles' parameters the adapters alone; an
    expert block's NF4 stacks dequantised in each tile)."""
    cfg, ours, _ = lora_pair(name, qlora=quantized)
    seqs, ids, pos, cu, mx = make_pack(cfg)
    labels, weights = weighted_labels(cfg, len(ids))
    results = []
    for tiles in (1, 3):  # the same model untiled, then tiled (after LoRA: the tiles' backward reaches the adapters)
        apply_transforms(ours, ModelTransforms(tiled_mlp=tiles))
        ours.zero_grad()
        loss = ours(ids, pos, cu, mx, labels=labels, label_weights=weights).weighted_loss
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in ours.parameters() if p.requires_grad])
        assert all(p.grad is None for p in ours.parameters() if not p.requires_grad)
    assert len(results[0]) == 1 + sum(p.requires_grad for p in ours.parameters())
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(b, a, what=f"tiled vs untiled, {'loss' if i == 0 else f'adapter grad {i}'}")


def test_compiled_layers_give_the_same_loss_and_adapter_grads():
    """--compile after LoRA: each decoder layer compiled with its adapters (ochat.kernels.lora_linear's autograd
    node inside the graph), attention the only graph break; half the layers recomputed."""
    from torch._dynamo.utils import counters

    cfg, ours, _ = lora_pair("llama2")
    compiled = copy.deepcopy(ours)
    apply_transforms(compiled, ModelTransforms(compile=True, recompute=0.5))
    seqs, ids, pos, cu, mx = make_pack(cfg)
    labels, weights = weighted_labels(cfg, len(ids))
    counters.clear()
    losses = []
    for model in (ours, compiled):
        losses.append(model(ids, pos, cu, mx, labels=labels, label_weights=weights).weighted_loss)
        losses[-1].backward()
    assert_close(losses[1].detach(), losses[0].detach(), what="compiled loss")
    for (n, p), q in zip(compiled.named_parameters(), ours.parameters()):
        if p.requires_grad:
            assert_close(p.grad, q.grad, what=f"compiled grad {n}")
    assert all(p.grad is None for p in compiled.parameters() if not p.requires_grad)
    breaks = [reason for reason in counters["graph_break"] if "_attend" not in reason]
    assert not breaks and counters["stats"]["unique_graphs"] >= 2, breaks


@pytest.mark.parametrize("name,tokens,qlora", [("llama2", False, False), ("llama2", True, False),
                                               ("gemma2", True, False), ("llama2", True, True)])
def test_only_adapter_weights_change_after_optimizer_steps(name, tokens, qlora):
    """With trainable tokens (untied, tied, beside an NF4 base) also their rows, which take no weight decay: every
    other row of the embedding and lm_head, as merged, stays bit-identical."""
    trained_tokens = pack_tokens(name) if tokens else ()
    cfg, ours, _ = lora_pair(name, tokens=trained_tokens, qlora=qlora)
    base = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    groups = weight_decay_groups(ours, 0.1)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in ours.parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for g in groups for p in g["params"])
    assert {n for n, p in ours.named_parameters() if any(p is q for q in groups[1]["params"])} == {
        n for n in adapters if lora.is_token_rows(n)}  # the only trainable parameters without weight decay
    opt = torch.optim.AdamW(groups, lr=1e-2)
    seqs, ids, pos, cu, mx = make_pack(cfg)
    labels, weights = weighted_labels(cfg, len(ids))
    for _ in range(3):
        opt.zero_grad()
        ours(ids, pos, cu, mx, labels=labels, label_weights=weights).weighted_loss.backward()
        opt.step()
    after = dict(ours.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in base.items())
    assert all(not torch.equal(after[n], t) for n, t in adapters.items())
    merged = lora.merged_state_dict(hf_weights.full_state_dict(ours), lora.adapter_config(ours))
    others = [i for i in range(cfg.vocab_size) if i not in trained_tokens]
    for matrix in ("model.embed_tokens.weight", "lm_head.weight")[:1 if cfg.tie_word_embeddings else 2]:
        assert torch.equal(merged[matrix][others], base[matrix][others])
        assert all(not torch.equal(merged[matrix][i], base[matrix][i]) for i in trained_tokens)


@pytest.mark.parametrize("name,tokens", [("llama2", False), ("qwen2_bias", False), ("phi3_longrope", False),
                                         ("qwen3_moe", False), ("qwen2_moe", False), ("gpt_oss", False),
                                         ("llama2", True), ("gemma2", True)])
def test_saved_adapter_loads_in_peft_and_merged_weights_in_transformers(name, tokens, tmp_path):
    """qwen2: q/k/v biases kept in merging; the expert models: stacked experts' adapters saved and merged too
    (gpt-oss: into transformers' fused, interleaved tensors);
    trainable tokens (llama2: the embedding's and lm_head's rows; gemma2: tied, one set) saved under peft's names and
    merged as the matrices' rows."""
    trained_tokens = pack_tokens(name) if tokens else ()
    cfg, ours, _ = lora_pair(name, tokens=trained_tokens)
    seqs, ids, pos, cu, mx = make_pack(cfg)
    with torch.no_grad():
        logits = ours(ids, pos, cu, mx)
    state = hf_weights.full_state_dict(ours)
    adapter_dir = str(tmp_path / "adapter")
    lora.save_adapter(adapter_dir, {n: t for n, t in state.items() if lora.is_adapter_weight(n)},
                      lora.adapter_config(ours), cfg, "the/base")
    assert sorted(os.listdir(adapter_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert peft.PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path == "the/base"
    _, _, hf = make_pair(name, variants=MOE if name in MOE else VARIANTS)  # the base weights, without adapters
    merged_dir = str(tmp_path / "merged")
    merged = lora.merged_state_dict(state, lora.adapter_config(ours))
    for n, values in state.items():
        if lora.is_token_rows(n):  # the merged matrix's rows are the trained ones
            assert torch.equal(merged[n.removesuffix(lora.TOKEN_ROWS) + ".weight"][list(trained_tokens)], values)
    assert sum(lora.is_token_rows(n) for n in state) == (0 if not tokens else 1 if cfg.tie_word_embeddings else 2)
    hf_weights.save_weights(merged_dir, merged, cfg)
    with_adapter = peft.PeftModel.from_pretrained(hf, adapter_dir)
    assert set(peft.get_peft_model_state_dict(with_adapter)) == set(lora.adapter_state_dict(state, cfg))
    for model in (with_adapter,
                  transformers.AutoModelForCausalLM.from_pretrained(merged_dir, attn_implementation="eager")):
        with torch.no_grad():
            for i, s in enumerate(seqs):
                assert_close(logits[cu[i]:cu[i + 1]], model(input_ids=s[None]).logits[0],
                             what=f"{name} {type(model).__name__} conversation {i}")

