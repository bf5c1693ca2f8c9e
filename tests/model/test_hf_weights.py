"""Hugging Face weights in and out, tied and untied: plain round trips, and under ZeRO-3 on two CPU ranks
(gloo, torch.distributed.run) the partitioned load equals the checkpoint and the export after a training step
equals the trained weights."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from ochat.model import hf_weights
from ochat.model.config import ModelConfig
from ochat.model.decoder import PackedCausalLM
from ochat.training.engine import weight_decay_groups
from tests.helpers.hostile import CodeRunningPickle
from tests.helpers.ranks import run_ranks


def random_model(tied: bool, seed: int = 3) -> PackedCausalLM:
    torch.manual_seed(seed)
    return PackedCausalLM(ModelConfig.debug(tie_word_embeddings=tied))


@pytest.mark.parametrize("tied", [False, True])
def test_save_then_load_is_exact_and_a_tied_head_is_not_written(tmp_path, tied):
    model = random_model(tied)
    hf_weights.save_weights(tmp_path, hf_weights.full_state_dict(model), model.config, eos_token_id=5)
    on_disk = load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in on_disk) is not tied
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == 5
    back = PackedCausalLM.from_pretrained(tmp_path)
    assert (back.lm_head.weight is back.model.embed_tokens.weight) is tied
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


def test_sharded_save_writes_an_index_that_loads(tmp_path):
    model = random_model(False)
    model.save_pretrained(tmp_path, max_shard_bytes=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = PackedCausalLM.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name


def test_checkpoint_with_other_names_is_refused(tmp_path):
    model = random_model(False)
    sd = hf_weights.full_state_dict(model)
    sd["model.extra.weight"] = torch.ones(2)
    del sd["model.norm.weight"]
    hf_weights.save_weights(tmp_path, sd, model.config)
    with pytest.raises(ValueError, match=r"missing keys \['model.norm.weight'\], unexpected keys \['model.extra.weight'\]"):
        PackedCausalLM.from_pretrained(tmp_path)



def test_config_json_that_does_not_describe_the_weights_is_refused(tmp_path):
    model = random_model(False)
    hf_weights.save_weights(tmp_path, hf_weights.full_state_dict(model), model.config)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(hf, intermediate_size=48)))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight has shape \[96, 64\] where config.json "
                                         r"makes it \[48, 64\] \(6 tensor\(s\) differ\)"):
        PackedCausalLM.from_pretrained(tmp_path)


def test_a_truncated_safetensors_file_is_one_line(tmp_path):
    model = random_model(False)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"model.safetensors: cannot read its weights \("):
        PackedCausalLM.from_pretrained(tmp_path)



def test_a_pickle_that_runs_code_in_pytorch_model_bin_is_refused(tmp_path):
    model = random_model(False)
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    os.remove(tmp_path / "model.safetensors")
    marker = tmp_path / "ran"
    torch.save(dict(sd, evil=CodeRunningPickle(str(marker))), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: cannot read its weights \(.*"):
        PackedCausalLM.from_pretrained(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/outside.safetensors", "sub/../../x.safetensors"])
def test_index_shard_names_that_leave_the_folder_are_refused(tmp_path, shard):
    model = random_model(False)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder, max_shard_bytes=60_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"shard {shard!r} is not a file name inside the folder: refused"):
        PackedCausalLM.from_pretrained(folder)


WORKER = r'''
import sys
import deepspeed, torch
import torch.distributed as dist
from safetensors.torch import load_file
from ochat.config.deepspeed import load_deepspeed_config
from ochat.model import PackedCausalLM, hf_weights
from ochat.training.collate import collate_pack
from ochat.training.engine import weight_decay_groups
from ochat.training.runtime import init_distributed
from ochat.training.step import train_step

out, path = sys.argv[1], sys.argv[2]
init_distributed(cuda=False)
ds = load_deepspeed_config("zero3", grad_accum=1, grad_clip=1.0, bf16=False)
ds["zero_allow_untested_optimizer"] = True
model = PackedCausalLM.from_pretrained_partitioned(path, ds)
params = list(model.named_parameters())
res = {"local": sum(p.ds_tensor.numel() for _, p in params), "total": sum(p.ds_numel for _, p in params),
       "n": len(params), "tied": model.lm_head.weight is model.model.embed_tokens.weight,
       "decayed": sorted(n for n, p in params if any(p is q for q in weight_decay_groups(model, 0.1)[0]["params"]))}
ref = load_file(path + "/model.safetensors")
res["load_mismatched"] = []
for name, p in params:
    with deepspeed.zero.GatheredParameters([p]):
        if p.dtype != torch.float32 or not torch.equal(p.data, ref[name]):
            res["load_mismatched"].append(name)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(weight_decay_groups(model, 0.1), lr=1e-2),
                                  config=ds)
g = torch.Generator().manual_seed(dist.get_rank())
pack = [(torch.randint(0, 128, (n,), generator=g).int().numpy(), torch.rand(n, generator=g).numpy()) for n in (9, 30)]
train_step(engine, [collate_pack(pack)], dist.get_world_size())
exported = hf_weights.full_state_dict(engine.module)
res["export_mismatched"], res["changed"] = [], 0
for name, p in engine.module.named_parameters():
    with deepspeed.zero.GatheredParameters([p]):
        if dist.get_rank() == 0:
            res["changed"] += int(not torch.equal(p.data, ref[name]))
            if not torch.equal(exported[name], p.data.cpu()):
                res["export_mismatched"].append(name)
res["exported_names"] = sorted(exported) if exported is not None else None
'''


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_zero3_load_and_export_equal_the_weights(tmp_path, tied):
    model = random_model(tied)
    model.save_pretrained(tmp_path / "ckpt")
    ranks = run_ranks(tmp_path, WORKER, 2, str(tmp_path / "ckpt"))
    names = [n for n, _ in model.named_parameters()]
    for res in ranks:
        assert res["load_mismatched"] == [] and res["tied"] == tied and res["n"] == len(names)
        # weight decay goes to the same parameters as without ZeRO-3, although each rank's partition is flat
        assert res["decayed"] == sorted(n for n, p in model.named_parameters()
                                        if any(p is q for q in weight_decay_groups(model, 0.1)[0]["params"]))
        assert res["local"] < 0.6 * res["total"]  # this rank's shard only (about half, rounded up per tensor)
    assert sum(res["local"] for res in ranks) >= ranks[0]["total"]
    main = ranks[0]
    assert main["export_mismatched"] == [] and main["changed"] == len(names)
    assert main["exported_names"] == sorted(names) and ("lm_head.weight" in main["exported_names"]) is not tied
