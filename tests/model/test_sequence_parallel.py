"""Sequence parallelism: the slicing of a pack over the ranks of a group, and (on 2 gloo ranks) DeepSpeed Ulysses
attention and the whole model against the per-conversation SDPA reference and the unsharded model (also with LoRA
and with QLoRA's NF4 base, on a dense and an expert model)."""

import numpy as np
import pytest
import torch

from ochat.model.sequence_parallel import Layout, kv_repeats
from ochat.training.collate import collate_for_rank, collate_pack
from tests.helpers.ranks import run_ranks


def _items(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(3, 1000, n).astype(np.int32), (rng.random(n) * (rng.random(n) > 0.3)).astype(np.float32))
            for n in lengths]


@pytest.mark.parametrize("size", [2, 3, 4])
def test_slices_put_together_are_the_padded_pack(size):
    items = _items([5, 9, 1, 6])  # 21 tokens: padded to a multiple of size with weight-0 fillers
    shards = [collate_for_rank(items, 7, Layout(size, r, size)) for r in range(size)]
    pad = -21 % size
    whole = collate_pack(items + ([(np.full(pad, 7, np.int32), np.zeros(pad, np.float32))] if pad else []))
    for key in ("input_ids", "position_ids", "labels", "label_weights"):
        assert torch.equal(torch.cat([s[key] for s in shards]), whole[key]), key
    n = (21 + pad) // size
    for r, s in enumerate(shards):
        assert len(s["input_ids"]) == n and s["sequence_parallel"] == size
        assert torch.equal(s["cu_seqlens"], whole["cu_seqlens"]) and s["max_seqlen"] == whole["max_seqlen"]
        assert torch.equal(s["target_index"] + r * n, whole["target_index"][(whole["target_index"] >= r * n)
                                                                            & (whole["target_index"] < (r + 1) * n)])
    # each slice counts its tokens that are not filler; the fillers (fewer than a slice) come last
    assert [s["real_tokens"] for s in shards] == [n] * (size - 1) + [n - pad]
    # the filler is a sequence of its own: the real conversations' boundaries are unchanged
    assert whole["cu_seqlens"].tolist()[:5] == [0, 5, 14, 15, 21]
    assert sum(float(s["label_weights"].sum()) for s in shards) == pytest.approx(sum(float(w[1:].sum()) for _, w in items))


def test_labels_are_shifted_across_a_slice_boundary():
    tokens = np.arange(100, 110, dtype=np.int32)
    first, second = (collate_for_rank([(tokens, np.ones(10, np.float32))], 0, Layout(2, r, 2)) for r in range(2))
    assert first["labels"][-1].item() == 105 and first["label_weights"][-1].item() == 1.0  # token 4 predicts 5
    assert second["position_ids"].tolist() == [5, 6, 7, 8, 9]  # positions continue on the next rank
    assert second["label_weights"][-1].item() == 0.0


def test_an_empty_slot_gives_every_rank_a_filler_token():
    for size in (1, 2, 4):
        shards = [collate_for_rank([], 9, Layout(size, r, size)) for r in range(size)]
        assert all(s["input_ids"].tolist() == [9] and s["label_weights"].sum() == 0 for s in shards)
        assert shards[0]["cu_seqlens"].tolist() == [0, size]


def test_one_rank_is_the_plain_collate():
    items = _items([4, 7])
    got, want = collate_for_rank(items, 0), collate_pack(items)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want
                                           if k not in ("max_seqlen", "real_tokens"))


def test_layout_follows_deepspeeds_consecutive_groups():
    assert [(Layout(8, r, 2).data_parallel_rank, Layout(8, r, 2).sp_rank) for r in range(4)] == \
        [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert Layout(8, 5, 4).data_parallel_size == 2
    with pytest.raises(ValueError, match="--sequence-parallel 3 must divide the number of ranks \\(4\\)"):
        Layout(4, 0, 3)


@pytest.mark.parametrize("heads, kv, size, repeats", [(32, 8, 2, 1), (32, 4, 8, 2), (32, 1, 4, 4), (12, 6, 4, 2),
                                                      (6, 3, 2, 2)])
def test_kv_heads_are_repeated_to_a_multiple_of_the_ranks(heads, kv, size, repeats):
    assert kv_repeats(heads, kv, size) == repeats
    assert (kv * repeats) % size == 0 and heads % (kv * repeats) == 0


def test_query_heads_must_divide():
    with pytest.raises(ValueError, match="--sequence-parallel 4 must divide the model's 6 attention heads"):
        kv_repeats(6, 2, 4)


WORKER = r'''
import copy, sys
import numpy as np, torch
import torch.distributed as dist
from ochat.kernels.attention import varlen_attention_sdpa
from tests.helpers.models import leaky_attention, make_pair
from ochat.model import sequence_parallel
from ochat.training import preflight
from ochat.model.memory import tile_mlp
from ochat.model.decoder import PackedCausalLM
from ochat.model.lora import add_lora
from ochat.model.qlora import is_nf4, quantize_base
from ochat.model.config import ModelConfig
from ochat.training.runtime import TrainError, init_distributed
from ochat.model.sequence_parallel import Layout, UlyssesAttention
from ochat.training.collate import collate_for_rank
from ochat.training.step import forward_loss
from tests.model.test_moe import MOE

out = sys.argv[1]
init_distributed(cuda=False)
rank, size = dist.get_rank(), dist.get_world_size()
res = {}
torch.manual_seed(0)  # the same draws on every rank
group = dist.new_group(list(range(size)))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# attention alone: this rank's slice of q, k, v -> its slice of the output and of the gradients
lengths = [9, 3, 14, 5, 1]  # 32 tokens: conversation 3 (12-26) crosses the boundary at 16
cu = torch.tensor(np.cumsum([0] + lengths), dtype=torch.int32)
n = 32 // size
for heads, kv, window, variant in [(4, 4, None, {}), (4, 2, None, {}), (4, 1, None, {}), (6, 3, None, {}),
                                   (4, 2, 5, {}), (4, 2, None, dict(scale=0.3, softcap=5.0))]:
    q, k, v = torch.randn(32, heads, 8), torch.randn(32, kv, 8), torch.randn(32, kv, 8)
    grad_out = torch.randn(32, heads, 8)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = varlen_attention_sdpa(*full, cu, window=window, **variant)
    ref.backward(grad_out)
    mine = [t[rank * n:(rank + 1) * n].clone().requires_grad_() for t in (q, k, v)]
    o = UlyssesAttention(group, heads, kv)(*mine, cu, max(lengths), window=window, backend="sdpa", **variant)
    o.backward(grad_out[rank * n:(rank + 1) * n])
    res[f"attn {heads}/{kv} window {window} {variant}"] = [rel(o, ref[rank * n:(rank + 1) * n])] + [
        rel(m.grad, f.grad[rank * n:(rank + 1) * n]) for m, f in zip(mine, full)]

# the whole model: sliced over the ranks it gives the unsliced model's loss and gradients (tiled MLP on too)
ref_model = PackedCausalLM(ModelConfig.debug(), attn_impl="sdpa")
ref_model.reset_parameters(std=0.3)
model = copy.deepcopy(ref_model)
sequence_parallel.enable(model, size)
tile_mlp(model, 3)
g = np.random.default_rng(1)
items = [(g.integers(0, 128, m).astype(np.int32), g.random(m).astype(np.float32)) for m in (11, 20, 7)]  # 38 -> 38
whole, shard = collate_for_rank(items, 0), collate_for_rank(items, 0, Layout(size, rank, size))


def loss(m, b):
    return m(b["input_ids"], b["position_ids"], b["cu_seqlens"], b["max_seqlen"], labels=b["labels"],
             label_weights=b["label_weights"], target_index=b["target_index"]).weighted_loss


def sliced_and_whole_losses(sliced, reference):
    """Backward of the sliced model on this rank's shard and of the reference on the whole pack; -> [the group's
    summed loss, the reference's]."""
    want = loss(reference, whole)
    want.backward()
    got = loss(sliced, shard)
    got.backward()
    total = got.detach().clone()
    dist.all_reduce(total)
    return [total.item(), want.item()]


res["loss"] = sliced_and_whole_losses(model, ref_model)
for p in model.parameters():
    dist.all_reduce(p.grad)
res["grad"] = max(rel(p.grad, q.grad) for p, q in zip(model.parameters(), ref_model.parameters()))

def adapt(m, tokens=()):
    """LoRA adapters of rank 4 on `m` (replicated: the same seed on every rank), B random (peft starts it at zero:
    random here, so that every adapter gradient is non-trivial), and the embedding and lm_head rows of `tokens`."""
    add_lora(m, 4, 8.0, 0.0, "all", seed=5, trainable_tokens=tokens)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.3)


def adapt_both(m, quantized, tokens=()):
    """(`m` adapted, a copy of it): with `quantized`, both then given QLoRA's NF4 base (quantised alike: a copy of
    an NF4 model cannot be made)."""
    adapt(m, tokens)
    twin = copy.deepcopy(m)
    if quantized:
        quantize_base(m)
        quantize_base(twin)
    return m, twin


# LoRA adapters (on a bf16 base or QLoRA's NF4 one) and the embedding and lm_head rows of three tokens of the pack on
# the sliced model: the same loss and adapter (and row) gradients
for case, quantized in (("lora", False), ("qlora", True)):
    lora_ref = PackedCausalLM(ModelConfig.debug(), attn_impl="sdpa")
    lora_ref.reset_parameters(std=0.3)
    lora_ref, lora_model = adapt_both(lora_ref, quantized, list(dict.fromkeys(items[1][0].tolist()))[:3])
    sequence_parallel.enable(lora_model, size)
    tile_mlp(lora_model, 3)
    res[f"{case} loss"] = sliced_and_whole_losses(lora_model, lora_ref)
    adapters = [(p, q) for p, q in zip(lora_model.parameters(), lora_ref.parameters()) if p.requires_grad]
    for p, _ in adapters:
        dist.all_reduce(p.grad)  # what DeepSpeed's reduction sums within a sequence-parallel group (ochat.training.loss)
    res[f"{case} grad"] = max(rel(p.grad, q.grad) for p, q in adapters)
    res[f"{case} adapters"] = len(adapters)
    res[f"{case} frozen grads"] = sum(p.grad is not None for p in lora_model.parameters() if not p.requires_grad)
    res[f"{case} nf4"] = sum(map(is_nf4, lora_model.buffers()))

# expert models: each rank's share of the load-balancing loss (the pack's tokens per expert, its slice's router
# probabilities) adds up to the unsliced model's, and so do the gradients, over a pack with a filler (odd length);
# the group's tokens per expert are the pack's. qwen3_moe tiled (its dense layer too), with LoRA (on the stacked
# experts too) and with QLoRA (the stacked experts in NF4 too), gpt-oss with its sinks.
for case, (name, tiles, adapted, quantized) in {
        "qwen3_moe tiled": ("qwen3_moe", 3, False, False), "gpt_oss": ("gpt_oss", 1, False, False),
        "qwen3_moe lora": ("qwen3_moe", 1, True, False), "qwen3_moe qlora": ("qwen3_moe", 1, True, True)}.items():
    _, moe_ref, _ = make_pair(name, variants=MOE)
    moe_ref, moe = adapt_both(moe_ref, quantized) if adapted else (moe_ref, copy.deepcopy(moe_ref))
    sequence_parallel.enable(moe, size)
    tile_mlp(moe, tiles)
    items = [(g.integers(0, 128, m).astype(np.int32), g.random(m).astype(np.float32)) for m in (13, 30, 6)]
    want = forward_loss(moe_ref, collate_for_rank(items, 0, token_multiple=size), torch.device("cpu"))
    (want.weighted_loss + want.aux_loss).backward()
    got = forward_loss(moe, collate_for_rank(items, 0, Layout(size, rank, size)), torch.device("cpu"))
    (got.weighted_loss + got.aux_loss).backward()
    total = torch.cat([torch.stack([got.weighted_loss, got.aux_loss]).detach(), got.expert_tokens.flatten()])
    dist.all_reduce(total)
    trained = [(p, q) for p, q in zip(moe.parameters(), moe_ref.parameters()) if p.requires_grad]
    for p, _ in trained:
        dist.all_reduce(p.grad)
    res[f"moe {case}"] = dict(loss=[total[0].item(), want.weighted_loss.item()],
                              aux=[total[1].item(), want.aux_loss.item()],
                              expert_tokens=torch.equal(total[2:], want.expert_tokens.flatten()),
                              grad=max(rel(p.grad, q.grad) for p, q in trained), trained=len(trained),
                              nf4=sum(map(is_nf4, moe.buffers())))

# the self-check runs sliced, and refuses a leak across conversations
preflight.self_check(model, 128, torch.device("cpu"), bf16=False, sequence_parallel_size=size)
sequence_parallel.varlen_attention = leaky_attention
try:
    preflight.self_check(model, 128, torch.device("cpu"), bf16=False, sequence_parallel_size=size)
    res["leak refused"] = False
except TrainError as e:
    res["leak refused"] = "changed the logits of the others" in str(e)
'''


@pytest.mark.slow
def test_two_ranks_match_the_reference_and_the_unsliced_model(tmp_path):
    for rank, res in enumerate(run_ranks(tmp_path, WORKER, 2)):
        for name, errors in res.items():
            if name.startswith("attn"):
                assert max(errors) < 1e-5, (rank, name, errors)
        got, want = res["loss"]
        assert got == pytest.approx(want, rel=1e-5) and want > 1.0
        assert res["grad"] < 1e-5
        for case in ("lora", "qlora"):  # A and B of the 7 projections of both layers, and the token rows
            got, want = res[f"{case} loss"]
            assert got == pytest.approx(want, rel=1e-5) and want > 1.0, (case, got, want)
            assert res[f"{case} grad"] < 1e-5 and res[f"{case} adapters"] == 2 * 7 * 2 + 2, (case, res)
            assert res[f"{case} frozen grads"] == 0
        assert res["lora nf4"] == 0 and res["qlora nf4"] == 2 * 7
        for case in ("qwen3_moe tiled", "gpt_oss", "qwen3_moe lora", "qwen3_moe qlora"):
            moe = res[f"moe {case}"]
            for what in ("loss", "aux"):
                got, want = moe[what]
                assert got == pytest.approx(want, rel=1e-5) and want > 0.01, (case, what, got, want)
            assert moe["expert_tokens"] and moe["grad"] < 1e-5, (case, moe)
        # A and B of q/k/v/o in both layers and of the stacked experts' gate_up/down (the dense layer's MLP has none)
        assert res["moe qwen3_moe lora"]["trained"] == res["moe qwen3_moe qlora"]["trained"] == 2 * (4 * 2 + 2)
        # q/k/v/o in both layers, the dense layer's MLP (3) and the expert layer's 2 stacks
        assert res["moe qwen3_moe lora"]["nf4"] == 0 and res["moe qwen3_moe qlora"]["nf4"] == 2 * 4 + 3 + 2
        assert res["leak refused"]
