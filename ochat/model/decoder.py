"""PackedCausalLM: a padding-free decoder (Llama 2/3, Mistral, Qwen2/3, Gemma 2/3, Phi-3/4, OLMo 2, and the
mixture-of-experts Mixtral, OLMoE, Qwen2/3-MoE, gpt-oss) on packed tokens.

Architecture (parameter names identical to Hugging Face, so state dicts map 1:1; what differs between the
families is `ModelConfig.arch`, see model_config.py):
- embed_tokens (Gemma: x sqrt(hidden_size)) -> N x DecoderLayer -> RMSNorm -> lm_head (tied to embed_tokens or
  not; Gemma 2: final logits soft-capped, c * tanh(logits / c)).
- DecoderLayer: `x + out_norm(attention(in_norm(x)))`, then the same with the MLP; each family has its own
  norms: Llama-style pre-norms only, Gemma's pre- and post-norms, OLMo 2's post-norms only. RMSNorm scales by
  `w` (Gemma: `1 + w`), in the family's cast order.
- Attention: GQA; q/k/v projections (Phi-3: one fused qkv_proj) with optional biases; optional q/k RMSNorm
  per head (Qwen3, Gemma 3) or over the whole projection (OLMo 2); RoPE from position_ids (per layer: Gemma 3's
  sliding layers have their own base; Phi-3's LongRoPE takes its short or long factors per conversation, from
  that conversation's length, as transformers does for each sequence alone; partial rotary for Phi-4-mini; YaRN
  for gpt-oss); varlen causal attention over cu_seqlens with the layer's sliding window, the softmax scale (Gemma's
  query_pre_attn_scalar), attention-logit soft-capping (Gemma 2) and gpt-oss's learned sinks (`self_attn.sinks`, one
  logit per head in every softmax denominator).
- MLP: `down(act(gate) * up)`, SwiGLU or Gemma's GeGLU (tanh GELU); Phi-3: one fused gate_up_proj. Mixture-of-experts
  families (Mixtral, OLMoE, Qwen2/3-MoE, gpt-oss) have an `ExpertBlock` (experts.py) in place of the MLP in the layers
  `ModelConfig.layer_has_experts` names; with labels the forward also returns the load-balancing loss
  (`LossSums.aux_loss`, see experts.py for how it joins the step's loss) and the tokens routed to each expert.
- Inputs are flat: input_ids [T], position_ids [T] (restart at 0 per conversation), cu_seqlens int32
  [B+1], max_seqlen. No padding and no attention across conversation boundaries.
- With labels/label_weights (already shifted) the forward returns LossSums from the fused, chunked
  linear cross-entropy: the full [T, V] logits are never held. The loss runs inside `lm_head.forward`
  so DeepSpeed ZeRO-3 gathers the lm_head weight (the tied weight too: it is a parameter of lm_head).
- Gradient checkpointing per decoder layer, non-reentrant (`torch.utils.checkpoint`, use_reentrant=False),
  of all layers or of an evenly spread fraction of them, each layer fully or selectively (its GEMM outputs kept,
  the norms, RoPE and GLU recomputed: recompute.py). Optionally each decoder layer is compiled
  (`compile_layers`, torch.compile).
- Dropout is not applied (the supported checkpoints train with 0); every embedding row that occurs gets a
  gradient (transformers' `padding_idx` freezes the pad token's row).
- Under LoRA, rows of the frozen embedding and lm_head may be trained in their place (`token_adapter` on both,
  one module when they are tied: ochat.model.lora.TokenRows): the embedding substitutes them in its output, and
  lm_head hands them to the loss (and the logits) as the weight's replaced rows.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ochat.kernels.attention import resolve_backend, varlen_attention
from ochat.kernels.linear_cross_entropy import replace_rows, soft_cap, weighted_linear_cross_entropy
from ochat.kernels.rms_norm import rms_norm
from ochat.kernels.rope import apply_rotary
from ochat.kernels.swiglu import glu
from ochat.model import hf_weights
from ochat.model.recompute import MODES, attend, checkpoint_selectively, spread
from ochat.model.config import ModelConfig, Rotary
from ochat.model.experts import ExpertBlock, Experts, Router, load_balancing_loss


def _yarn_factor(rotary: Rotary) -> float:
    """YaRN's context factor (config.json's, else max_position_embeddings / the original context)."""
    rs = rotary.scaling_dict
    factor = rs.get("factor")
    return rotary.max_position_embeddings / rs["original_max_position_embeddings"] if factor is None else factor


def yarn_inv_freq(rotary: Rotary, device=None) -> torch.Tensor:
    """YaRN (transformers' `_compute_yarn_parameters`): each frequency blends its interpolated value (divided by the
    factor) and its original one, by a linear ramp over the dimensions between the ones that turn beta_fast and
    beta_slow times over the original context (the ramp's ends floored / ceiled unless `truncate` is false)."""
    rs, d = rotary.scaling_dict, rotary.dim
    factor, old = _yarn_factor(rotary), rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations):
        return d * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(rotary.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    pos = rotary.theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float) / d)
    extrapolation = 1 - ramp
    return (1.0 / (factor * pos)) * (1 - extrapolation) + (1.0 / pos) * extrapolation


def rope_inv_freq(rotary: Rotary, device=None, long: bool = False) -> torch.Tensor:
    """Inverse RoPE frequencies [dim/2] in float32, with linear, Llama 3 ("llama3"), LongRoPE or YaRN scaling applied
    (LongRoPE: the short factors, or the long ones with `long=True`)."""
    d = rotary.dim
    base = rotary.theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d)
    rs = rotary.scaling_dict
    if rs is not None and rs["rope_type"] == "longrope":
        factors = torch.tensor(rs["long_factor" if long else "short_factor"], dtype=torch.float32, device=device)
        return 1.0 / (factors * base)
    if rs is not None and rs["rope_type"] == "yarn":
        return yarn_inv_freq(rotary, device)
    inv = 1.0 / base
    if rs is None:
        return inv
    if rs["rope_type"] == "linear":
        return inv / rs["factor"]
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / lo, old / hi
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _recompute_in_backward(layer, *inputs):
    """torch's non-reentrant activation checkpoint of one decoder layer."""
    return checkpoint(layer, *inputs, use_reentrant=False)


def _attend(attention, *args, **kwargs):
    """Runs `attention` (kept rather than recomputed by a selective checkpoint: recompute.attend). A compiled
    decoder layer calls it through torch.compiler.disable (`compile_layers`): FlashAttention kernels (and the
    sequence-parallel all-to-all) are opaque to the compiler, so the compiled graph stops before attention and
    resumes after it."""
    return attend(attention, *args, **kwargs)


def rope_attention_factor(rotary: Rotary) -> float:
    """What cos and sin are multiplied by: LongRoPE's sqrt(1 + ln(factor) / ln(original context)), YaRN's
    0.1 ln(factor) + 1 (with mscale / mscale_all_dim their ratio), config.json's attention_factor where given, else 1."""
    rs = rotary.scaling_dict
    if rs is not None and rs["rope_type"] == "yarn":
        if rs.get("attention_factor") is not None:
            return rs["attention_factor"]

        def mscale(factor, m=1.0):
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

        factor = _yarn_factor(rotary)
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            return float(mscale(factor, rs["mscale"]) / mscale(factor, rs["mscale_all_dim"]))
        return mscale(factor)
    if rs is None or rs["rope_type"] != "longrope":
        return 1.0
    if rs.get("attention_factor") is not None:
        return rs["attention_factor"]
    old = rs["original_max_position_embeddings"]
    factor = rs.get("factor")
    if factor is None:
        factor = rotary.max_position_embeddings / old
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))


class RMSNorm(nn.Module):
    """RMSNorm in the architecture's style (`ModelConfig.arch`: weight offset and cast order)."""

    def __init__(self, size: int, c: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = c.rms_norm_eps
        self.offset = c.arch.norm_offset
        self.scale_in_float32 = c.arch.norm_scale_in_float32

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps, self.offset, self.scale_in_float32)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        arch = c.arch
        self.hq, self.hkv, self.d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        qkv_bias = arch.qkv_bias or c.attention_bias
        self.fused = arch.fused_projections
        if self.fused:
            self.qkv_proj = nn.Linear(c.hidden_size, (self.hq + 2 * self.hkv) * self.d, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(c.hidden_size, self.hq * self.d, bias=qkv_bias)
            self.k_proj = nn.Linear(c.hidden_size, self.hkv * self.d, bias=qkv_bias)
            self.v_proj = nn.Linear(c.hidden_size, self.hkv * self.d, bias=qkv_bias)
        self.o_proj = nn.Linear(self.hq * self.d, c.hidden_size, bias=c.attention_bias)
        self.qk_norm = arch.qk_norm
        if arch.qk_norm is not None:
            per_head = arch.qk_norm == "head"
            self.q_norm = RMSNorm(self.d if per_head else self.hq * self.d, c)
            self.k_norm = RMSNorm(self.d if per_head else self.hkv * self.d, c)
        if arch.attention_sinks:  # gpt-oss: one learned logit per head in every softmax denominator
            self.sinks = nn.Parameter(torch.zeros(self.hq))
        self.window = c.layer_window(layer)
        # the variants this model has (softmax scale, soft-capping) and nothing else: a Llama's call stays the plain one
        self.variant = {k: v for k, v in (("scale", c.attention_scale), ("softcap", c.attn_logit_softcapping))
                        if v is not None}
        self.attention_hook = None  # replaces varlen_attention when set (sequence parallelism routes it over ranks)
        self.attend = _attend  # how attention is called: outside the graph once the layer is compiled

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, backend):
        t = x.shape[0]
        if self.fused:
            q, k, v = self.qkv_proj(x).split((self.hq * self.d, self.hkv * self.d, self.hkv * self.d), dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(t, self.hq, self.d)  # [T, Hq, D]
        k = k.view(t, self.hkv, self.d)  # [T, Hkv, D]
        v = v.view(t, self.hkv, self.d)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, k, cos, sin)
        sinks = {"sinks": self.sinks} if hasattr(self, "sinks") else {}
        o = self.attend(self.attention_hook or varlen_attention, q, k, v, cu_seqlens, max_seqlen, window=self.window,
                    backend=backend, **self.variant, **sinks)
        return self.o_proj(o.reshape(t, self.hq * self.d))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.fused = c.arch.fused_projections
        if self.fused:
            self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=c.mlp_bias)
        else:
            self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
            self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.act = c.hidden_act

    def forward(self, x):
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(glu(gate, up, self.act))


class DecoderLayer(nn.Module):
    """Attention and an MLP or, where the config says so, an expert block; the latter's layer returns
    (x, routing sums [2, E])."""

    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(c, layer)
        self.has_experts = c.layer_has_experts(layer)
        self.mlp = ExpertBlock(c) if self.has_experts else MLP(c)
        self.norm_of_role = dict(c.arch.norms)  # attn_in / attn_out / mlp_in / mlp_out -> Hugging Face module name
        for name in self.norm_of_role.values():
            setattr(self, name, RMSNorm(c.hidden_size, c))
        self.gemms_per_forward = None  # counted by the first selective checkpoint

    @property
    def last_gemm_unused(self) -> bool:
        """Whether a selective checkpoint need not keep the down projection's output: only the residual add follows
        it, and it is a plain linear layer, whose GEMM the recompute stops before (the GEMM saves its input first).
        LoRA's and QLoRA's layers are autograd Functions, which save theirs after their GEMMs."""
        return not self.has_experts and "mlp_out" not in self.norm_of_role and type(self.mlp.down_proj) is nn.Linear

    def _norm(self, role, x):
        name = self.norm_of_role.get(role)
        return x if name is None else getattr(self, name)(x)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, backend):
        x = x + self._norm("attn_out", self.self_attn(self._norm("attn_in", x), cos, sin, cu_seqlens, max_seqlen,
                                                      backend))
        if self.has_experts:
            y, routing = self.mlp(self._norm("mlp_in", x))
            return x + self._norm("mlp_out", y), routing
        return x + self._norm("mlp_out", self.mlp(self._norm("mlp_in", x)))


class Embedding(nn.Embedding):
    """The token embedding; with trained rows (`token_adapter`, LoRA's trainable tokens) those rows in place of the
    frozen ones."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__(vocab_size, hidden_size)
        self.token_adapter = None  # ochat.model.lora.TokenRows when set

    def forward(self, input_ids):
        x = super().forward(input_ids)
        return x if self.token_adapter is None else self.token_adapter.substitute(input_ids, x)


class Backbone(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c)


class LMHead(nn.Module):
    """The output projection; computes logits (soft-capped for Gemma 2) or (inside its own forward, for ZeRO-3)
    the loss sums."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c.vocab_size, c.hidden_size))
        self.softcap = c.final_logit_softcapping
        self.token_adapter = None  # trained rows of the weight (LoRA's trainable tokens: ochat.model.lora.TokenRows)

    def forward(self, hidden, labels=None, label_weights=None):
        rows = None if self.token_adapter is None else self.token_adapter.rows
        if labels is None:
            return soft_cap(hidden @ replace_rows(self.weight, rows).t(), self.softcap)
        return weighted_linear_cross_entropy(hidden, self.weight, labels, label_weights, softcap=self.softcap,
                                             rows=rows)


class PackedCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, attn_impl: str = "auto"):
        super().__init__()
        self.config = config
        self.attn_impl = attn_impl
        self.model = Backbone(config)
        self.lm_head = LMHead(config)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.router_aux_loss_coef = config.router_aux_loss_coef  # expert models; --router-aux-loss-coef overrides
        self.sequence_group = None  # the ranks sharing each pack, each holding a slice (sequence_parallel.enable)
        self.layer_recompute: dict[int, str] = {}  # decoder layer -> recompute.MODES; absent: not recomputed
        self.checkpoint_fn = _recompute_in_backward  # (layer, *inputs) -> outputs; offload swaps in DeepSpeed's
        self._layer_rotary = [config.layer_rotary(i) for i in range(config.num_hidden_layers)]
        self._inv_freq: dict[tuple[torch.device, Rotary], tuple] = {}
        self._attn_backend: dict[torch.device, str] = {}  # attn_impl resolved once per device
        if self.lm_head.weight.device.type != "meta":
            self.reset_parameters()

    # ---------------------------------------------------------------- init
    def reset_parameters(self, std: float = 0.02):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, Router, Experts)):
                for n, p in m.named_parameters(recurse=False):
                    if n == "bias" or n.endswith("_bias"):
                        nn.init.zeros_(p)
                    elif p.dim() > 1:
                        nn.init.normal_(p, std=std)
            elif isinstance(m, Attention) and hasattr(m, "sinks"):
                nn.init.zeros_(m.sinks)
            elif isinstance(m, RMSNorm):
                nn.init.constant_(m.weight, 1.0 - m.offset)  # the identity scale
        if not self.config.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)

    @property
    def checkpointed_layers(self) -> frozenset[int]:
        """The decoder layers recomputed in the backward, in any mode."""
        return frozenset(self.layer_recompute)

    def gradient_checkpointing_enable(self, fraction: float = 1.0, mode: str = "full"):
        """Recompute the activations of `fraction` of the decoder layers (evenly spread) in the backward.

        1.0 checkpoints every layer (least memory, about a third more compute); a fraction between
        trades the memory left on the GPU for speed (0.5: every other layer). `mode` (recompute.MODES): full
        keeps only each layer's input; selective keeps its GEMM outputs and attention and recomputes the
        norms, RoPE and GLU; selective-attention recomputes attention too.
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"gradient checkpointing fraction must be in [0, 1], got {fraction}")
        if mode not in MODES:
            raise ValueError(f"gradient checkpointing mode must be one of {', '.join(MODES)}, got {mode!r}")
        n = len(self.model.layers)
        self.layer_recompute = {i: mode for i in spread(round(fraction * n), list(range(n)))}

    def gradient_checkpointing_disable(self):
        self.layer_recompute = {}

    def compile_layers(self) -> None:
        """Compile each decoder layer's forward (and, through it, backward) with torch.compile.

        The token count is dynamic, so packs of any size reuse one compiled graph, and the layers share it. Inside,
        the norms, RoPE and the GLU are their PyTorch definitions, which the compiler fuses with the residual adds
        and with float8 casts (`--fp8`); attention runs its own kernel between two compiled pieces. So does an
        expert block, uncompiled as a whole: torch._grouped_mm's shape function (what the compiler traces) takes bf16
        only, though its CPU kernel takes float32 too; the per-expert loop reads the tokens per expert on the host, as
        expert parallelism's all-to-alls read their splits (eager, they make the same exchanges on every rank); and
        with only the experts left out, the router and the sort around them split the layer into more graphs to
        compile (9 against 5 in a two-layer Mixtral, twice the compile time on a CPU). Recompute (gradient
        checkpointing) reruns the compiled forward."""
        attend_outside_graph = torch.compiler.disable(_attend)  # made here: it imports the compiler (seconds)
        for layer in self.model.layers:
            layer.self_attn.attend = attend_outside_graph
            if layer.has_experts:  # see the docstring
                layer.mlp.forward = torch.compiler.disable(layer.mlp.forward)
            layer.forward = torch.compile(layer.forward, dynamic=True)

    # ---------------------------------------------------------------- forward
    def _rope(self, rotary: Rotary, position_ids, cu_seqlens, dtype):
        """cos, sin [T, rotary dim] of one rotary embedding for the packed tokens."""
        dev = position_ids.device
        if (dev, rotary) not in self._inv_freq:
            long = rotary.scaling_dict is not None and rotary.scaling_dict["rope_type"] == "longrope"
            self._inv_freq[dev, rotary] = (rope_inv_freq(rotary, dev), rope_inv_freq(rotary, dev, long=True) if long
                                           else None, rope_attention_factor(rotary))
        inv, inv_long, factor = self._inv_freq[dev, rotary]
        if inv_long is not None:  # LongRoPE: a conversation longer than the original context takes the long factors
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            conversation = torch.searchsorted(cu_seqlens[1:], torch.arange(len(position_ids), device=dev,
                                                                           dtype=cu_seqlens.dtype), right=True)
            is_long = lengths[conversation] > rotary.scaling_dict["original_max_position_embeddings"]
            inv = torch.where(is_long[:, None], inv_long[None, :], inv[None, :])
        freqs = position_ids.float()[:, None] * inv  # [T, D/2], float32
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if factor != 1.0:
            cos, sin = cos * factor, sin * factor
        return cos.to(dtype), sin.to(dtype)

    def _backend(self, device) -> str:
        """attn_impl resolved once per device, for this model's attention variant."""
        if device not in self._attn_backend:
            c = self.config
            self._attn_backend[device] = resolve_backend(
                self.attn_impl, device, softcap=c.attn_logit_softcapping is not None,
                window=c.sliding_window is not None, scale=c.attention_scale is not None,
                sinks=c.arch.attention_sinks)
        return self._attn_backend[device]

    def hidden_states(self, input_ids, position_ids, cu_seqlens, max_seqlen):
        """Final-normed hidden states [T, H]."""
        return self._run_layers(input_ids, position_ids, cu_seqlens, max_seqlen)[0]

    def _run_layers(self, input_ids, position_ids, cu_seqlens, max_seqlen):
        """Final-normed hidden states [T, H] and the expert layers' routing sums [layers with experts, 2, E] (None
        for a dense model)."""
        x = self.model.embed_tokens(input_ids)
        if self.config.arch.embed_scale:  # sqrt(hidden) as a float32 tensor cast to the embedding dtype, as Gemma does
            x = x * torch.tensor(self.config.hidden_size ** 0.5).to(x.dtype)
        backend = self._backend(x.device)
        cu_seqlens = cu_seqlens.to(torch.int32)
        max_seqlen = int(max_seqlen)
        ropes = {r: self._rope(r, position_ids, cu_seqlens, x.dtype) for r in dict.fromkeys(self._layer_rotary)}
        recompute = self.training and torch.is_grad_enabled()
        routing = []
        for i, layer in enumerate(self.model.layers):
            cos, sin = ropes[self._layer_rotary[i]]
            mode = self.layer_recompute.get(i) if recompute else None
            if mode == "full":
                x = self.checkpoint_fn(layer, x, cos, sin, cu_seqlens, max_seqlen, backend)
            elif mode is not None:
                x = checkpoint_selectively(layer, mode, x, cos, sin, cu_seqlens, max_seqlen, backend)
            else:
                x = layer(x, cos, sin, cu_seqlens, max_seqlen, backend)
            if layer.has_experts:
                x, sums = x
                routing.append(sums)
        return self.model.norm(x), torch.stack(routing) if routing else None

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen, labels=None, label_weights=None,
                target_index=None, real_tokens=None):
        """Logits [T, V], or LossSums when labels and label_weights (shifted: row t predicts labels[t]) are given.

        target_index (optional, int64 [N], from the collate): only those rows go through lm_head/loss.
        real_tokens (optional, from the collate): the pack's tokens that are not filler (default: all); an expert
        model's `aux_loss` is `router_aux_loss_coef` x real_tokens x the pack's load-balancing loss (None when the
        coefficient is 0), and its `expert_tokens` [layers with experts, E] the tokens routed to each expert.
        """
        h, routing = self._run_layers(input_ids, position_ids, cu_seqlens, max_seqlen)
        if labels is None:
            return self.lm_head(h)
        if label_weights is None:
            label_weights = (labels >= 0).float()
        if target_index is not None:
            h, labels, label_weights = h[target_index], labels[target_index], label_weights[target_index]
        sums = self.lm_head(h, labels, label_weights)
        if routing is None:
            return sums
        n = len(input_ids) if real_tokens is None else int(real_tokens)
        coef = self.router_aux_loss_coef
        aux = coef * self._load_balancing(routing, len(input_ids), n) if coef else None
        return sums._replace(aux_loss=aux, expert_tokens=routing[:, 0].detach())

    def _load_balancing(self, routing: torch.Tensor, tokens: int, real: int) -> torch.Tensor:
        """real x the pack's load-balancing loss, from the routing sums [expert layers, 2, E] of its `tokens`
        tokens, `real` of them not filler. On a slice of the pack (sequence parallelism) this slice's share: the
        counts and real tokens of the whole pack (summed over the group) with the slice's router probabilities, so
        that the shares and their gradients add up over the group to the pack's."""
        if self.sequence_group is None:
            return real * load_balancing_loss(routing, tokens)
        counts = routing[:, 0].detach()
        totals = torch.cat([counts.flatten().double(), counts.new_tensor([real], dtype=torch.float64)])
        dist.all_reduce(totals, group=self.sequence_group)
        whole = totals[:-1].view_as(counts).to(counts.dtype)
        pack_tokens = tokens * dist.get_world_size(self.sequence_group)  # the slices are equal
        return totals[-1].to(counts.dtype) * load_balancing_loss(routing, pack_tokens, whole)

    # ---------------------------------------------------------------- loading and saving
    @classmethod
    def from_config(cls, config: ModelConfig, dtype=torch.float32, device="cpu", attn_impl="auto"):
        with torch.device(device):
            model = cls(config, attn_impl=attn_impl)
        return model.to(dtype)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", attn_impl="auto",
                        expert_parallel: int = 1) -> "PackedCausalLM":
        """Load a HF checkpoint folder (safetensors or .bin, single or sharded) without a second copy:
        the module is built on the meta device and each tensor, read from the file, is assigned in place.
        `expert_parallel` N > 1: the expert layers are sharded first (ochat.model.expert_parallel.enable:
        collective), so this rank reads only its experts."""
        from ochat.model import expert_parallel as ep

        config = ModelConfig.from_hf_config(path)
        with torch.device("meta"):
            model = cls(config, attn_impl=attn_impl)
        ep.enable(model, expert_parallel)
        return hf_weights.load_weights(model, path, dtype, device)

    @classmethod
    def from_pretrained_partitioned(cls, path, ds_config: dict, attn_impl="auto") -> "PackedCausalLM":
        """ZeRO-3: a HF checkpoint folder loaded already partitioned over the ranks (`deepspeed.zero.Init` with
        `ds_config`, whose bf16 setting decides the dtype), so no rank holds the whole model. Collective."""
        import deepspeed

        config = ModelConfig.from_hf_config(path)
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = cls(config, attn_impl=attn_impl)
        return hf_weights.load_partitioned(model, path)

    def save_pretrained(self, path, max_shard_bytes: int = hf_weights.MAX_SHARD_BYTES):
        """Write config.json + safetensors that transformers loads (sharded with an index above max_shard_bytes)."""
        hf_weights.save_weights(path, hf_weights.full_state_dict(self), self.config, max_shard_bytes=max_shard_bytes)
