"""Expert parallelism of 4 and 2 on 4 gloo CPU ranks against the unsharded model on the same packs: logits, loss and every
gradient after DeepSpeed's reduction (dense over all ranks, experts over the expert-data-parallel group, both divided
by the world size), with idle experts, with recompute, with tiled MLP (4 slices, ranks of fewer tokens, the same count
of all-to-alls on every rank), compiled (--compile, one expert layer recomputed: no collective in a graph, the same
count of all-to-alls on every rank); the all-to-all's backward; loading a rank's experts and gathering them back;
LoRA on every target (each rank's expert adapters as one rank starts them, the same loss and adapter gradients, the
gathered adapters and merged weights one rank's); QLoRA (each rank's NF4 experts exactly the one-rank model's, the
same loss, load-balancing loss and adapter gradients); with sequence parallelism of 2 (expert parallelism 2 and 4)
through ochat's engine and trainer step; the refusals; saving and restoring a rank's experts."""
import json

import pytest
import torch

from ochat.model import expert_parallel
from ochat.model.config import ModelConfig
from ochat.model.transforms import ModelTransforms, refusals
from tests.helpers.ranks import run_ranks

# 8 experts, top-4 renormalised; layers 0 and 2 with experts, layer 1 dense
QWEN3_MOE = dict(model_type="qwen3_moe", num_hidden_layers=3, num_experts=8, num_experts_per_tok=4,
                 moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=(1,), router_aux_loss_coef=0.1)

REFERENCE_MODEL = """cfg = ModelConfig.debug(**config)
torch.manual_seed(0)
ref = PackedCausalLM(cfg, attn_impl="sdpa")
with torch.no_grad():  # routers far from ties
    for n, p in ref.named_parameters():
        if n.endswith("mlp.gate.weight"):
            p.mul_(50.0)
plain = copy.deepcopy(ref)
"""  # the one-rank model both workers build (the same weights on every rank)

WORKER = r'''
import copy, functools, json, os, sys
from unittest import mock
import numpy as np, torch
import torch.distributed as dist
from deepspeed.utils import groups
from deepspeed.moe.utils import is_moe_param
from ochat.model import expert_parallel, hf_weights, lora, memory, qlora
from ochat.model.config import ModelConfig
from ochat.model.decoder import PackedCausalLM
from ochat.model.transforms import ModelTransforms, apply_transforms
from ochat.training.collate import collate_for_rank
from ochat.training.runtime import init_distributed

out, config = sys.argv[1], json.loads(sys.argv[2])
torch.set_num_threads(1)
init_distributed(cuda=False)
rank, world = dist.get_rank(), dist.get_world_size()
size = int(os.environ["EP"])  # one expert-parallel group of every rank, or (2 on 4 ranks) two of them
res = {}


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()


# the all-to-all alone: uneven splits (some 0); the backward is the reverse exchange
group = dist.new_group(list(range(world)))
send = [(rank + j) % 3 for j in range(world)]
recv = [(j + rank) % 3 for j in range(world)]
x = (rank * 100 + torch.arange(sum(send) * 2, dtype=torch.float32)).view(-1, 2).requires_grad_()
y = expert_parallel.all_to_all(x, send, recv, group)
g = torch.randn(y.shape, generator=torch.Generator().manual_seed(rank))
y.backward(g)
want = expert_parallel._exchange(g, recv, send, group)
came = [int(v) // 100 for v in y[:, 0].tolist()]
adjoint = torch.stack([(y * g).sum(), (x * x.grad).sum()]).detach()
dist.all_reduce(adjoint)
res["all_to_all"] = dict(grad=torch.equal(x.grad, want), sources=came == [j for j in range(world) for _ in range(recv[j])],
                         adjoint=adjoint.tolist())

# the model: the same weights on every rank; rank r trains pack r
{REFERENCE_MODEL}model = copy.deepcopy(ref)
expert_parallel.enable(model, size)
name = expert_parallel.group_name(size)
edp = groups._get_expert_data_parallel_group(name)
ref_params = dict(ref.named_parameters())


def local(n, p, whole):
    """What parameter `n` (`p` on this rank) holds of the one-rank model's tensor `whole`: its experts' rows, and of
    a LoRA adapter of stacked experts its experts' rows of A [E r, in] or columns of B [out, r E] (peft's layout,
    the expert B's fastest index)."""
    held = expert_parallel.held_experts(p)
    if held is None:
        return whole
    if ".lora_B." in n:
        return whole.unflatten(1, (-1, cfg.num_experts))[..., held.start:held.stop].flatten(1)
    if ".lora_A." in n:
        return whole.unflatten(0, (cfg.num_experts, -1))[held.start:held.stop].flatten(0, 1)
    return whole[held.start:held.stop]


def forward(m, b, logits=False):
    """The logits, or the output with the weighted loss, the load-balancing loss and the tokens per expert."""
    if logits:
        return m(b["input_ids"], b["position_ids"], b["cu_seqlens"], b["max_seqlen"])
    return m(b["input_ids"], b["position_ids"], b["cu_seqlens"], b["max_seqlen"], labels=b["labels"],
             label_weights=b["label_weights"], target_index=b["target_index"], real_tokens=b["real_tokens"])


def compare(tag, ref, model, lengths, same=False, logits_grad=False):
    """res[tag]: `model` on this rank's pack against `ref` on every rank's; `logits_grad`: the logits with gradients
    enabled (a compiled model: the loss's graphs, not a second compile for no-grad mode)."""
    g = np.random.default_rng(len(tag))
    packs = [collate_for_rank([(g.integers(0, cfg.vocab_size, n).astype(np.int32), g.random(n).astype(np.float32))
                               for n in pack], 0) for pack in lengths]
    packs = [packs[0]] * world if same else packs
    ref.zero_grad()
    model.zero_grad()
    outs = [forward(ref, b) for b in packs]
    want = torch.stack([sum(o.weighted_loss for o in outs), sum(o.aux_loss for o in outs)])
    want.sum().backward()
    idle = sum(o.expert_tokens for o in outs).eq(0).sum().item()
    with torch.set_grad_enabled(logits_grad):
        res[tag + " logits"] = rel(forward(model, packs[rank], True).detach(), forward(ref, packs[rank], True).detach())
    got = forward(model, packs[rank])
    (got.weighted_loss + got.aux_loss).backward()
    total = torch.stack([got.weighted_loss, got.aux_loss]).detach()
    dist.all_reduce(total)
    errors, wants = {}, dict(ref.named_parameters())
    for n, p in model.named_parameters():  # DeepSpeed's reduction of MoE and other parameters
        if p.grad is None:  # frozen (LoRA)
            assert wants[n].grad is None, n
            continue
        held = expert_parallel.held_experts(p)
        assert is_moe_param(p) == (held is not None) and getattr(p, "group_name", name) == name, n
        dist.all_reduce(p.grad, group=edp if held is not None else None)
        errors[n] = rel(p.grad / world, local(n, p, wants[n].grad) / world)
    res[tag] = dict(loss=[total[0].item(), want[0].item()], aux=[total[1].item(), want[1].item()],
                    grad=max(errors.values()), worst=max(errors, key=errors.get), idle=idle, trained=len(errors))


compare("packs", ref, model, [[7, 20, 1], [1], [30, 5, 9], [13, 2]][:world])
# the same 2 tokens on every rank: at most 8 of 16 experts busy
compare("one token each", ref, model, [[2]] * world, same=True)
model.gradient_checkpointing_enable(1.0)  # the all-to-alls rerun in the backward
compare("recompute", ref, model, [[3, 11], [6], [9, 1], [4]][:world])
# every expert block over 4 slices on every rank, some empty (a rank of 1 or 2 tokens): each slice's all-to-alls, in
# the forward, in the checkpointed layer's rerun and again in the tiled backward's recompute of each slice
exchanges, exchange = [], dist.all_to_all_single


def counted(*args, **kwargs):
    exchanges.append(1)
    return exchange(*args, **kwargs)


dist.all_to_all_single = counted  # the all-to-alls on this rank: the same number on every rank
memory.tile_mlp(model, 4)
compare("tiled recompute", ref, model, [[3, 11], [2], [9, 1], [1]][:world])
res["tiled recompute all-to-alls"] = len(exchanges)
model.gradient_checkpointing_disable()
compare("tiled", ref, model, [[1], [5, 8], [17], [2, 1]][:world])
res["tiled all-to-alls"] = len(exchanges) - res["tiled recompute all-to-alls"]
# --compile as the trainer does it (each decoder layer compiled, dynamic shapes), layer 0 recomputed: the expert
# blocks and their all-to-alls run eagerly between the compiled pieces, in the checkpointed layer's rerun too
if size == world:  # compiling costs each rank seconds: one of the two layouts
    from torch._dynamo.backends.registry import lookup_backend

    graphs = []

    def backend(gm, inputs):
        """The trainer's graphs (dynamo's capture and breaks) through AOT autograd, without inductor's code
        generation (a minute of 4 ranks' compiling on 2 cores; its numerics: tests/model/test_moe.py)."""
        graphs.append(gm.code)
        return lookup_backend("aot_eager")(gm, inputs)

    compiled = copy.deepcopy(plain)
    with mock.patch.object(torch, "compile", functools.partial(torch.compile, backend=backend)):
        apply_transforms(compiled, ModelTransforms(compile=True, recompute=0.5, expert_parallel=size))
    before = len(exchanges)
    compare("compile", ref, compiled, [[3, 11], [6], [9, 1], [4]][:world], logits_grad=True)
    res["compile all-to-alls"] = len(exchanges) - before
    res["compile graphs"] = len(graphs)
    res["compile collectives"] = sum("all_to_all" in code or "c10d" in code for code in graphs)
dist.all_to_all_single = exchange


def adapted(tag, **flags):
    """LoRA on every target (with `flags`) by apply_transforms on the one-rank model and on this rank's (sharded
    first: apply_transforms' order), its expert adapters cut to this rank's experts as one rank starts them (A drawn
    for the whole layer: res[tag + " init"]), then set to random values (B = 0 would leave A without a gradient);
    -> (the one-rank model, this rank's, the adapters' names)."""
    lref, lmodel = copy.deepcopy(plain), copy.deepcopy(plain)
    apply_transforms(lref, ModelTransforms(lora_rank=4, seed=3, **flags))
    apply_transforms(lmodel, ModelTransforms(lora_rank=4, seed=3, expert_parallel=size, **flags))
    lref_params, lparams = dict(lref.named_parameters()), dict(lmodel.named_parameters())
    adapters = [n for n in lparams if lora.is_adapter_weight(n)]
    res[tag + " init"] = all(torch.equal(lparams[n], local(n, lparams[n], lref_params[n])) for n in adapters)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n in adapters:
            lref_params[n].copy_(torch.randn(lref_params[n].shape, generator=g) * 0.2)
            lparams[n].copy_(local(n, lparams[n], lref_params[n]))
    return lref, lmodel, adapters


def qlora_checks():
    """QLoRA: each rank quantises only its experts, and its NF4 stacks hold exactly what the one-rank model's hold of
    them (the whole layer's mean scale, gathered); the same loss, load-balancing loss and adapter gradients."""
    qref, qmodel, _ = adapted("qlora", qlora=True)
    whole, stacks = dict(qref.named_buffers()), {}
    for n, t in qmodel.named_buffers():
        if qlora.is_nf4(t) and ".experts." in n:
            held = qmodel.get_submodule(n.rsplit(".", 1)[0]).held
            mine = qlora.dequantize_stack(t, len(held), torch.float32)
            stacks[n] = torch.equal(mine, qlora.dequantize_stack(whole[n], cfg.num_experts, torch.float32)[
                held.start:held.stop])
    res["qlora stacks"] = stacks
    res["qlora nf4"] = sum(map(qlora.is_nf4, qmodel.buffers()))
    compare("qlora packs", qref, qmodel, [[9, 17], [3, 1, 12], [25], [6, 6]][:world])


def lora_checks():
    lref, lmodel, adapters = adapted("lora")
    lparams = dict(lmodel.named_parameters())
    compare("lora packs", lref, lmodel, [[9, 17], [3, 1, 12], [25], [6, 6]][:world])
    # 3 tokens (2 make attention's float32 gradients ill-conditioned: v_proj's A 1e-4 off float64 on one rank alone)
    compare("lora idle experts", lref, lmodel, [[3]] * world, same=True)
    res["lora expert adapters"] = sorted(n for n in adapters if expert_parallel.held_experts(lparams[n]) is not None)
    res["lora shards"] = sorted(expert_parallel.shards(lmodel))  # a resume state's: the adapters, not the experts
    state = hf_weights.full_state_dict(lmodel)  # every expert and adapter, gathered
    if rank == 0:
        want = hf_weights.full_state_dict(lref)
        config = lora.adapter_config(lref)
        res["lora gathered"] = state.keys() == want.keys() and all(torch.equal(state[n], want[n]) for n in want)
        got_peft, want_peft = lora.adapter_state_dict(state, lref.config), lora.adapter_state_dict(want, lref.config)
        res["lora peft file"] = got_peft.keys() == want_peft.keys() and all(
            torch.equal(got_peft[n], want_peft[n]) for n in want_peft)
        merged, want_merged = lora.merged_state_dict(state, config), lora.merged_state_dict(want, config)
        res["lora merged"] = merged.keys() == want_merged.keys() and all(
            torch.equal(merged[n], want_merged[n]) for n in want_merged)


if os.environ["LORA"] == "1":  # importing peft costs each rank seconds: one of the two layouts
    lora_checks()
    qlora_checks()

# checkpoints: each rank reads only its experts; gathering them gives the whole layer again
for n, p in model.named_parameters():
    if expert_parallel.held_experts(p) is not None:
        assert torch.equal(expert_parallel.gather(p), ref_params[n].data), n
path = os.path.join(os.path.dirname(out), "ckpt")
if rank == 0:
    ref.save_pretrained(path)
dist.barrier()
with torch.device("meta"):
    meta = PackedCausalLM(cfg, attn_impl="sdpa")
expert_parallel.enable(meta, size)
loaded = hf_weights.load_weights(meta, path, torch.float32, "cpu")
res["loaded"] = all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
res["marks kept"] = all(getattr(p, "group_name", None) == name for n, p in loaded.named_parameters() if "experts." in n)
full = hf_weights.full_state_dict(loaded)
if rank == 0:
    res["gathered"] = all(torch.equal(full[n], p.data) for n, p in ref.named_parameters())
'''.replace("{REFERENCE_MODEL}", REFERENCE_MODEL)


# 4 on 2: two groups, expert data parallel over 2; LoRA there
@pytest.mark.parametrize("ranks, size, lora", [(4, 4, False), (4, 2, True)])
def test_expert_parallel_ranks_equal_one_rank(tmp_path, ranks, size, lora):
    results = run_ranks(tmp_path, WORKER, ranks, json.dumps(QWEN3_MOE), EP=str(size), LORA=str(int(lora)),
                        OMP_NUM_THREADS="1")
    for rank, res in enumerate(results):
        a2a = res["all_to_all"]
        assert a2a["grad"] and a2a["sources"], (rank, a2a)
        assert a2a["adjoint"][0] == pytest.approx(a2a["adjoint"][1], rel=1e-6)
        tags = ["packs", "one token each", "recompute", "tiled recompute", "tiled"] + (
            ["lora packs", "lora idle experts", "qlora packs"] if lora else ["compile"])
        for tag in tags:
            assert res[tag + " logits"] < 1e-5, (rank, tag)
            for what, least in (("loss", 1.0), ("aux", 0.1)):
                got, want = res[tag][what]
                assert got == pytest.approx(want, rel=1e-5) and want > least, (rank, tag, what)
            assert res[tag]["grad"] < 1e-5, (rank, tag, res[tag])
        assert res["one token each"]["idle"] > 0  # some experts got no token at all
        # 2 expert layers x 4 slices x 3 exchanges (counts, dispatch, combine) in each forward (the logits', the
        # loss's, a checkpointed layer's rerun, the tiled backward's recompute), x 2 in the backward (the reverse)
        assert res["tiled recompute all-to-alls"] == 24 * 4 + 16 and res["tiled all-to-alls"] == 24 * 3 + 16, rank
        if not lora:  # compiled: 2 expert layers x 3 exchanges in each forward (the logits', the loss's), layer 0's 3
            # again in its rerun, 2 x 2 reverse ones in the backward; graphs compiled (the layers broken at attention
            # and at the expert block), none holding a collective
            assert res["compile all-to-alls"] == 6 * 2 + 3 + 4 and res["compile graphs"] >= 2, (
                rank, res["compile all-to-alls"], res["compile graphs"])
            assert res["compile collectives"] == 0, rank
        assert res["loaded"] and res["marks kept"], rank
        if lora:
            assert res["lora init"] and res["lora idle experts"]["idle"] > 0, rank
            # A, B of q, k, v, o in 3 layers and of the 2 stacked projections in 2 expert layers (the dense layer's
            # MLP is left without adapters: lora.peft_remapped_names)
            assert res["lora packs"]["trained"] == 2 * 12 + 8 and len(res["lora expert adapters"]) == 8, rank
            assert res["lora shards"] == res["lora expert adapters"], rank
            # QLoRA: the same adapters; 4 attention projections in 3 layers, the dense layer's MLP (3), 2 expert stacks
            # in 2 layers in NF4, each of the 4 stacks this rank's experts of the one-rank model's, bit for bit
            assert res["qlora init"] and res["qlora packs"]["trained"] == res["lora packs"]["trained"], rank
            assert res["qlora nf4"] == 4 * 3 + 3 + 2 * 2 and len(res["qlora stacks"]) == 4, rank
            assert all(res["qlora stacks"].values()), (rank, res["qlora stacks"])
    res = json.loads((tmp_path / "res.0").read_text())
    assert res["gathered"]
    if lora:
        assert res["lora gathered"] and res["lora peft file"] and res["lora merged"]


SP_WORKER = r"""
import copy, json, sys
import numpy as np, torch
import torch.distributed as dist
import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu
from deepspeed.utils import groups, safe_get_full_grad
from ochat.config.deepspeed import load_deepspeed_config
from ochat.config.train_config import TrainConfig
from ochat.model import expert_parallel
from ochat.model.config import ModelConfig
from ochat.model.decoder import PackedCausalLM
from ochat.model.sequence_parallel import Layout
from ochat.model.transforms import apply_transforms
from ochat.training.collate import collate_for_rank
from ochat.training.engine import build_engine
from ochat.training.loss import grad_average_ranks
from ochat.training.runtime import Runtime, init_distributed
from ochat.training.step import forward_loss, train_step

out, config = sys.argv[1], json.loads(sys.argv[2])
torch.set_num_threads(1)
init_distributed(cuda=False)
rank, world = dist.get_rank(), dist.get_world_size()
SP = 2
{REFERENCE_MODEL}
# two packs, one per data-parallel group (each shared by its 2 sequence-parallel ranks); 29 tokens: one filler
g = np.random.default_rng(7)
packs = [[(g.integers(0, cfg.vocab_size, n).astype(np.int32), g.random(n).astype(np.float32)) for n in lengths]
         for lengths in ([7, 20, 2], [30, 5, 9])]
layout = Layout(world, rank, SP)
mine = collate_for_rank(packs[layout.data_parallel_rank], 0, layout)
wholes = [collate_for_rank(p, 0, token_multiple=SP) for p in packs]

# the exact step loss on one rank: sum(w CE) / sum(w) + coef x the token-weighted mean load-balancing loss
outs = [forward_loss(ref, b, torch.device("cpu")) for b in wholes]
weights, tokens = sum(float(b["label_weights"].sum()) for b in wholes), sum(b["real_tokens"] for b in wholes)
loss, aux = sum(o.weighted_loss for o in outs) / weights, sum(o.aux_loss for o in outs) / tokens
(loss + aux).backward()
want = {n: p.grad for n, p in ref.named_parameters()}
norm = torch.stack([t.norm() for t in want.values()]).norm().item()
res = {}


def ranks(group):
    return sorted(dist.get_global_rank(group, r) for r in range(dist.get_world_size(group)))


for size in (2, 4):
    model = copy.deepcopy(plain)
    tc = TrainConfig(model_path="-", data_path="-", save_path="-", sequence_parallel=SP, expert_parallel=size)
    apply_transforms(model, tc.transforms)
    ds = load_deepspeed_config("zero2", grad_accum=1, grad_clip=1.0, bf16=False, transforms=tc.transforms)
    engine = build_engine(tc, Runtime(rank, world, torch.device("cpu"), False, True), model, ds, total_steps=1,
                          warmup_steps=0)
    name = expert_parallel.group_name(size)
    ep_group = groups._get_expert_parallel_group(name)
    got = {}

    def reduced_gradients(step=engine.step):
        # what ZeRO-2 reduced (each expert shard over its expert-data-parallel group), the experts joined back
        for n, p in engine.module.named_parameters():
            if p.requires_grad:
                grad = safe_get_full_grad(p)
                if expert_parallel.held_experts(p) is not None:
                    parts = [torch.empty_like(grad) for _ in range(size)]
                    dist.all_gather(parts, grad.contiguous(), group=ep_group)
                    grad = torch.cat(parts)
                got[n] = grad
        step()

    engine.step = reduced_gradients
    stats = train_step(engine, [mine], grad_average_ranks(ds, world))  # the trainer's step
    errors = {n: ((got[n] - want[n]).abs().max() / want[n].abs().max()).item() for n in want}
    res[f"ep {size}"] = dict(
        loss=[stats.loss, loss.item()], aux=[stats.aux_loss, aux.item()], norm=[stats.grad_norm, norm],
        grad=max(errors.values()), worst=max(errors, key=errors.get), trained=len(got), expected=len(want),
        average_ranks=grad_average_ranks(ds, world),
        groups=dict(sp=ranks(mpu.get_sequence_parallel_group()), ep=ranks(ep_group),
                    edp=ranks(groups._get_expert_data_parallel_group(name))))
""".replace("{REFERENCE_MODEL}", REFERENCE_MODEL)


@pytest.mark.slow
def test_sequence_and_expert_parallel_ranks_equal_one_rank(tmp_path):
    """4 gloo ranks, --sequence-parallel 2 (two packs, each shared by 2 ranks) with --expert-parallel 2 (the
    expert-parallel groups are the sequence-parallel groups) and 4 (one group across both): through ochat's engine
    (DeepSpeed ZeRO-2, its MoE reduction) and trainer step, the step's loss, load-balancing loss, gradient norm and
    every reduced gradient (the experts gathered) are one rank's over the two whole packs."""
    results = run_ranks(tmp_path, SP_WORKER, 4, json.dumps(QWEN3_MOE), OMP_NUM_THREADS="1")
    layouts = {2: dict(sp=[[0, 1], [2, 3]], ep=[[0, 1], [2, 3]], edp=[[0, 2], [1, 3]]),
               4: dict(sp=[[0, 1], [2, 3]], ep=[[0, 1, 2, 3]], edp=[[0], [1], [2], [3]])}
    for rank, res in enumerate(results):
        for size, layout in layouts.items():
            got = res[f"ep {size}"]
            assert got["groups"] == {k: next(g for g in v if rank in g) for k, v in layout.items()}, (rank, got)
            assert got["average_ranks"] == 2 and got["trained"] == got["expected"], (rank, got)
            for what, least in (("loss", 1.0), ("aux", 0.01), ("norm", 0.1)):
                value, reference = got[what]
                assert value == pytest.approx(reference, rel=1e-5) and reference > least, (rank, size, what, got)
            assert got["grad"] < 1e-5, (rank, size, got)


def test_refusals():
    moe = ModelConfig.debug(**QWEN3_MOE)
    t = ModelTransforms(expert_parallel=2)
    assert not refusals(t, model=moe, world_size=4, zero_stage=2)
    assert not refusals(ModelTransforms(expert_parallel=2, lora_rank=4), model=moe, world_size=4, zero_stage=2)
    assert not refusals(ModelTransforms(expert_parallel=2, lora_rank=4, qlora=True), model=moe, world_size=4,
                        zero_stage=2)
    assert refusals(ModelTransforms(expert_parallel=3), model=moe) == [
        "--expert-parallel 3 must divide the model's 8 experts per layer"]
    assert refusals(t, world_size=3) == ["--expert-parallel 2 must divide the number of ranks (3)"]
    assert refusals(t, model=ModelConfig.debug()) == [
        "--expert-parallel splits the experts of mixture-of-experts models; llama has no experts"]
    assert not refusals(ModelTransforms(expert_parallel=2, sequence_parallel=2), model=moe, world_size=4, zero_stage=2)
    assert not refusals(ModelTransforms(expert_parallel=2, tiled_mlp=2), model=moe, world_size=4, zero_stage=2)
    assert not refusals(ModelTransforms(expert_parallel=2, compile=True, recompute=0.5), model=moe, world_size=4,
                        zero_stage=2)
    assert any("ZeRO-3" in p for p in refusals(t, zero_stage=3))
    assert any("reduce_scatter" in p for p in refusals(t, zero_stage=2, reduce_scatter=False))


def test_expert_shards_are_saved_and_restored_exactly():
    """What a resume state holds of a rank's experts (`shards`) and how it returns (`load_shards`); anything else
    under the shards' names is refused, never broadcast into them."""
    model = torch.nn.Module()
    model.experts = torch.nn.Parameter(torch.randn(2, 3, 4))
    model.experts.held_experts = range(2, 4)
    model.router = torch.nn.Parameter(torch.randn(8, 3))
    saved = expert_parallel.shards(model)
    assert saved.keys() == {"experts"} and torch.equal(saved["experts"], model.experts)
    with torch.no_grad():
        model.experts.zero_()
    expert_parallel.load_shards(model, saved)
    assert torch.equal(model.experts, saved["experts"])
    for wrong in ({"experts": torch.zeros(1, 3, 4)}, {**saved, "router": model.router.detach()}, {}):
        with pytest.raises(ValueError, match=r"its expert shards do not fit this model \((experts|router)\)"):
            expert_parallel.load_shards(model, wrong)
