"""The model transforms: applied in their fixed order as the flags ask, and the refused combinations in one place."""
import pytest
import torch

from ochat.model import ModelConfig, ModelTransforms, PackedCausalLM, apply_transforms
from ochat.model.transforms import refusals, selective_refusals


MOE = dict(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


def tiny():
    return PackedCausalLM(ModelConfig.debug(num_hidden_layers=4, vocab_size=256, hidden_size=64, intermediate_size=128),
                          attn_impl="sdpa")


def _compiled(fn) -> bool:
    return getattr(fn, "_torchdynamo_orig_callable", None) is not None


def test_nothing_asked_changes_nothing():
    model = tiny()
    apply_transforms(model, ModelTransforms())
    assert model.checkpointed_layers == frozenset()
    assert not any(_compiled(layer.forward) for layer in model.model.layers)


@pytest.mark.parametrize("recompute, layers", [(1.0, {0, 1, 2, 3}), (0.5, {0, 2}), ("auto", {0, 1, 2, 3})])
def test_recompute_checkpoints_an_evenly_spread_share(recompute, layers):
    model = tiny()
    apply_transforms(model, ModelTransforms(recompute=recompute))  # auto: every layer until AutoRecompute decides
    assert model.checkpointed_layers == frozenset(layers)


@pytest.mark.parametrize("mode", ["selective", "selective-attention"])
def test_selective_recompute_takes_every_layer(mode):
    model = tiny()
    apply_transforms(model, ModelTransforms(recompute=mode))
    assert model.layer_recompute == {i: mode for i in range(4)}


def test_fp8_then_compile_compiles_the_layer_not_each_linear():
    from torchao.float8.float8_linear import Float8Linear

    model = tiny()
    apply_transforms(model, ModelTransforms(fp8="tensorwise", compile=True), emulate_fp8=True)
    linears = [m for m in model.modules() if isinstance(m, Float8Linear)]
    assert len(linears) == 4 * 7  # q, k, v, o, gate, up, down of each decoder layer; lm_head stays
    assert all(_compiled(layer.forward) for layer in model.model.layers)
    assert not any(_compiled(m.forward) for m in linears)
    alone, emulated = tiny(), tiny()  # GPU float8 compiles each linear; emulated float8 (CPU) stays eager
    apply_transforms(alone, ModelTransforms(fp8="tensorwise"))
    assert all(_compiled(m.forward) for m in alone.modules() if isinstance(m, Float8Linear))
    apply_transforms(emulated, ModelTransforms(fp8="tensorwise"), emulate_fp8=True)
    assert not any(_compiled(m.forward) for m in emulated.modules() if isinstance(m, Float8Linear))


def test_tiled_mlp_keeps_the_result():
    model = tiny()
    ids = torch.randint(0, 256, (37,))
    pos, cu = torch.arange(37), torch.tensor([0, 37], dtype=torch.int32)
    with torch.no_grad():
        plain = model(ids, pos, cu, 37)
        apply_transforms(model, ModelTransforms(tiled_mlp=4))
        torch.testing.assert_close(model(ids, pos, cu, 37), plain)


@pytest.mark.parametrize("t, facts, message", [
    (ModelTransforms(offload_activations=True), {}, "add --gradient-checkpointing"),
    (ModelTransforms(compile=True, tiled_mlp=2), {}, "--compile compiles whole decoder layers"),
    (ModelTransforms(compile=True), {"zero_stage": 3}, "--compile needs ZeRO stage 2 or lower"),
    (ModelTransforms(sequence_parallel=2), {"reduce_scatter": False}, "needs ZeRO's reduce_scatter"),
    (ModelTransforms(offload_activations=True, recompute=1.0), {"cuda": False}, "it needs a GPU"),
    (ModelTransforms(sequence_parallel=3), {"world_size": 4}, "must divide the number of ranks (4)"),
    (ModelTransforms(sequence_parallel=4), {"model": ModelConfig.debug(hidden_size=96, num_attention_heads=6,
                                                                       num_key_value_heads=3)},
     "must divide the model's 6 attention heads"),
    (ModelTransforms(lora_rank=8, fp8="rowwise"), {}, "--lora-rank is not yet supported with --fp8"),
    (ModelTransforms(lora_rank=8, compile=True, qlora=True), {}, "--compile with LoRA is not yet supported with --qlora"),
    (ModelTransforms(lora_rank=8, compile=True, lora_dropout=0.1), {}, "not yet supported with --qlora or --lora-dropout"),
    (ModelTransforms(lora_rank=8, offload_activations=True, recompute=1.0), {},
     "--lora-rank is not yet supported with --offload-activations"),
    (ModelTransforms(lora_rank=8, lora_dropout=0.1), {"model": ModelConfig.debug(**MOE)},
     "--lora-dropout: the adapters of qwen3_moe's experts have none"),
    (ModelTransforms(fp8="rowwise", offload_activations=True, recompute=1.0), {"model": ModelConfig.debug(**MOE)},
     "--fp8, --offload-activations not yet supported with a mixture-of-experts model (qwen3_moe)"),
    (ModelTransforms(lora_rank=8, compile=True), {"model": ModelConfig.debug(**MOE)},
     "--compile is not yet supported with LoRA on qwen3_moe's experts: drop it or use --lora-targets attention"),
    (ModelTransforms(lora_alpha=16.0), {}, "--lora-alpha and --lora-dropout configure LoRA adapters: add --lora-rank"),
    (ModelTransforms(lora_trainable_tokens=(5,)), {}, "--lora-trainable-tokens trains embedding and lm_head rows "
                                                      "beside LoRA adapters: add --lora-rank"),
    (ModelTransforms(lora_rank=8, lora_trainable_tokens=(5, 128)), {"model": ModelConfig.debug()},
     "--lora-trainable-tokens: token id 128 is outside the model's vocabulary (128 rows)"),
    *[(ModelTransforms(recompute="selective", **kw), {}, f"selective: selective recompute is not supported with {flag}")
      for flag, kw in (("--fp8", dict(fp8="rowwise")),
                       ("--compile", dict(compile=True)), ("--tiled-mlp", dict(tiled_mlp=2)),
                       ("--offload-activations", dict(offload_activations=True)),
                       ("--sequence-parallel", dict(sequence_parallel=2)))],
    (ModelTransforms(recompute="selective-attention"), {"zero_stage": 3},
     "--gradient-checkpointing selective-attention: selective recompute is not supported with ZeRO-3"),
])
def test_each_refused_combination_says_why(t, facts, message):
    problems = refusals(t, **facts)
    assert len(problems) == 1 and message in problems[0]
    assert refusals(t) == ([] if facts else problems)  # a rule waits for its facts


def test_combinations_that_work_are_not_refused():
    moe = ModelConfig.debug(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
    for mode in ("selective", "selective-attention"):
        assert refusals(ModelTransforms(recompute=mode, router_aux_loss_coef=0.01), zero_stage=2, cuda=True,
                        world_size=2, model=moe) == []
    assert refusals(ModelTransforms(fp8="rowwise", compile=True, recompute="auto"), zero_stage=2, cuda=True) == []
    assert refusals(ModelTransforms(sequence_parallel=2, tiled_mlp=4, offload_activations=True, recompute=1.0),
                    zero_stage=3, cuda=True, world_size=4, model=ModelConfig.debug()) == []
    assert refusals(ModelTransforms(lora_rank=8, lora_alpha=32.0, lora_dropout=0.1, lora_targets="mlp", recompute=0.5),
                    zero_stage=3, cuda=True, world_size=2, model=ModelConfig.debug()) == []
    # LoRA with sequence parallelism, tiled MLP and compile (tests/model/test_sequence_parallel.py, test_lora.py)
    assert refusals(ModelTransforms(lora_rank=8, sequence_parallel=2, tiled_mlp=4), zero_stage=2,
                    cuda=True, world_size=4, model=ModelConfig.debug()) == []
    assert refusals(ModelTransforms(lora_rank=8, compile=True, recompute=0.5), zero_stage=2, cuda=True,
                    model=ModelConfig.debug()) == []
    assert refusals(ModelTransforms(lora_rank=8, qlora=True, tiled_mlp=4), zero_stage=2, model=ModelConfig.debug()) == []
    # LoRA and QLoRA (an expert model's adapters too) under selective recompute, which auto may then choose
    # (test_recompute.py)
    for mode in ("selective", "selective-attention"):
        for quantized in (False, True):
            assert refusals(ModelTransforms(lora_rank=8, qlora=quantized, recompute=mode), zero_stage=2, cuda=True,
                            model=ModelConfig.debug(**MOE)) == []
    assert selective_refusals(ModelTransforms(lora_rank=8, qlora=True, lora_dropout=0.1, recompute="auto"),
                              zero_stage=2) == []
    # QLoRA on an expert model, its experts' adapters beside NF4 stacks, recomputed and tiled (test_qlora.py, test_lora.py)
    assert refusals(ModelTransforms(lora_rank=8, qlora=True, recompute=1.0, tiled_mlp=4), zero_stage=2,
                    model=ModelConfig.debug(**MOE)) == []
    # QLoRA with sequence parallelism on a dense and an expert model (test_sequence_parallel.py), and with expert
    # parallelism (test_expert_parallel.py)
    assert refusals(ModelTransforms(lora_rank=8, qlora=True, sequence_parallel=2, tiled_mlp=4), zero_stage=2,
                    world_size=2, model=ModelConfig.debug()) == []
    assert refusals(ModelTransforms(lora_rank=8, qlora=True, sequence_parallel=2), zero_stage=2, world_size=2,
                    model=ModelConfig.debug(**MOE)) == []
    assert refusals(ModelTransforms(lora_rank=8, qlora=True, expert_parallel=2, recompute=1.0), zero_stage=2,
                    world_size=4, model=ModelConfig.debug(**MOE)) == []
    # trainable tokens beside an NF4 base (test_lora.py) and with sequence parallelism (test_sequence_parallel.py)
    assert refusals(ModelTransforms(lora_rank=8, qlora=True, lora_trainable_tokens=(5, 127, "<|end_of_turn|>")),
                    zero_stage=2, model=ModelConfig.debug()) == []
    assert refusals(ModelTransforms(lora_rank=8, sequence_parallel=2, lora_trainable_tokens=(5,)), zero_stage=2,
                    world_size=2, model=ModelConfig.debug()) == []
    # LoRA on an expert model: attention-only under ZeRO-3 with dropout, or the experts too (and token rows) under
    # ZeRO-2 or ZeRO-3 (test_lora_zero3.py)
    moe = ModelConfig.debug(**MOE)
    assert refusals(ModelTransforms(lora_rank=8, lora_targets="attention", lora_dropout=0.1), zero_stage=3,
                    model=moe) == []
    for stage in (2, 3):
        assert refusals(ModelTransforms(lora_rank=8, recompute=1.0, lora_trainable_tokens=(5, "<|end_of_turn|>")),
                        zero_stage=stage, model=moe) == []
    gpt_oss = ModelConfig.debug(model_type="gpt_oss", num_experts=4, num_experts_per_tok=2, head_dim=16)
    assert refusals(ModelTransforms(lora_rank=8, lora_targets="all"), zero_stage=2, model=gpt_oss) == []  # test_lora.py
    # an expert model sliced over ranks with its MLPs tiled (test_sequence_parallel.py), or compiled (test_moe.py)
    assert refusals(ModelTransforms(sequence_parallel=2, tiled_mlp=4, recompute=1.0, router_aux_loss_coef=0.01),
                    zero_stage=2, cuda=True, world_size=4, model=moe) == []
    assert refusals(ModelTransforms(compile=True, recompute=0.5, lora_rank=8, lora_targets="attention"), zero_stage=2,
                    cuda=True, world_size=2, model=moe) == []
