"""LoRA under DeepSpeed ZeRO-3 in this process (one gloo rank, which still partitions every parameter and runs
ZeRO-3's hooks; no parameter kept whole between modules' forwards): the one-node LoRA layers (which read the base
layer's weight and bias and the adapters in the wrapper's forward), trained token rows (read by the embedding's and
lm_head's forward) and the stacked experts' adapters (read by their ParamWrapper's forward) give the loss, the
gradients and the optimizer steps of the model without DeepSpeed (which tests/model/test_lora.py checks against
transformers + peft), the logits outside the engine's forward too; the gathered adapter and merged weights equal
its, and an adapter-only ZeRO-3 state restores them."""
import socket
from collections import Counter

import deepspeed
import pytest
import torch
import torch.distributed as dist

from ochat.config.deepspeed import load_deepspeed_config
from ochat.model import PackedCausalLM, hf_weights, lora
from ochat.model.config import ModelConfig
from ochat.model.transforms import ModelTransforms, apply_transforms
from ochat.training.engine import weight_decay_groups
from ochat.training.runtime import init_distributed
from tests.helpers.models import VARIANTS, assert_close, make_pack
from tests.model.test_lora import lora_pair, weighted_labels
from tests.model.test_moe import MOE


@pytest.fixture(scope="module")
def one_rank():
    """A one-process gloo group for DeepSpeed, ended after this module's tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(port)).items():
            mp.setenv(k, v)
        # ZeRO-3's zero.Init swaps in its own F.linear and leaves it there: restored for the worker's later tests
        mp.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)
        init_distributed(cuda=False)
        yield
        dist.destroy_process_group()


def zero3_config(bf16: bool = False) -> dict:
    ds = load_deepspeed_config("zero3", grad_accum=1, grad_clip=0.0, bf16=bf16)
    ds["zero_allow_untested_optimizer"] = True
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # no parameter stays gathered between forwards
    return ds


def partitioned_twin(cfg: ModelConfig, model: PackedCausalLM, t: ModelTransforms, ds: dict) -> PackedCausalLM:
    """`model` (adapted by `t`) built again as the trainer builds it for ZeRO-3: partitioned under zero.Init, then
    adapted (the adapters and token rows made from the partitioned weights), then given `model`'s values."""
    with deepspeed.zero.Init(config_dict_or_path=ds):
        twin = PackedCausalLM(cfg, attn_impl="sdpa")
    apply_transforms(twin, t)
    values = dict(model.named_parameters())
    for n, p in twin.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(values[n].data)
    return twin


def loss_of(model, batch):
    out = model(*batch[:4], labels=batch[4], label_weights=batch[5])
    return out.weighted_loss + (0 if out.aux_loss is None else out.aux_loss)


def step_both(engine, ours, optimizer, batch, trained: list[str], what: str, after=lambda phase: None) -> None:
    """One optimizer step of the ZeRO-3 `engine` and of `ours` (the model without DeepSpeed, with `optimizer`) on
    `batch`: the losses and the gradients of the `trained` parameters equal; `after("forward")` and
    `after("backward")` run after the engine's."""
    loss = loss_of(engine, batch)
    after("forward")
    engine.backward(loss)
    after("backward")
    ref = loss_of(ours, batch)
    ref.backward()
    assert_close(loss.detach(), ref.detach(), what=f"{what} loss")
    params = dict(engine.module.named_parameters())
    for n in trained:
        assert_close(deepspeed.utils.safe_get_full_grad(params[n]), ours.get_parameter(n).grad, what=f"{what} grad {n}")
    engine.step()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("name", ["tied", "qwen3_moe", "gpt_oss"])
def test_zero3_trains_token_rows_and_expert_adapters_as_without_deepspeed(one_rank, name, tmp_path):
    """tied: one set of rows, read by the embedding and by lm_head; qwen3_moe, gpt_oss (biased experts, fused
    checkpoint layout): the experts' adapters, and rows of the embedding and of lm_head. Two optimizer steps (the second with the parameter trace DeepSpeed recorded in the
    first), every layer recomputed in the backward as --gradient-checkpointing does; the resume state saved after
    the first."""
    seqs, ids, pos, cu, mx = make_pack(ModelConfig.debug(**(MOE if name in MOE else VARIANTS)[name]))
    tokens = tuple(dict.fromkeys(ids.tolist()))[:3]  # rows that the embedding reads
    t = ModelTransforms(lora_rank=4, lora_trainable_tokens=tokens)
    cfg, ours, _ = lora_pair(name, tokens=tokens)
    ds = zero3_config()
    z3 = partitioned_twin(cfg, ours, t, ds)
    assert all(m.forward.func is lora._one_node_forward for m in lora.wrapped_layers(z3))
    z3.gradient_checkpointing_enable(1.0)
    engine, *_ = deepspeed.initialize(model=z3, optimizer=torch.optim.AdamW(weight_decay_groups(z3, 0.1), lr=1e-3),
                                      config=ds)
    optimizer = torch.optim.AdamW(weight_decay_groups(ours, 0.1), lr=1e-3)
    trained = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert sum(lora.is_token_rows(n) for n in trained) == (1 if cfg.tie_word_embeddings else 2)
    assert any(".experts." in n for n in trained) == (name in MOE)
    batch = (ids, pos, cu, mx, *weighted_labels(cfg, len(ids)))
    # each module that reads them gathers them in its own forward (registered: lora.py), not only inside the
    # model's forward, where DeepSpeed's engine also finds parameters read outside their modules by itself
    h = torch.randn(len(ids), cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for module in ("model.embed_tokens", "lm_head") + (("model.layers.0.mlp",) if name in MOE else ()):
            x = ids if module == "model.embed_tokens" else h
            got, want = (m.get_submodule(module)(x) for m in (engine.module, ours))
            for a, b in zip(*(((t,) if torch.is_tensor(t) else t) for t in (got, want))):  # an expert block: 2 outputs
                assert_close(a, b, what=f"{name} {module} before training")
    for step in range(2):
        step_both(engine, ours, optimizer, batch, trained, f"{name} step {step}")
        if step == 0:
            engine.save_checkpoint(str(tmp_path), tag="s", exclude_frozen_parameters=True)  # what --resume loads
            first = hf_weights.full_state_dict(engine.module, only=lora.is_adapter_weight)

    saved = hf_weights.full_state_dict(engine.module, only=lora.is_adapter_weight)
    want = {n: ours.get_parameter(n).detach() for n in trained}
    assert saved.keys() == want.keys()
    for n, values in saved.items():  # gathered whole, after the steps
        assert_close(values, want[n], what=f"{name} saved {n}")
    config = lora.adapter_config(ours)
    merged, ref_merged = (lora.merged_state_dict(hf_weights.full_state_dict(m), config) for m in (engine.module, ours))
    assert merged.keys() == ref_merged.keys()
    for n, values in merged.items():
        assert_close(values, ref_merged[n], what=f"{name} merged {n}")

    engine.load_checkpoint(str(tmp_path), tag="s", load_module_strict=False)
    restored = hf_weights.full_state_dict(engine.module, only=lora.is_adapter_weight)
    assert all(torch.equal(restored[n], first[n]) and not torch.equal(first[n], saved[n]) for n in saved)


def gathered(model) -> set[str]:
    """The names of `model`'s parameters that ZeRO-3 holds whole right now."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return {n for n, p in model.named_parameters() if p.ds_status == ZeroParamStatus.AVAILABLE}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_zero3_runs_each_lora_layer_as_one_node_as_without_deepspeed(one_rank, checkpointing, monkeypatch):
    """A Qwen2 model (biased q/k/v) with LoRA on every linear layer: under ZeRO-3 each wrapped layer runs as one
    autograd node (ochat.kernels.lora_linear), which reads the base layer's weight and bias and the adapters'
    outside their own modules' forward; over two optimizer steps (the second on the parameter trace DeepSpeed
    recorded in the first), with and without every layer recomputed, the loss and every adapter gradient equal
    the model's without DeepSpeed. Nothing is kept gathered longer than ZeRO-3 would (no reuse distance, no
    prefetch): when a layer's node runs forward or backward only parameters of its decoder layer are whole, and none
    after the forward or the backward."""
    import ochat.kernels.lora_linear as kernel

    cfg, ours, _ = lora_pair("qwen2_bias")
    seqs, ids, pos, cu, mx = make_pack(cfg)
    ds = zero3_config()
    ds["zero_optimization"].update(stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0)
    z3 = partitioned_twin(cfg, ours, ModelTransforms(lora_rank=4), ds)
    layers = lora.wrapped_layers(z3)
    assert len(layers) == cfg.num_hidden_layers * 7 and all(m.forward.func is lora._one_node_forward for m in layers)
    if checkpointing:
        z3.gradient_checkpointing_enable(1.0)
        ours.gradient_checkpointing_enable(1.0)
    engine, *_ = deepspeed.initialize(model=z3, optimizer=torch.optim.AdamW(weight_decay_groups(z3, 0.1), lr=1e-3),
                                      config=ds)
    optimizer = torch.optim.AdamW(weight_decay_groups(ours, 0.1), lr=1e-3)

    names = {id(m.base_layer.weight): n for n, m in engine.module.named_modules() if m in layers}
    # each layer gathers what its node reads in its own forward (registered: lora.py), not only inside the
    # model's forward, where DeepSpeed's engine also finds parameters read outside their modules by itself
    with torch.no_grad():
        for layer in names.values():
            x = torch.randn(5, ours.get_submodule(layer).in_features, generator=torch.Generator().manual_seed(5))
            assert_close(engine.module.get_submodule(layer)(x), ours.get_submodule(layer)(x), what=f"{layer} alone")
    assert not gathered(engine.module)
    seen = {"forward": [], "backward": []}  # (layer, the parameters whole while its node runs)
    one_node = kernel.lora_linear

    def watched(x, weight, *args):
        layer = names.get(id(weight))  # None: a layer of the model without DeepSpeed
        if layer is None:
            return one_node(x, weight, *args)
        seen["forward"].append((layer, gathered(engine.module)))
        out = one_node(x, weight, *args)  # a recompute ends inside the last layer's node (torch's early stop)
        out.register_hook(lambda g: seen["backward"].append((layer, gathered(engine.module))))
        return out

    monkeypatch.setattr(kernel, "lora_linear", watched)
    trained = [n for n, p in ours.named_parameters() if p.requires_grad]
    batch = (ids, pos, cu, mx, *weighted_labels(cfg, len(ids)))
    for step in range(2):
        def nothing_whole(after: str, step=step):
            assert not gathered(engine.module), f"step {step}: whole after the {after}"

        step_both(engine, ours, optimizer, batch, trained, f"step {step}", after=nothing_whole)

    runs = 2 * (2 if checkpointing else 1)  # each step's forward, and its recompute
    assert Counter(n for n, _ in seen["forward"]) == Counter({n: runs for n in names.values()})
    assert Counter(n for n, _ in seen["backward"]) == Counter({n: 2 for n in names.values()})
    for when, snapshots in seen.items():
        for layer, whole in snapshots:
            own = {f"{layer}.{p}" for p in ("base_layer.weight", "lora_A.default.weight", "lora_B.default.weight")}
            decoder_layer = ".".join(layer.split(".")[:3]) + "."
            assert own <= whole and all(n.startswith(decoder_layer) for n in whole), f"{when} {layer}: {whole}"


@pytest.mark.parametrize("name", ["qwen2_bias", "qwen3_moe"])
def test_zero3_in_bf16_makes_the_adapters_bf16_and_runs_each_layer_as_one_node(one_rank, name, monkeypatch):
    """A bf16 run: DeepSpeed's engine leaves a partitioned model's parameters in the dtype zero.Init made them in,
    so the adapters (the experts' too) and token rows are made in bf16 under ZeRO-3 (in float32 beside the bf16
    base, the layers would fall back to peft's forward); each wrapped layer runs as one node, and the loss and every
    adapter and row gradient equal the model's without DeepSpeed cast to bf16 (what a ZeRO-2 engine computes)."""
    import ochat.kernels.lora_linear as kernel

    cfg, ours, _ = lora_pair(name, tokens=(3, 5))
    seqs, ids, pos, cu, mx = make_pack(cfg)
    ds = zero3_config(bf16=True)
    z3 = partitioned_twin(cfg, ours, ModelTransforms(lora_rank=4, lora_trainable_tokens=(3, 5)), ds)
    engine, *_ = deepspeed.initialize(model=z3, optimizer=torch.optim.AdamW(weight_decay_groups(z3, 0.1), lr=1e-3),
                                      config=ds)
    ours.to(torch.bfloat16)
    layers = lora.wrapped_layers(z3)
    trained = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    assert any(".experts." in n for n in trained) == (name in MOE)
    assert {p.dtype for p in trained.values()} == {torch.bfloat16}
    batch = (ids, pos, cu, mx, *weighted_labels(cfg, len(ids)))
    one_node, weights = kernel.lora_linear, []

    def watched(x, weight, *args):
        weights.append(weight)
        return one_node(x, weight, *args)

    monkeypatch.setattr(kernel, "lora_linear", watched)
    loss = loss_of(engine, batch)
    assert sorted(map(id, weights)) == sorted(id(m.base_layer.weight) for m in layers)
    engine.backward(loss)
    ref = loss_of(ours, batch)
    ref.backward()
    assert_close(loss.detach().float(), ref.detach().float(), what="bf16 loss")
    for n, p in trained.items():
        assert_close(deepspeed.utils.safe_get_full_grad(p).float(), ours.get_parameter(n).grad.float(),
                     what=f"bf16 grad {n}")
