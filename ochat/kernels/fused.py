"""On/off switches for the fused kernels (so benchmarks can measure what each one buys).

Names: "rms_norm", "rope", "swiglu", "linear_ce". All are on by default; a fused kernel runs only on CUDA
tensors (elsewhere the PyTorch path runs) and outside torch.compile: inside a compiled region (the decoder
layers with `--compile`) the PyTorch path is what the compiler sees and fuses with its neighbours. Turn one off
with `set_fused("rope", False)` or, for a whole process, `OCHAT_DISABLE_FUSED=rms_norm,rope,swiglu,linear_ce`
(or `all`).
"""
import os

import torch

NAMES = ("rms_norm", "rope", "swiglu", "linear_ce")
_disabled = {n.strip() for n in os.environ.get("OCHAT_DISABLE_FUSED", "").split(",") if n.strip()}
if "all" in _disabled:
    _disabled = set(NAMES)
_enabled = {name: name not in _disabled for name in NAMES}


def set_fused(name: str, enabled: bool) -> None:
    """Enable or disable one fused kernel by name (see NAMES)."""
    if name not in _enabled:
        raise ValueError(f"unknown fused kernel {name!r}; known: {', '.join(NAMES)}")
    _enabled[name] = bool(enabled)


def fused_enabled(name: str) -> bool:
    """Whether the fused kernel `name` runs: switched on, and not inside a region torch.compile traces."""
    return _enabled[name] and not torch.compiler.is_compiling()

