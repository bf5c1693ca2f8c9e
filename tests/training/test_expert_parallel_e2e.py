"""`--expert-parallel 2` through the real launcher on 2 CPU ranks (gloo, float32, ZeRO-2): a tiny Qwen3-MoE trains
the same losses, gradient norms and final weights as the same 2 ranks without expert parallelism (the same packs),
its checkpoint holds every expert, and it writes no resume state."""
import os
import shutil

import pytest
import torch

from ochat.model.config import ModelConfig
from ochat.model.decoder import PackedCausalLM
from tests.helpers.train import metrics, run_trainer, weights

pytestmark = pytest.mark.slow

STEPS = ["--epochs", "1", "--max-steps", "3", "--eval-every", "0"]


@pytest.fixture(scope="module")
def moe_model(setup):
    """The tiny Llama's folder (its tokenizer) with a tiny Qwen3-MoE's weights: 8 experts, top-2, 2 expert layers."""
    root, _, tiny = setup
    out = root / "tiny_moe"
    shutil.copytree(tiny, out)
    os.remove(out / "model.safetensors")
    cfg = ModelConfig.debug(model_type="qwen3_moe", vocab_size=32001, max_position_embeddings=4096, num_experts=8,
                            num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                            router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    PackedCausalLM(cfg).save_pretrained(out)
    return str(out)


def test_two_expert_parallel_ranks_train_as_two_data_parallel_ranks(setup, moe_model):
    root, data, _ = setup
    outs = {}
    for ep in (1, 2):
        outs[ep] = str(root / f"ep{ep}")
        r = run_trainer(2, moe_model, data, outs[ep], *STEPS, "--expert-parallel", str(ep))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = ([(m["loss"], m["grad_norm"], m["aux_loss"]) for m in metrics(outs[ep])] for ep in (1, 2))
    assert len(a) == 3
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=0)
    wa, wb = weights(os.path.join(outs[1], "final")), weights(os.path.join(outs[2], "final"))
    assert wa.keys() == wb.keys() and "model.layers.1.mlp.experts.7.down_proj.weight" in wb
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
    assert os.path.isdir(os.path.join(outs[1], "ds_state", "step3"))
    assert not os.path.exists(os.path.join(outs[2], "ds_state", "step3"))
