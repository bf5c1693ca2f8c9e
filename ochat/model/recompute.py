"""Activation recompute (gradient checkpointing) per decoder layer: full, selective, and `auto`'s choice between them.

Modes of one decoder layer (`PackedCausalLM.layer_recompute`, the trainer's `--gradient-checkpointing`):
- full: torch's non-reentrant checkpoint of the whole layer. The layer keeps only its input; the backward reruns
  its forward (about a third more compute per step).
- selective: the layer keeps the outputs of its GEMMs (q/k/v/o, gate/up/down projections; the experts' grouped
  GEMMs and the router) and the attention's own saved tensors, and the backward reruns only the cheap,
  memory-heavy ops between them: the RMSNorms, RoPE, the GLU activation, the residual adds. It frees the norms'
  outputs (the q/k/v and gate/up GEMMs' inputs) and the GLU's output (the down projection's input).
- selective-attention: as selective, and attention is recomputed too: it frees the attention's output and
  the rotated q and k (it keeps the q/k/v GEMM outputs before RoPE), for one more attention forward per layer.

Selective recompute is torch's selective activation checkpointing (`torch.utils.checkpoint` with
`create_selective_checkpoint_contexts`): a policy sees each aten op of the layer's forward and caches the outputs
of aten.mm / addmm / _grouped_mm, which the recompute takes back instead of rerunning them; every other op is
rerun. ochat's fused kernels (RMSNorm, RoPE, GLU: autograd Functions that launch Triton) are not aten ops: the
recompute reruns them whole, with the `torch.empty` they write into, which is what is wanted. Attention, whatever
its backend (FlashAttention-4, flash-attn 2, torch's varlen, SDPA, sequence parallelism's all-to-all around it), is
kept by `attend`, not by the policy: in the forward it runs with its saved tensors outside the checkpoint (an
identity `saved_tensors_hooks`), and in the recompute it is skipped, its output taken from the forward. The
recompute reruns the same ops on the same inputs, so gradients are exactly those without recompute.

LoRA (ochat.model.lora) and QLoRA: a wrapped layer keeps its base GEMM's output and the adapter's rank-r product
x A^T (r values per token); the GEMM expanding that product to the layer's width (B, r multiply-adds per output: as
cheap as the ops selective reruns, and as large as the base output) runs inside `rerun_gemms` and is rerun, as is
the add. torch refuses a kept output changed in place, so inside a selective checkpoint (`in_selective_checkpoint`)
the adapter's product is added out of place: one more pass over the output, there only. An NF4 weight is
dequantised by ordinary ops, which the policy does not keep: no dequantised weight is held (it would cost the whole
bf16 weight per layer), the recompute dequantises once more and the backward again, as with full recompute.

`--gradient-checkpointing auto`: the least recompute that fits the GPU, chosen from measured first steps. The
first two steps run with every decoder layer fully checkpointed (what fits if anything does) and the second one's
peak memory is read: the optimizer allocates its states during the first step, after that step's activations are
gone, so only the second step shows the two together. What one layer holds for its backward beyond a fully
checkpointed one, none and selective, is measured once before training for a full pack (`activation_bytes`).
The room left, MEMORY_BUDGET of the GPU's memory less that peak, is then spent in the order that buys the most
speed per byte (`recompute_plan`): first full layers become selective (each saves a layer's forward for a fraction
of its memory), then selective layers become plain (each saves only the cheap ops). Every rank takes the largest
peak and layer sizes of all ranks, so all choose the same layers. On a CPU there is nothing to fit: auto means no
recompute.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from typing import NamedTuple

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ochat.utils.log import log

MEMORY_BUDGET = 0.9  # of the GPU's memory: room for the allocator's fragmentation and packs that vary
MODES = ("full", "selective", "selective-attention")  # what a recomputed layer recomputes (module docstring)
SELECTIVE = MODES[1:]
_aten = torch.ops.aten
GEMMS = frozenset([_aten.mm.default, _aten.addmm.default]
                  + ([_aten._grouped_mm.default] if hasattr(_aten, "_grouped_mm") else []))  # outputs kept


# ------------------------------------------------------------------------------------------------ selective recompute
class _Region:
    """One selective checkpoint of one layer call: whether it keeps attention, the attention outputs it kept, the
    GEMMs it ran."""

    def __init__(self, layer, keep_attention: bool):
        self.layer, self.keep_attention = layer, keep_attention
        self.attention_outputs: list[torch.Tensor] = []
        self.recomputing = False
        self.in_attention = False
        self.next = 0  # the next kept attention output the recompute takes
        self.gemms = 0  # GEMMs run so far, but those inside attention or `rerun_gemms`
        self.rerun_gemms = False  # inside `rerun_gemms`
        # the layer's last GEMM, once its count is known, need not be kept when nothing after it saves a tensor
        # (only a residual add follows): the recompute stops as soon as it has recreated the last saved tensor
        # (torch's early stop), before that GEMM; were it reached, it would be rerun, as any uncached op
        self.last_gemm = layer.gemms_per_forward if getattr(layer, "last_gemm_unused", False) else None


_regions: list[_Region] = []  # the selective checkpoint running now (forward or recompute); never more than one


def _policy(ctx, op, *args, **kwargs):
    """Cache GEMM outputs, except inside attention (which `attend` keeps or reruns whole) and `rerun_gemms`."""
    if op in GEMMS:
        region = _regions[-1]
        if region.in_attention:
            if region.keep_attention:  # the recompute skips attention: its GEMMs would shift the cache's order
                raise RuntimeError(f"--gradient-checkpointing selective: the attention backend runs {op}, which "
                                   f"the kept attention cannot skip in the recompute; use selective-attention")
            return CheckpointPolicy.PREFER_RECOMPUTE
        if region.rerun_gemms:
            return CheckpointPolicy.PREFER_RECOMPUTE
        region.gemms += 1
        if region.gemms == region.last_gemm:
            return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@contextmanager
def _entered(region: _Region, recomputing: bool, sac_context):
    _regions.append(region)
    region.recomputing, region.next = recomputing, 0
    try:
        with sac_context:
            yield
        if not recomputing:
            region.layer.gemms_per_forward = region.gemms
    finally:
        _regions.pop()


def _contexts(layer, keep_attention: bool):
    forward, recompute = create_selective_checkpoint_contexts(_policy)
    region = _Region(layer, keep_attention)
    return _entered(region, False, forward), _entered(region, True, recompute)


def checkpoint_selectively(layer, mode: str, *inputs):
    """One decoder layer under selective recompute (`mode`: selective or selective-attention). A layer whose
    `last_gemm_unused` is true promises that the recompute stops before its last GEMM: no op from that GEMM on saves
    a tensor for the backward."""
    return checkpoint(layer, *inputs, use_reentrant=False,
                      context_fn=partial(_contexts, layer, mode == "selective"))


def in_selective_checkpoint() -> bool:
    """Whether a selective checkpoint is running (its forward or its recompute): its GEMMs' outputs are kept, so no op
    may change one in place."""
    return bool(_regions)


@contextmanager
def rerun_gemms():
    """Inside a selective checkpoint: the GEMMs run in this context are rerun by the recompute rather than kept (for
    cheap GEMMs with large outputs: a LoRA adapter's B on its rank-r product). Nothing to do elsewhere."""
    region = _regions[-1] if _regions else None
    if region is None:
        yield
        return
    was, region.rerun_gemms = region.rerun_gemms, True
    try:
        yield
    finally:
        region.rerun_gemms = was


def _identity(t):
    return t


def attend(attention, *args, **kwargs):
    """Runs `attention(*args, **kwargs)`; inside a selective checkpoint that keeps attention, its saved tensors stay
    out of the checkpoint and the recompute takes its output from the forward instead of rerunning it."""
    region = _regions[-1] if _regions else None
    if region is None:
        return attention(*args, **kwargs)
    if region.keep_attention and region.recomputing:
        out = region.attention_outputs[region.next]
        region.next += 1
        # as the forward's output, it requires grad: the ops after it save the same tensors (o_proj its weight)
        return out.detach().requires_grad_(out.requires_grad)
    region.in_attention = True
    try:
        if not region.keep_attention:
            return attention(*args, **kwargs)
        with torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
            out = attention(*args, **kwargs)
        region.attention_outputs.append(out.detach().requires_grad_(out.requires_grad))
        return out
    finally:
        region.in_attention = False


# ------------------------------------------------------------------------------------------------ auto
class Plan(NamedTuple):
    """How many decoder layers take each mode."""

    none: int
    selective: int
    full: int


def recompute_plan(first_step_peak: float, capacity: float, none_bytes: float, selective_bytes: float | None,
                   layers: int) -> Plan:
    """The least recompute that fits: the fully checkpointed step's peak plus what each layer holds beyond a full
    checkpoint (`none_bytes` plain, `selective_bytes` selective; None: selective not available) within
    MEMORY_BUDGET x capacity (all in bytes). Full layers become selective first, then selective layers plain."""
    room = max(0.0, MEMORY_BUDGET * capacity - first_step_peak)
    if selective_bytes is None or selective_bytes >= none_bytes:  # selective would not save memory
        plain = max(0, min(layers, math.floor(room / max(none_bytes, 1.0))))
        return Plan(plain, 0, layers - plain)
    selective = max(0, min(layers, math.floor(room / max(selective_bytes, 1.0))))
    if selective < layers:
        return Plan(0, selective, layers - selective)
    plain = max(0, min(layers, math.floor((room - layers * selective_bytes) / max(none_bytes - selective_bytes, 1.0))))
    return Plan(plain, layers - plain, 0)


def spread(k: int, indices: list[int]) -> list[int]:
    """k of `indices`, evenly spread (the first always among them)."""
    n = len(indices)
    return [indices[i * n // k] for i in range(k)] if k else []


def layer_modes(plan: Plan) -> dict[int, str]:
    """Decoder layer -> mode for `plan`: the full layers evenly spread over all layers, the selective ones over the
    rest; unlisted layers are not recomputed."""
    layers = list(range(sum(plan)))
    modes = {i: "full" for i in spread(plan.full, layers)}
    modes.update({i: "selective" for i in spread(plan.selective, [i for i in layers if i not in modes])})
    return modes


def activation_bytes(model, tokens: int, device: torch.device, modes=("selective",),
                     probe_tokens: int = 2048) -> dict[str, int]:
    """Memory one decoder layer holds for its backward beyond a fully checkpointed one, for a pack of `tokens`
    tokens, with no recompute ("none") and in each of `modes`: measured on the GPU as the difference between
    forwards with every layer in that mode and every layer fully checkpointed, on one conversation of up to
    `probe_tokens` tokens, scaled to `tokens` (activations grow linearly with the token count: attention keeps no
    T x T matrix)."""
    t = min(tokens, probe_tokens)
    ids = torch.randint(0, model.config.vocab_size, (t,), device=device)
    positions = torch.arange(t, device=device)
    cu = torch.tensor([0, t], dtype=torch.int32, device=device)
    kept, held = dict(model.layer_recompute), {}
    was_training = model.training
    model.train()
    for mode in ("none", "full", *modes):
        model.gradient_checkpointing_enable(0.0 if mode == "none" else 1.0, "full" if mode == "none" else mode)
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        with torch.enable_grad():
            hidden = model.hidden_states(ids, positions, cu, t)
        held[mode] = torch.cuda.memory_allocated(device) - before
        del hidden
    model.layer_recompute = kept
    model.train(was_training)
    layers = len(model.model.layers)
    return {mode: max(0, int((held[mode] - held["full"]) / layers * tokens / t)) for mode in ("none", *modes)}


def _largest_of_all_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each value's maximum over the ranks (the values themselves without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


class AutoRecompute:
    """Checkpoints every layer fully for the first two steps, then the least recompute that fits (logged once).
    `selective`: whether layers may take selective recompute (not with transforms that refuse it)."""

    def __init__(self, model, batch_max_len: int, device: torch.device, selective: bool = True):
        self.model, self.device = model, device
        self.steps_to_measure = 2 if device.type == "cuda" else 0
        if not self.steps_to_measure:
            log("gradient checkpointing auto: no GPU memory to fit, so no layer is recomputed")
            model.gradient_checkpointing_disable()
            return
        self.layer_bytes = activation_bytes(model, batch_max_len, device, ("selective",) if selective else ())
        model.gradient_checkpointing_enable(1.0)
        torch.cuda.reset_peak_memory_stats(device)

    def after_step(self) -> None:
        """After the second step: the least recompute that fits, the same on every rank."""
        if not self.steps_to_measure:
            return
        self.steps_to_measure -= 1
        if self.steps_to_measure:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        selective = self.layer_bytes.get("selective")
        peak, none_bytes, selective = _largest_of_all_ranks(
            [torch.cuda.max_memory_allocated(self.device), self.layer_bytes["none"],
             -1.0 if selective is None else selective], self.device)
        capacity = torch.cuda.get_device_properties(self.device).total_memory
        layers = len(self.model.model.layers)
        plan = recompute_plan(peak, capacity, none_bytes, None if selective < 0 else selective, layers)
        self.model.layer_recompute = layer_modes(plan)
        log(f"gradient checkpointing auto: of {layers} layers {plan.full} fully recomputed, {plan.selective} "
            f"selectively, {plan.none} not at all (fully checkpointed step's peak {peak / 2**30:.1f} GiB of "
            f"{capacity / 2**30:.1f} GiB; one layer holds {none_bytes / 2**30:.2f} GiB per pack more without "
            f"recompute" + ("" if selective < 0 else f", {selective / 2**30:.2f} GiB selective") + ")")
