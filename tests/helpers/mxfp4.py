"""MXFP4 gpt-oss checkpoints for tests, in transformers' on-disk format (written here from transformers' own FP4 table,
independently of ochat.model.mxfp4, so that the two cannot share a misreading of the format)."""
import json
import os

import torch
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import FP4_VALUES

EXPERT_WEIGHTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # what the Hub's gpt-oss quantises
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]  # the Hub's


def quantize(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks uint8 [E, out, in / 32, 16], scales uint8 [E, out, in / 32]) of `rows` [E, out, in]: each block of 32
    values takes the smallest power of two that brings its largest magnitude to at most 6, and each value the nearest
    FP4 code; two codes per byte, the even value in the low nibble; scales biased by 127."""
    e, out, width = rows.shape
    groups = rows.float().reshape(e, out, width // 32, 32)
    amax = groups.abs().amax(-1)
    exponent = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6)), torch.full_like(amax, -127)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    magnitudes = torch.tensor(FP4_VALUES[:8])
    codes = (scaled.abs()[..., None] - magnitudes).abs().argmin(-1).to(torch.uint8) | ((scaled < 0).to(torch.uint8) << 3)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exponent + 127).to(torch.uint8)


def write_mxfp4_checkpoint(plain: str, out: str) -> None:
    """The gpt-oss checkpoint folder `plain` (one safetensors file, as transformers saves a tiny model) as the Hub
    ships gpt-oss: the experts' weights ([E, in, out] in transformers' module) stored as `<name>_blocks` and
    `<name>_scales` of their rows [E, out, in], everything else as it is; config.json with the Hub's
    quantization_config."""
    os.makedirs(out, exist_ok=True)
    tensors = {}
    for name, t in load_file(os.path.join(plain, "model.safetensors")).items():
        if name.endswith(EXPERT_WEIGHTS):
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = quantize(t.transpose(1, 2))
        else:
            tensors[name] = t
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(plain, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
