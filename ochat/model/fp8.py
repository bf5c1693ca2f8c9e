"""FP8 training of the decoder's linear layers through torchao (`--fp8 tensorwise|rowwise`).

Every nn.Linear inside the decoder layers becomes a torchao Float8Linear: its three matmuls (output, input
gradient, weight gradient) run in float8 with dynamic scales (one per tensor, or one per row), while the
weights, the optimizer and everything else stay as they were. The lm_head and the fused loss stay bf16 (the
logits are where low precision costs most). Each converted layer's forward is compiled (`torch.compile`,
dynamic token count): in eager mode the casts and scales are separate kernels and float8 is slower than bf16;
compiled, they fuse into the matmul's neighbours. With `--compile` the whole decoder layer is compiled instead
(`PackedCausalLM.compile_layers`), so the compiler can also fuse a cast with the norm or activation before it.

float8 matmuls need every dimension divisible by 16, the token count included: with --fp8 the trainer pads
each pack to a multiple of FP8_TOKEN_MULTIPLE tokens with weight-0 filler tokens (a conversation of their own,
so attention and the loss are unchanged).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

RECIPES = ("tensorwise", "rowwise")
FP8_TOKEN_MULTIPLE = 16


class _UnusedKernelLibraries(logging.Filter):
    """torchao warns at import about optional kernel libraries built for other GPUs or Pythons (`Failed to load
    .../_C_mxfp8...so`); float8 training through Float8Linear uses none of them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load")


def _in_decoder_layers(module: nn.Module, fqn: str) -> bool:
    return (isinstance(module, nn.Linear) and fqn.startswith("model.layers.")
            and module.in_features % FP8_TOKEN_MULTIPLE == 0 and module.out_features % FP8_TOKEN_MULTIPLE == 0)


def enable_fp8(model: nn.Module, recipe: str, *, compile: bool = True, emulate: bool = False) -> int:
    """Convert the decoder layers' linear layers of `model` to float8 training in place; returns how many.
    `compile` compiles each converted layer's forward (leave it off when the decoder layers are compiled whole);
    `emulate` runs the float8 casts with higher-precision matmuls (CPUs, tests)."""
    import dataclasses

    logging.getLogger("torchao").addFilter(_UnusedKernelLibraries())
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    if recipe not in RECIPES:
        raise ValueError(f"unknown fp8 recipe {recipe!r} (one of {', '.join(RECIPES)})")
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)
    convert_to_float8_training(model, config=config, module_filter_fn=_in_decoder_layers)
    converted = [m for m in model.modules() if isinstance(m, Float8Linear)]
    if compile:  # the forward alone: ZeRO-3's gather/release hooks stay outside the compiled graph
        for m in converted:
            m.forward = torch.compile(m.forward, dynamic=True)
    return len(converted)
