"""ZeRO-3 start: `load_partitioned` fills a model built under deepspeed.zero.Init, parameter by parameter.

Two CPU ranks (gloo, torch.distributed.run): each rank holds only its shard, and the gathered
parameters equal the checkpoint's tensors exactly (untied and tied embeddings).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from ochat.training.model import PackedCausalLM
from ochat.training.model_config import ModelConfig

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = r'''
import json, os, sys
import deepspeed, torch
import torch.distributed as dist
from safetensors.torch import load_file
from ochat.config.train_config import load_deepspeed_config
from ochat.training.checkpoint import load_partitioned
from ochat.training.train import _is_matrix

path, out = sys.argv[1], sys.argv[2]
deepspeed.init_distributed(dist_backend="gloo")
ds = load_deepspeed_config("zero3", grad_accum=1, grad_clip=1.0, bf16=False)
model = load_partitioned(path, ds)
params = list(model.named_parameters())
local = sum(p.ds_tensor.numel() for _, p in params)
total = sum(p.ds_numel for _, p in params)
mismatched = []
ref = load_file(path + "/model.safetensors")
for name, p in params:
    with deepspeed.zero.GatheredParameters([p]):
        if p.dtype != torch.float32 or not torch.equal(p.data, ref[name]):
            mismatched.append(name)
with open(f"{out}.{dist.get_rank()}", "w") as fh:
    json.dump({"local": local, "total": total, "mismatched": mismatched, "n": len(params),
               "matrices": sorted(n for n, p in params if _is_matrix(p)),
               "tied": model.lm_head.weight is model.model.embed_tokens.weight}, fh)
dist.barrier()
# Skip interpreter teardown: gloo's thread may still free the last all-gather's tensors, and taking the GIL
# while Python finalizes aborts the process ("terminate called without an active exception").
os._exit(0)
'''


@pytest.mark.parametrize("tied", [False, True])
def test_partitioned_load_equals_the_checkpoint(tmp_path, tied):
    torch.manual_seed(3)
    cfg = ModelConfig.debug(tie_word_embeddings=tied)
    PackedCausalLM(cfg).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(tmp_path / "worker.py"), str(tmp_path / "ckpt"), str(tmp_path / "res")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"res.{i}").read_text()) for i in range(2)]
    for res in ranks:
        assert res["mismatched"] == [] and res["tied"] == tied
        assert res["n"] == len(list(PackedCausalLM(cfg).named_parameters()))
        # weight decay goes to the same parameters as without ZeRO-3, although each rank's partition is flat
        assert res["matrices"] == sorted(n for n, p in PackedCausalLM(cfg).named_parameters() if p.ndim >= 2)
        assert res["local"] < 0.6 * res["total"]  # this rank's shard only (about half, rounded up per tensor)
    assert sum(res["local"] for res in ranks) >= ranks[0]["total"]
