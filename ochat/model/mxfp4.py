"""MXFP4 checkpoint tensors (the Hub's gpt-oss: `quantization_config.quant_method == "mxfp4"`), dequantised on read.

transformers' on-disk format (`transformers.integrations.mxfp4`): a weight that transformers' module holds as
[E, in, out] (gpt-oss: `mlp.experts.gate_up_proj` [E, H, 2I], `down_proj` [E, I, H]) is stored as its rows
[E, out, in], cut along `in` into blocks of 32 values, in two tensors beside each other:
- `<name>_blocks` uint8 [E, out, in / 32, 16]: two 4-bit FP4 (E2M1) codes per byte, the block's even value in the
  low nibble, the odd one in the high nibble; a code's bit 3 is the sign, bits 0-2 pick 0, 0.5, 1, 1.5, 2, 3, 4, 6;
- `<name>_scales` uint8 [E, out, in / 32]: each block's power of two, biased by 127 (value = code x 2^(scale - 127)).

`dequantize` gives back the [E, in, out] weight (a transposed view), exactly: every such value is a bfloat16 (and
a float32), so the dequantised weights are the same numbers in either dtype; transformers' own dequantisation
(`convert_moe_packed_tensors`) gives them too. It works one expert at a time, so its temporaries (float32 values,
int32 indices) stay small beside the result.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCKS, SCALES = "_blocks", "_scales"  # suffixes of the two tensors of a quantised weight
BLOCK_VALUES = 32  # values per block (one scale each): 16 bytes of two codes
SCALE_BIAS = 127
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # by code


def packed_names(names) -> dict[str, tuple[str, str]]:
    """The quantised weights among checkpoint tensor names: dequantised name -> (its blocks', its scales' name), for
    every `<name>_blocks` whose `<name>_scales` is there too."""
    names = set(names)
    return {n[:-len(BLOCKS)]: (n, n[:-len(BLOCKS)] + SCALES) for n in names
            if n.endswith(BLOCKS) and n[:-len(BLOCKS)] + SCALES in names}


def dequantized_shape(name: str, blocks: tuple[int, ...], scales: tuple[int, ...]) -> tuple[int, ...]:
    """The shape [E, in, out] of the weight `name` whose blocks and scales have these shapes (ValueError naming it
    when they do not fit each other)."""
    if len(blocks) != 4 or blocks[-1] != BLOCK_VALUES // 2 or blocks[:-1] != scales:
        raise ValueError(f"{name}{BLOCKS} {list(blocks)} and {name}{SCALES} {list(scales)} are not MXFP4 blocks of "
                         f"{BLOCK_VALUES} values ([E, out, in / {BLOCK_VALUES}, {BLOCK_VALUES // 2}] and [E, out, "
                         f"in / {BLOCK_VALUES}])")
    experts, out, groups, _ = blocks
    return experts, groups * BLOCK_VALUES, out


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The weight [E, in, out] in `dtype` from its MXFP4 `blocks` [E, out, in / 32, 16] and `scales` [E, out, in / 32]
    (uint8): a transposed view of a contiguous [E, out, in] tensor."""
    experts, width, out = dequantized_shape("weight", tuple(blocks.shape), tuple(scales.shape))
    values = torch.tensor(FP4_VALUES)
    pairs = torch.stack((values.repeat(16), values.repeat_interleave(16)), dim=-1)  # byte -> (low nibble's, high's)
    result = torch.empty(experts, out, width, dtype=dtype)
    for i in range(experts):  # one expert at a time: its values in float32 are 8x its bytes
        block_values = F.embedding(blocks[i].to(torch.int32), pairs).flatten(-2)  # [out, in / 32, 32]
        block_values *= torch.pow(2.0, scales[i].to(torch.int32) - SCALE_BIAS)[..., None]  # exact: powers of two
        result[i] = block_values.flatten(-2)
    return result.transpose(-2, -1)
