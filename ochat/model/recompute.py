"""`--gradient-checkpointing auto`: the least recompute that fits the GPU, chosen from measured first steps.

The first two steps run with every decoder layer checkpointed (what fits if anything does) and the second
one's peak memory is read: the optimizer allocates its states during the first step, after that step's
activations are gone, so only the second step shows the two together. A decoder layer that is not
checkpointed keeps its activations for the backward; their size for a full pack is measured once, before
training (`layer_activation_bytes`). Then the layers left un-checkpointed are as many as fit under
MEMORY_BUDGET of the GPU's memory:
`fraction = 1 - floor((budget - second step's peak) / one layer's activations) / layers`.
On a CPU there is nothing to fit: auto means no checkpointing.
"""
from __future__ import annotations

import math

import torch

from ochat.utils.log import log

MEMORY_BUDGET = 0.9  # of the GPU's memory: room for the allocator's fragmentation and packs that vary


def recompute_fraction(first_step_peak: float, capacity: float, layer_activations: float, layers: int) -> float:
    """The share of the decoder layers to checkpoint: the fewest such that the un-checkpointed layers' activations
    fit in MEMORY_BUDGET x capacity on top of the fully checkpointed step's peak (all in bytes)."""
    room = MEMORY_BUDGET * capacity - first_step_peak
    kept = max(0, min(layers, math.floor(room / max(layer_activations, 1.0))))
    return (layers - kept) / layers


def layer_activation_bytes(model, tokens: int, device: torch.device, probe_tokens: int = 2048) -> int:
    """Memory one decoder layer holds for its backward beyond a checkpointed one's, for a pack of `tokens`
    tokens: measured on the GPU as the difference between forwards with no layer and with every layer
    checkpointed, on one conversation of up to `probe_tokens` tokens, scaled to `tokens` (activations grow
    linearly with the token count: attention keeps no T x T matrix)."""
    t = min(tokens, probe_tokens)
    ids = torch.randint(0, model.config.vocab_size, (t,), device=device)
    positions = torch.arange(t, device=device)
    cu = torch.tensor([0, t], dtype=torch.int32, device=device)
    kept, held = model.checkpointed_layers, {}
    was_training = model.training
    model.train()
    for fraction in (0.0, 1.0):
        model.gradient_checkpointing_enable(fraction)
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        with torch.enable_grad():
            hidden = model.hidden_states(ids, positions, cu, t)
        held[fraction] = torch.cuda.memory_allocated(device) - before
        del hidden
    model.checkpointed_layers = kept
    model.train(was_training)
    return int((held[0.0] - held[1.0]) / len(model.model.layers) * tokens / t)


class AutoRecompute:
    """Checkpoints every layer for the first two steps, then the least share that fits (logged once)."""

    def __init__(self, model, batch_max_len: int, device: torch.device):
        self.model, self.device = model, device
        self.steps_to_measure = 2 if device.type == "cuda" else 0
        if not self.steps_to_measure:
            log("gradient checkpointing auto: no GPU memory to fit, so no layer is recomputed")
            model.gradient_checkpointing_disable()
            return
        self.layer_bytes = layer_activation_bytes(model, batch_max_len, device)
        model.gradient_checkpointing_enable(1.0)
        torch.cuda.reset_peak_memory_stats(device)

    def after_step(self) -> None:
        """After the second step: keep as many layers un-checkpointed as fit."""
        if not self.steps_to_measure:
            return
        self.steps_to_measure -= 1
        if self.steps_to_measure:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        peak = torch.cuda.max_memory_allocated(self.device)
        capacity = torch.cuda.get_device_properties(self.device).total_memory
        layers = len(self.model.model.layers)
        fraction = recompute_fraction(peak, capacity, self.layer_bytes, layers)
        self.model.gradient_checkpointing_enable(fraction)
        log(f"gradient checkpointing auto: {len(self.model.checkpointed_layers)} of {layers} layers recomputed "
            f"(fully checkpointed step's peak {peak / 2**30:.1f} GiB of {capacity / 2**30:.1f} GiB; "
            f"one layer's activations {self.layer_bytes / 2**30:.2f} GiB per pack)")
