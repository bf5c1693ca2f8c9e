"""--fp8: which layers convert (the decoder layers' linear layers, not the lm_head), and that emulated float8
training stays close to the same model in float32 (CPU; the real float8 matmuls are exercised on the GPU)."""
import copy

import numpy as np
import pytest
import torch

from ochat.model.config import ModelConfig
from ochat.model.decoder import PackedCausalLM
from ochat.model.fp8 import enable_fp8
from ochat.training.collate import collate_pack

pytest.importorskip("torchao")


def test_decoder_linears_convert_and_the_head_stays():
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    model = PackedCausalLM(ModelConfig.debug(vocab_size=256, hidden_size=64, intermediate_size=128), attn_impl="sdpa")
    reference = copy.deepcopy(model)
    assert enable_fp8(model, "tensorwise", compile=False, emulate=True) == 2 * 7  # q k v o gate up down per layer
    assert not isinstance(model.lm_head, Float8Linear) and isinstance(model.model.layers[0].mlp.down_proj, Float8Linear)
    g = torch.Generator().manual_seed(1)
    pack = collate_pack([(torch.randint(0, 256, (n,), generator=g).int().numpy(), torch.ones(n).numpy()) for n in (40, 24)])
    losses = []
    for m in (reference, model):
        out = m(pack["input_ids"], pack["position_ids"], pack["cu_seqlens"], pack["max_seqlen"],
                labels=pack["labels"], label_weights=pack["label_weights"])
        (out.weighted_loss / out.weight).backward()
        losses.append(float(out.weighted_loss / out.weight))
    assert abs(losses[0] - losses[1]) < 0.02 * losses[0]
    g_ref, g_fp8 = reference.model.layers[1].mlp.up_proj.weight.grad, model.model.layers[1].mlp.up_proj.weight.grad
    assert torch.nn.functional.cosine_similarity(g_ref.flatten(), g_fp8.flatten(), dim=0) > 0.95


@pytest.mark.parametrize("recipe, isolated", [("rowwise", True), ("tensorwise", False)])
def test_rowwise_keeps_conversations_apart_and_tensorwise_shares_a_scale(recipe, isolated):
    """Rowwise scales each token's activations on their own: a pack's conversations stay exactly apart.
    Tensorwise quantizes the whole pack with one scale, so one conversation moves another's rounding."""
    torch.manual_seed(0)
    model = PackedCausalLM(ModelConfig.debug(vocab_size=256, hidden_size=64, intermediate_size=128), attn_impl="sdpa")
    enable_fp8(model, recipe, compile=False, emulate=True)
    g = torch.Generator().manual_seed(2)
    second = torch.randint(0, 256, (24,), generator=g)
    logits = []
    for first in (torch.randint(0, 256, (40,), generator=g), torch.randint(0, 256, (40,), generator=g) * 0 + 7):
        pack = collate_pack([(first.int().numpy(), torch.ones(40).numpy()), (second.int().numpy(), torch.ones(24).numpy())])
        with torch.no_grad():
            logits.append(model(pack["input_ids"], pack["position_ids"], pack["cu_seqlens"], pack["max_seqlen"])[40:])
    assert torch.equal(logits[0], logits[1]) is isolated


@pytest.mark.slow
def test_fp8_trains_the_same_under_zero2_and_zero3_and_saves_plain_weights(tmp_path, tiny_inputs):
    """The real trainer with --fp8 rowwise (emulated on CPU ranks): ZeRO-3's partitioned weights give the same
    losses as ZeRO-2's whole ones, and the checkpoint holds ordinary bf16/float32 Linear weights that load in
    transformers."""
    from transformers import AutoModelForCausalLM

    from tests.helpers.train import metrics, run_trainer

    data, model = tiny_inputs
    losses = {}
    for zero, ranks in (("zero2", 1), ("zero3", 2)):
        out = str(tmp_path / zero)
        r = run_trainer(ranks, model, data, out, "--deepspeed-config", zero, "--max-steps", "3", "--batch-max-len",
                        "512", "--fp8", "rowwise", "--grad-accum", str(3 - ranks))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "fp8 (rowwise scaling): 14 linear layers" in r.stdout
        losses[zero] = [m["loss"] for m in metrics(out)]
    np.testing.assert_allclose(losses["zero3"], losses["zero2"], rtol=1e-4)
    assert losses["zero3"][-1] < losses["zero3"][0]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "zero3" / "final"))
    assert type(hf.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert torch.isfinite(hf.model.layers[0].mlp.down_proj.weight).all()
