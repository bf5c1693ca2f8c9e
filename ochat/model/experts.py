"""Mixture-of-experts blocks on the packed token stream: router, dropless experts, the load-balancing loss.

A block (`ExpertBlock`, in place of a decoder layer's MLP, where `ModelConfig.layer_has_experts` says so):
- Router (`mlp.gate.weight` [E, H]): logits and softmax in float32, top-k experts per token (`torch.topk` on the
  probabilities, as transformers does, so tied scores pick the same experts), the k weights renormalised to sum 1
  where the family does it (`ModelConfig.normalizes_topk`).
- Experts, stacked as transformers v5 holds them: `gate_up_proj` [E, 2I, H] (gate rows, then up rows) and
  `down_proj` [E, H, I]. The (token, expert) pairs are sorted by expert once; each expert's rows are contiguous,
  so one grouped GEMM (`torch._grouped_mm`) computes every gate/up projection and one every down projection.
  Dropless: no token is dropped, nothing is padded to a capacity. Each row is scaled by its routing weight and
  added back to its token (`index_add_`). `expert_loop` is the plain reference (one matmul per expert), used
  where grouped GEMMs cannot run. With LoRA (ochat.model.lora) each projection may carry per-expert rank-r adapters,
  their product added to its output (two thin grouped GEMMs more): W_e x + s B_e (A_e x).
- Qwen2-MoE: a shared expert (a dense MLP) on every token, scaled by sigmoid(shared_expert_gate(x)).
- gpt-oss: the router has a bias and takes the softmax over the k selected logits (the renormalised top-k
  probabilities: the same numbers); every expert projection has a bias (`gate_up_proj_bias` [E, 2I],
  `down_proj_bias` [E, H]); the experts' activation is the clamped SwiGLU `clamped_swiglu`.
- Checkpoints keep the Hub's per-expert names (`mlp.experts.{e}.gate_proj.weight`, Mixtral's
  `block_sparse_moe.experts.{e}.w1.weight`, ...): `to_checkpoint` splits a stacked parameter into them,
  `checkpoint_names` / `from_checkpoint` stack them back (hf_weights applies both). gpt-oss checkpoints hold
  transformers' own stacked tensors instead (`ExpertLayout.fused`): `mlp.experts.gate_up_proj` [E, H, 2I] with gate
  and up columns interleaved (gate, up, gate, up, ...), `down_proj` [E, I, H], the biases alike, the router as
  `mlp.router.weight` / `.bias`; the same three functions transpose and (de-)interleave them, exactly.

Load-balancing loss (transformers' `load_balancing_loss_func`, Switch Transformer): over the tokens of one forward
and every expert layer together, f_e = (top-k assignments to expert e) / (layers x tokens), P_e = (sum of expert
e's router probability) / (layers x tokens), aux = E * sum_e f_e P_e. Only P carries a gradient.

How it joins ochat's exact loss: transformers computes aux over one forward's batch (the tokens of its attention
mask); ochat computes it per pack, over the pack's real tokens (a pack of filler tokens alone counts none), and
the step's auxiliary term is the token-weighted mean over all the step's packs (every micro-step, every rank),
times `router_aux_loss_coef`:

    loss = sum(w * CE) / sum(w) + coef * sum_packs(n_p * aux_p) / sum_packs(n_p)

The model returns `coef * n_p * aux_p` (`LossSums.aux_loss`, a sum like `weighted_loss`), so the training step
divides it by the step's token count N just as it divides the weighted CE by W (`ochat.training.loss`). For a step
that is one pack this is transformers' loss on that batch. A pack sliced over a sequence-parallel group: each rank
returns its share, from the pack's f and n_p and its own slice's P (`load_balancing_loss` with `counts`), the shares
adding up to the pack's term. The router z-loss is not computed: none of these
families defines one in transformers. The router runs in float32 whatever the model's dtype (transformers' gpt-oss
router runs in the model's dtype; in float32 the two agree).
"""
from __future__ import annotations

import functools
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from ochat.kernels.swiglu import glu
from ochat.model import qlora
from ochat.model.config import ModelConfig
from ochat.model.recompute import rerun_gemms


class Router(nn.Module):
    """Top-k routing: float32 probabilities [T, E], the top-k weights [T, k] (float32) and experts [T, k]."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c.num_experts, c.hidden_size))
        self.bias = nn.Parameter(torch.zeros(c.num_experts)) if c.arch.experts.biases else None
        self.top_k = c.num_experts_per_tok
        self.normalize = c.normalizes_topk

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bias = None if self.bias is None else self.bias.float()
        probs = torch.softmax(F.linear(x.float(), self.weight.float(), bias), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights, experts


def grouped_mm_runs(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether ochat runs `torch._grouped_mm` on these operands: torch has it, every row is 16-byte aligned, and the
    device is a CPU (float32, bfloat16 and float16 measured in torch 2.13) or, in bfloat16, a CUDA GPU of compute
    capability 9.0 or newer (its CUTLASS kernels); the per-expert loop elsewhere."""
    if not hasattr(torch, "_grouped_mm") or x.device.type not in ("cpu", "cuda"):
        return False
    if x.device.type == "cuda" and (x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0)):
        return False
    return all(t.shape[-1] * t.element_size() % 16 == 0 for t in (x,) + weights)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's expert activation, as transformers computes it: gate clamped above at `limit`, up to [-limit, limit],
    then `gate * sigmoid(alpha * gate) * (up + 1)`."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(gate * alpha) * (up + 1)


def _activate(gate: torch.Tensor, up: torch.Tensor, act) -> torch.Tensor:
    """`act`: an activation name of `glu`, or a function (gate, up) -> output."""
    return act(gate, up) if callable(act) else glu(gate, up, act)


def _plus_bias(h: torch.Tensor, bias: torch.Tensor | None, counts: torch.Tensor) -> torch.Tensor:
    """h [rows, N] (rows sorted by expert) + each row's expert's bias [E, N]; no host read. Added in float32, so that
    the bias's gradient, a sum over its expert's rows, accumulates in float32 (in bf16 a sum over thousands of rows
    was 3% off on an H200)."""
    if bias is None:
        return h
    return (h.float() + bias.float().repeat_interleave(counts, dim=0, output_size=h.shape[0])).to(h.dtype)


# LoRA adapters of the stacked experts (ochat.model.lora): projection name -> (A [E, r, in], B [E, out, r], scale),
# each expert's projection becoming W_e + scale B_e A_e
Adapters = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Each expert's rows of x [rows, in] (sorted by expert, expert e's ending at offsets[e]) times its weight
    [E, out, in] transposed: one grouped GEMM."""
    return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)


def _looped_linear(x: torch.Tensor, weight: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """As `_grouped_linear`, expert e's rows being the next sizes[e]: one matmul per expert."""
    return torch.cat([F.linear(rows, weight[e]) for e, rows in enumerate(x.split(sizes))])


def _run_experts(x, counts, gate_up, down, act, gate_up_bias, down_bias, adapters, linear) -> torch.Tensor:
    """The experts on rows sorted by expert, each projection's per-expert matmuls done by `linear` (x, [E, out, in]):
    W_e x, plus each row's expert's bias (gpt-oss), plus s B_e (A_e x) where a LoRA adapter is. A frozen NF4 stack
    (--qlora) is dequantised for its matmul alone (`qlora.stacked_linear`)."""
    adapters = adapters or {}

    def project(rows, weight, bias, name):
        base = qlora.stacked_linear(rows, weight, len(counts), linear) if qlora.is_nf4(weight) else linear(rows, weight)
        out = _plus_bias(base, bias, counts)
        if name in adapters:
            a, b, scale = adapters[name]
            low = linear(rows, a)
            with rerun_gemms():  # B's rank-r GEMM: rerun by a selective recompute, not kept (recompute.py)
                out = out + linear(low, b) * scale
        return out

    gate_up_out = project(x, gate_up, gate_up_bias, "gate_up_proj")
    h = _activate(*gate_up_out.chunk(2, dim=-1), act).contiguous()
    return project(h, down, down_bias, "down_proj")


def expert_grouped(x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                   act, gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                   adapters: Adapters | None = None) -> torch.Tensor:
    """The experts on rows sorted by expert (`counts[e]` rows for expert e, in order): two grouped GEMMs (plus each
    row's expert's bias, gpt-oss; two more thin ones per projection with a LoRA adapter)."""
    linear = functools.partial(_grouped_linear, offsets=counts.cumsum(0).to(torch.int32))
    return _run_experts(x, counts, gate_up, down, act, gate_up_bias, down_bias, adapters, linear)


def expert_loop(x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                act, gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                adapters: Adapters | None = None) -> torch.Tensor:
    """The reference of `expert_grouped`: one matmul per expert and projection (reads `counts` on the host)."""
    linear = functools.partial(_looped_linear, sizes=counts.tolist())
    return _run_experts(x, counts, gate_up, down, act, gate_up_bias, down_bias, adapters, linear)


def assignments(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many (token, slot) pairs of the top-k choices `experts` [T, k] go to each expert: [num_experts] int64."""
    return torch.bincount(experts.reshape(-1), minlength=num_experts)


IMPLEMENTATIONS = ("auto", "grouped", "loop")


class Experts(nn.Module):
    """E stacked SwiGLU experts (gpt-oss: with biases and the clamped SwiGLU); `impl`: grouped GEMMs, the per-expert
    loop, or auto (grouped where it runs)."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        e, h, i = c.num_experts, c.hidden_size, c.expert_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))  # gate rows, then up rows
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        if c.arch.experts.biases:
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(e, 2 * i))
            self.down_proj_bias = nn.Parameter(torch.zeros(e, h))
        self.num_experts = e  # the layer's experts, also where expert parallelism holds only some of them
        self.act = c.hidden_act
        if c.arch.experts.act == "clamped_swiglu":
            self.act = functools.partial(clamped_swiglu, alpha=c.swiglu_alpha, limit=c.swiglu_limit)
        self.impl = "auto"

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                counts: torch.Tensor, adapters: Adapters | None = None) -> torch.Tensor:
        """x [T, H], routing weights and experts [T, k], `counts` [E] the (token, slot) pairs of each expert (what
        `assignments` gives) -> the weighted sum of each token's experts [T, H]. `adapters`: LoRA's, if any."""
        k = experts.shape[1]
        order = experts.reshape(-1).argsort(stable=True)  # (token, slot) pairs by expert, tokens in order within each
        token = order // k
        y = self.run_sorted(x[token], counts, adapters)
        y = y * weights.reshape(-1)[order, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))

    def run_sorted(self, rows: torch.Tensor, counts: torch.Tensor, adapters: Adapters | None = None) -> torch.Tensor:
        """The experts on rows sorted by expert (`counts[e]` rows for expert e): grouped GEMMs or the loop."""
        factors = [t for a, b, _ in (adapters or {}).values() for t in (a, b)]
        grouped = self.impl == "grouped" or (self.impl == "auto" and grouped_mm_runs(rows, self.gate_up_proj,
                                                                                         self.down_proj, *factors))
        run = expert_grouped if grouped else expert_loop
        return run(rows, counts, self.gate_up_proj, self.down_proj, self.act, getattr(self, "gate_up_proj_bias", None),
                   getattr(self, "down_proj_bias", None), adapters)


class SharedExpert(nn.Module):
    """Qwen2-MoE's shared expert: a SwiGLU MLP on every token (`shared_expert.{gate,up,down}_proj`)."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        h, i = c.hidden_size, c.shared_expert_intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.act = c.hidden_act

    def forward(self, x):
        return self.down_proj(glu(self.gate_proj(x), self.up_proj(x), self.act))


class ExpertBlock(nn.Module):
    """A decoder layer's mixture of experts: x [T, H] -> (output [T, H], routing sums [2, E]).

    The routing sums of the block's tokens: row 0 the top-k assignments per expert (no gradient), row 1 the
    router probabilities summed per expert (float32, with gradient): what the load-balancing loss and the
    router statistics need, summed over the layers by the model."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate = Router(c)
        self.experts = Experts(c)
        if c.shared_expert_intermediate_size:
            self.shared_expert = SharedExpert(c)
            self.shared_expert_gate = nn.Linear(c.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs, weights, experts = self.gate(x)
        counts = assignments(experts, probs.shape[1])
        out = self.experts(x, weights, experts, counts)
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out, torch.stack([counts.to(probs.dtype), probs.sum(0)])


def load_balancing_loss(sums: torch.Tensor, tokens: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' load-balancing loss from the routing sums of every expert layer [L, 2, E] over `tokens`
    tokens: E * sum_e f_e P_e (module docstring); 0 for no tokens. `counts` [L, E]: the whole pack's assignments
    when `sums` are one slice's (sequence parallelism) and `tokens` the pack's; then it is the slice's share, the
    shares (and their gradients) adding up to the pack's loss, which is linear in P."""
    layers, _, e = sums.shape
    if tokens == 0:
        return sums[:, 1].sum() * 0.0
    f = (sums[:, 0] if counts is None else counts).sum(0) / (layers * tokens)
    p = sums[:, 1].sum(0) / (layers * tokens)
    return e * (f.detach() * p).sum()


# ---------------------------------------------------------------- checkpoint names
_STACKED = re.compile(r"^(model\.layers\.\d+\.)mlp\.(?:experts\.(gate_up_proj|down_proj)(_bias)?|gate\.(weight|bias))$")


def _block(name: str, c: ModelConfig):
    """(layer prefix, what, part) of a parameter of an expert block that checkpoints store differently, else None:
    what is "gate_up_proj", "down_proj" or "router", part "weight" or "bias"."""
    m = _STACKED.match(name) if c.arch.experts is not None else None
    if m is None:
        return None
    prefix, proj, bias, router_part = m.groups()
    return (prefix, "router", router_part) if proj is None else (prefix, proj, "bias" if bias else "weight")


def checkpoint_names(name: str, c: ModelConfig) -> list[str]:
    """The checkpoint tensors a parameter is made of (the Hub's per-expert names for stacked experts, gate rows and
    up rows of each expert in turn for gate_up_proj; for fused layouts (gpt-oss) one tensor; the parameter's own name
    for everything else)."""
    where = _block(name, c)
    if where is None:
        return [name]
    prefix, what, part = where
    layout = c.arch.experts
    base = f"{prefix}{layout.block}."
    if what == "router":
        return [f"{base}{layout.router}.{part}"]
    if layout.fused:
        return [f"{base}experts.{what}{'_bias' if part == 'bias' else ''}"]
    gate, up, down = layout.projections
    parts = (gate, up) if what == "gate_up_proj" else (down,)
    return [f"{base}experts.{e}.{p}.{part}" for e in range(c.num_experts) for p in parts]


def deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Along `dim`: gate, up, gate, up, ... -> all gate entries, then all up entries (one copy)."""
    d = dim % t.dim()
    return t.unflatten(d, (-1, 2)).movedim(d + 1, d).flatten(d, d + 1)


def interleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of `deinterleave`."""
    d = dim % t.dim()
    return t.unflatten(d, (2, -1)).movedim(d, d + 1).flatten(d, d + 1)


def from_checkpoint(name: str, tensors: list[torch.Tensor], c: ModelConfig) -> torch.Tensor:
    """The parameter `name` from its checkpoint tensors, in `checkpoint_names` order (of a fused layout, experts
    may be any slice of the first dimension)."""
    where = _block(name, c)
    if where is None or where[1] == "router":
        return tensors[0]
    _, what, part = where
    if c.arch.experts.fused:  # transformers' gpt-oss: [E, H, 2I] interleaved, [E, I, H]; biases [E, 2I], [E, H]
        t = tensors[0] if part == "bias" else tensors[0].transpose(1, 2)  # ochat's dimensions (a view): one copy
        return deinterleave(t, 1) if what == "gate_up_proj" else t.contiguous()
    if what == "gate_up_proj":
        tensors = [torch.cat(tensors[i:i + 2]) for i in range(0, len(tensors), 2)]
    return torch.stack(tensors)


def to_checkpoint(name: str, tensor: torch.Tensor, c: ModelConfig) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one parameter (the inverse of `from_checkpoint`), each contiguous."""
    names = checkpoint_names(name, c)
    where = _block(name, c)
    if where is None or where[1] == "router":
        return {names[0]: tensor}
    _, what, part = where
    if c.arch.experts.fused:
        t = interleave(tensor, 1) if what == "gate_up_proj" else tensor
        return {names[0]: (t if part == "bias" else t.transpose(1, 2)).contiguous()}
    per_expert = tensor.unbind(0)
    if what == "gate_up_proj":
        per_expert = [half for t in per_expert for half in t.chunk(2)]
    return {n: t.contiguous() for n, t in zip(names, per_expert)}
