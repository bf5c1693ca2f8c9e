"""The DeepSpeed engine ochat builds: bf16 master weights (--master-dtype bf16) step like AdamW on bf16 weights,
keep no float32 copy, and resume bit for bit."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.train import REPO, _port

WORKER = r'''
import json, sys
import deepspeed, torch
from ochat.config.deepspeed import load_deepspeed_config
from ochat.model import PackedCausalLM
from ochat.model.config import ModelConfig
from ochat.training.collate import collate_pack
from ochat.training.engine import weight_decay_groups
from ochat.training.runtime import init_distributed
from ochat.training.step import forward_loss, train_step

out, bf16_master = sys.argv[1], sys.argv[2] == "bf16"
init_distributed(cuda=False)
LR, CLIP, STEPS = 3e-3, 0.5, 3


def packs(seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 128, (n,), generator=g).int().numpy(), torch.rand(n, generator=g).numpy())
            for n in (9, 30, 17)]


def engine_of(model):
    ds = load_deepspeed_config("zero2", grad_accum=1, grad_clip=CLIP, bf16=True, bf16_master=bf16_master)
    ds["zero_allow_untested_optimizer"] = True
    opt = torch.optim.AdamW(weight_decay_groups(model, 0.1), lr=LR, betas=(0.9, 0.95), eps=1e-5)
    return deepspeed.initialize(model=model, optimizer=opt, config=ds)[0]


torch.manual_seed(0)
model = PackedCausalLM(ModelConfig.debug())
reference = PackedCausalLM(ModelConfig.debug()).to(torch.bfloat16)
reference.load_state_dict(model.state_dict())
engine = engine_of(model)
# the reference: AdamW on the bf16 weights themselves, bf16 moments, the same clipping
ref_opt = torch.optim.AdamW(weight_decay_groups(reference, 0.1), lr=LR, betas=(0.9, 0.95), eps=1e-5)
res = {"master": str(engine.optimizer.single_partition_of_fp32_groups[0].dtype)}
start = [q.detach().float().clone() for q in reference.parameters()]
for step in range(STEPS):
    if step == STEPS - 1:
        engine.save_checkpoint(out + "/ckpt", tag="s")
    batch = collate_pack(packs(step))
    train_step(engine, [batch], 1)
    sums = forward_loss(reference, batch, torch.device("cpu"))
    (sums.weighted_loss / sums.weight).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
    ref_opt.step()
    ref_opt.zero_grad()
update = torch.cat([(p.float() - s).flatten() for p, s in zip(engine.module.parameters(), start)])
ref_update = torch.cat([(q.float() - s).flatten() for q, s in zip(reference.parameters(), start)])
res["update_cosine"] = torch.nn.functional.cosine_similarity(update, ref_update, dim=0).item()
res["equal_fraction"] = (update == ref_update).float().mean().item()
res["state_dtypes"] = sorted({str(t.dtype) for s in engine.optimizer.optimizer.state.values() for t in s.values()
                              if t.dim()})
last = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
torch.manual_seed(0)
resumed = engine_of(PackedCausalLM(ModelConfig.debug()))
resumed.load_checkpoint(out + "/ckpt", tag="s")
train_step(resumed, [collate_pack(packs(STEPS - 1))], 1)
res["resume_mismatched"] = [n for n, p in resumed.module.named_parameters() if not torch.equal(p, last[n])]
with open(out + "/res.json", "w") as fh:
    json.dump(res, fh)
'''


def run_worker(tmp_path, master: str) -> dict:
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), RANK="0",
               LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()))
    r = subprocess.run([sys.executable, str(tmp_path / "worker.py"), str(tmp_path), master], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((tmp_path / "res.json").read_text())


@pytest.mark.slow
def test_bf16_master_weights_step_like_adamw_on_bf16_weights_and_resume_exactly(tmp_path):
    res = run_worker(tmp_path, "bf16")
    assert res["master"] == "torch.bfloat16" and res["state_dtypes"] == ["torch.bfloat16"]
    # the update of AdamW stepping the bf16 weights, up to bf16 roundings of gradients DeepSpeed sums and clips
    assert res["update_cosine"] > 0.9999 and res["equal_fraction"] > 0.65, res  # float32 master: 0.998, 0.51
    assert res["resume_mismatched"] == []
