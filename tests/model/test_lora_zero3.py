"""LoRA under DeepSpeed ZeRO-3 in this process (one gloo rank, which still partitions every parameter and runs
ZeRO-3's hooks; no parameter kept whole between modules' forwards): trained token rows (read by the embedding's and
lm_head's forward) and the stacked experts' adapters (read by their ParamWrapper's forward) give the loss, the
gradients and the optimizer steps of the model without DeepSpeed (which tests/model/test_lora.py checks against
transformers + peft), the logits outside the engine's forward too; the gathered adapter and merged weights equal
its, and an adapter-only ZeRO-3 state restores them."""
import socket

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


def zero3_config() -> dict:
    ds = load_deepspeed_config("zero3", grad_accum=1, grad_clip=0.0, bf16=False)
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
    params = dict(engine.module.named_parameters())
    for step in range(2):
        loss = loss_of(engine, batch)
        engine.backward(loss)
        ref = loss_of(ours, batch)
        ref.backward()
        assert_close(loss.detach(), ref.detach(), what=f"{name} step {step} loss")
        for n in trained:
            assert_close(deepspeed.utils.safe_get_full_grad(params[n]), ours.get_parameter(n).grad,
                         what=f"{name} step {step} grad {n}")
        engine.step()
        optimizer.step()
        optimizer.zero_grad()
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
