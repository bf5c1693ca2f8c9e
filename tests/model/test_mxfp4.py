"""MXFP4 gpt-oss checkpoints (the Hub's format) against transformers (CPU, float32, a tiny random model quantised by
tests.helpers.mxfp4): the experts dequantised exactly as transformers dequantises them, packed logits equal to
transformers' on its dequantised model, and what ochat saves is a plain checkpoint transformers loads with the same
logits."""
import json

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from ochat.model import hf_weights, mxfp4
from ochat.model.config import ModelConfig
from ochat.model.decoder import PackedCausalLM
from tests.helpers.models import as_in_transformers, assert_close, make_pack, make_pair
from tests.helpers.mxfp4 import EXPERT_WEIGHTS, write_mxfp4_checkpoint
from tests.model.test_moe import MOE


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(config, the plain folder, the MXFP4 folder, transformers' model of the MXFP4 folder dequantised in float32)."""
    root = tmp_path_factory.mktemp("mxfp4")
    cfg, _, hf = make_pair("gpt_oss", variants=MOE)
    hf.save_pretrained(root / "plain")
    write_mxfp4_checkpoint(root / "plain", root / "mxfp4")
    ref = transformers.GptOssForCausalLM.from_pretrained(
        root / "mxfp4", quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32,
        attn_implementation="eager").eval()
    return cfg, root / "plain", root / "mxfp4", ref


def _expert_weights(cfg):
    return [f"model.layers.{i}.{w}" for i in range(cfg.num_hidden_layers) for w in EXPERT_WEIGHTS]


def test_dequantize_equals_transformers_on_every_code_and_scale():
    """Every byte (two codes) and every finite scale, in bfloat16 and float32: transformers' numbers exactly."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 2, 16), dtype=torch.uint8, generator=g)
    blocks[0, :16] = torch.arange(256, dtype=torch.uint8).view(16, 1, 16)
    scales = torch.randint(0, 255, (3, 40, 2), dtype=torch.uint8, generator=g)
    for dtype in (torch.bfloat16, torch.float32):
        ours = mxfp4.dequantize(blocks, scales, dtype)
        assert ours.dtype == dtype and ours.shape == (3, 64, 40)
        assert torch.equal(ours, convert_moe_packed_tensors(blocks, scales, dtype=dtype)), dtype


def test_experts_dequantised_as_transformers_dequantises_them(folders):
    """ochat's experts loaded from the MXFP4 folder are transformers' dequantised tensors (from_pretrained with
    Mxfp4Config(dequantize=True), and convert_moe_packed_tensors of the files) exactly, every other tensor the plain
    folder's; an expert-parallel rank reads its slice; config.json reads as the plain folder's."""
    cfg, plain, packed, ref = folders
    loaded = PackedCausalLM.from_pretrained(packed, attn_impl="sdpa")
    assert loaded.config == ModelConfig.from_hf_config(plain) == cfg
    want = ref.state_dict()
    original = hf_weights.CheckpointReader(plain)
    reader = hf_weights.CheckpointReader(packed)
    with safe_open(packed / "model.safetensors", "pt") as f:
        for name, p in loaded.named_parameters():
            for k, t in as_in_transformers(name, p.detach(), cfg).items():
                assert torch.equal(t, want[k]), k
                if k in _expert_weights(cfg):
                    files = convert_moe_packed_tensors(f.get_tensor(f"{k}_blocks"), f.get_tensor(f"{k}_scales"))
                    assert torch.equal(reader.get(k), files), k  # bfloat16, as transformers' default
                    error = ((t - original.get(k)).norm() / original.get(k).norm()).item()
                    assert 0.01 < error < 0.2, f"{k}: FP4's rounding, relative {error:.3f}"
                else:
                    assert torch.equal(t, original.get(k)), k
    n = "model.layers.1.mlp.experts.gate_up_proj"
    assert torch.equal(reader.parameter(n, cfg, range(1, 3)).float(), loaded.get_parameter(n)[1:3])
    assert reader.names() == original.names()


def test_packed_logits_equal_transformers_on_the_dequantised_model(folders):
    cfg, _, packed, ref = folders
    loaded = PackedCausalLM.from_pretrained(packed, attn_impl="sdpa").eval()
    seqs, ids, pos, cu, mx = make_pack(cfg)
    with torch.no_grad():
        logits = loaded(ids, pos, cu, mx)
        for i, s in enumerate(seqs):
            assert_close(logits[cu[i]:cu[i + 1]], ref(input_ids=s[None]).logits[0], rtol=1e-5,
                         what=f"conversation {i}")


def test_saved_checkpoint_is_a_plain_one_transformers_loads_with_the_same_logits(folders, tmp_path):
    cfg, _, packed, ref = folders
    PackedCausalLM.from_pretrained(packed, attn_impl="sdpa").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "float32"
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if k.endswith((mxfp4.BLOCKS, mxfp4.SCALES))]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(theirs) is transformers.GptOssForCausalLM and getattr(theirs, "hf_quantizer", None) is None
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(theirs(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_a_sharded_folder_with_blocks_and_scales_in_different_files_reads_the_same(folders, tmp_path):
    _, _, packed, _ = folders
    with safe_open(packed / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    shards = {name: "model-00002-of-00002.safetensors" if name.endswith(mxfp4.SCALES) else
              "model-00001-of-00002.safetensors" for name in tensors}
    for file in set(shards.values()):
        save_file({k: t for k, t in tensors.items() if shards[k] == file}, tmp_path / file)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    sharded, whole = hf_weights.CheckpointReader(tmp_path), hf_weights.CheckpointReader(packed)
    assert sharded.names() == whole.names()
    assert all(torch.equal(sharded.get(n), whole.get(n)) for n in whole.names())


def test_mismatched_blocks_and_scales_are_refused_in_one_line(tmp_path):
    name = "model.layers.0.mlp.experts.down_proj"
    save_file({f"{name}_blocks": torch.zeros(2, 8, 2, 16, dtype=torch.uint8),
               f"{name}_scales": torch.zeros(2, 8, 3, dtype=torch.uint8)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{tmp_path}: {name}_blocks \[2, 8, 2, 16\] and {name}_scales \[2, 8, 3\] "
                                         r"are not MXFP4 blocks of 32 values"):
        hf_weights.CheckpointReader(tmp_path)
