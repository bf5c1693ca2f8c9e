"""`--expert-parallel 2` through the real launcher on 2 CPU ranks (gloo, float32, ZeRO-2): a tiny Qwen3-MoE trains
the same losses, gradient norms and final weights as the same 2 ranks without expert parallelism (the same packs),
its checkpoint holds every expert, and a run resumed from its mid-run resume state ends bit for bit equal."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ochat.model.config import ModelConfig
from tests.helpers.train import metrics, model_like_tiny, run_trainer, weights

pytestmark = pytest.mark.slow

STEPS = ["--epochs", "1", "--max-steps", "3", "--eval-every", "0"]
EP = ["--expert-parallel", "2", "--save-state-every", "2"]


@pytest.fixture(scope="module")
def moe_model(setup):
    """The tiny Llama's folder (its tokenizer) with a tiny Qwen3-MoE's weights: 8 experts, top-2, 2 expert layers."""
    root, _, tiny = setup
    config = ModelConfig.debug(model_type="qwen3_moe", vocab_size=32001, max_position_embeddings=4096, num_experts=8,
                               num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                               router_aux_loss_coef=0.01)
    return model_like_tiny(tiny, root / "tiny_moe", config)


@pytest.fixture(scope="module")
def ep_run(setup, moe_model):
    """The uninterrupted run under test: 2 ranks, --expert-parallel 2, resume states after steps 2 and 3."""
    root, data, _ = setup
    out = str(root / "ep2")
    r = run_trainer(2, moe_model, data, out, *STEPS, *EP)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def _per_step(out: str) -> list[tuple]:
    return [(m["loss"], m["grad_norm"], m["aux_loss"]) for m in metrics(out)]


def test_two_expert_parallel_ranks_train_as_two_data_parallel_ranks(setup, moe_model, ep_run):
    root, data, _ = setup
    dense = str(root / "ep1")
    r = run_trainer(2, moe_model, data, dense, *STEPS)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = _per_step(dense), _per_step(ep_run)
    assert len(a) == 3
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=0)
    wa, wb = weights(os.path.join(dense, "final")), weights(os.path.join(ep_run, "final"))
    assert wa.keys() == wb.keys() and "model.layers.1.mlp.experts.7.down_proj.weight" in wb
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)


def test_a_resumed_expert_parallel_run_is_bit_for_bit(setup, moe_model, ep_run, tmp_path):
    """The run folder as a kill right after the state of step 2 leaves it: that state holds each expert-parallel
    rank's own experts, and the resumed run's step 3 (loss, gradient norm, aux loss) and final weights are the
    uninterrupted run's, bit for bit (with rank 0's experts on rank 1, step 3 differs)."""
    _, data, _ = setup
    out = str(tmp_path / "killed")
    shutil.copytree(ep_run, out, ignore=shutil.ignore_patterns("final", "step3"))
    states = os.path.join(out, "ds_state")
    with open(os.path.join(states, "latest"), "w") as fh:
        fh.write("step2")
    shards = [load_file(os.path.join(states, "step2", f"expert_shards_ep_rank_{r}.safetensors")) for r in (0, 1)]
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert shards[0][name].shape[0] == 4 and not torch.equal(shards[0][name], shards[1][name])

    r = run_trainer(2, moe_model, data, out, *STEPS, *EP, "--resume")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed at epoch 0 step-in-epoch 2 (global step 2)" in r.stdout, r.stdout[-3000:]
    assert _per_step(out) == _per_step(ep_run)
    a, b = weights(os.path.join(ep_run, "final")), weights(os.path.join(out, "final"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
