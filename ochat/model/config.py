"""ModelConfig: the architecture facts of a decoder-only model, read from a Hugging Face config.json.

Two parts:
- `ARCHITECTURES` (one `Architecture` per supported Hugging Face `model_type`): how that family lays out a
  decoder layer (where its RMSNorms sit and how they scale, q/k norms, fused projections, embedding scale,
  which config.json keys it has). Llama 2/3, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text), Phi-3 / Phi-4,
  OLMo 2, and the mixture-of-experts families Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE and gpt-oss (`ExpertLayout`:
  how their checkpoints name and lay out the experts, how the router normalises, biases, the experts' activation;
  gpt-oss also has learned attention sinks). Anything else (DeepSeek-style MoE, linear attention, ...) is refused
  in one line naming it. config.json's `quantization_config` is accepted only where the family's weights are
  dequantised as they are read (`Architecture.quantized`: gpt-oss's MXFP4 experts, as the Hub ships them;
  ochat.model.mxfp4), refused in one line otherwise, and never written back: ochat's checkpoints are plain.
- `ModelConfig`: the numbers of one config.json (sizes, RoPE, sliding windows, soft-capping), read through
  transformers' own config class (so its defaults and older spellings are honoured) and written back as a
  config.json that transformers loads.

It counts parameters and training FLOPs (`num_params`, `flops_per_token`), so MFU is computed in one place.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from ochat.kernels.swiglu import ACTIVATIONS

LLAMA_NORMS = (("attn_in", "input_layernorm"), ("mlp_in", "post_attention_layernorm"))
GEMMA_NORMS = (("attn_in", "input_layernorm"), ("attn_out", "post_attention_layernorm"),
               ("mlp_in", "pre_feedforward_layernorm"), ("mlp_out", "post_feedforward_layernorm"))
OLMO2_NORMS = (("attn_out", "post_attention_layernorm"), ("mlp_out", "post_feedforward_layernorm"))

# ModelConfig fields that only some architectures have (each lists its own in Architecture.keys).
OPTIONAL_FIELDS = ("attention_bias", "mlp_bias", "query_pre_attn_scalar", "attn_logit_softcapping",
                   "final_logit_softcapping", "rope_local_base_freq", "partial_rotary_factor", "num_experts",
                   "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "shared_expert_intermediate_size",
                   "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef", "swiglu_alpha", "swiglu_limit")
MOE_KEYS = ("num_experts", "num_experts_per_tok", "router_aux_loss_coef")  # every mixture-of-experts family's
QWEN_MOE_KEYS = MOE_KEYS + ("moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers")
ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")


@dataclass(frozen=True)
class ExpertLayout:
    """How a mixture-of-experts family stores and routes its experts (ochat holds them stacked, as transformers v5's
    modules do: `mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I], router `mlp.gate.weight`)."""

    block: str = "mlp"  # the expert block's module name in checkpoints (Mixtral: block_sparse_moe)
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert names (Mixtral: w1, w3, w2)
    always_norm_topk: bool = False  # Mixtral: the top-k probabilities always renormalised to sum 1 (gpt-oss: the
    # softmax over the k selected logits, the same numbers)
    router: str = "gate"  # the router's module name in checkpoints (gpt-oss: router)
    biases: bool = False  # gpt-oss: the router and every expert projection have biases
    fused: bool = False  # gpt-oss: checkpoints hold transformers' own stacked tensors (`experts.gate_up_proj` [E, H, 2I]
    # with gate and up columns interleaved, `experts.down_proj` [E, I, H], their biases), not per-expert ones
    act: str | None = None  # the experts' activation when it is not config.json's: "clamped_swiglu" (gpt-oss)


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face model type lays out its decoder (what config.json's numbers do not say)."""

    hf_class: str  # the transformers class, written to config.json's `architectures`
    norms: tuple[tuple[str, str], ...]  # (role, Hugging Face module name); roles: attn_in, attn_out, mlp_in, mlp_out
    keys: tuple[str, ...] = ()  # OPTIONAL_FIELDS this family's config.json carries
    qk_norm: str | None = None  # "head": RMSNorm of each q/k head (over head_dim); "projection": of the whole q/k
    norm_offset: float = 0.0  # Gemma: RMSNorm weights are applied as (1 + w)
    norm_scale_in_float32: bool = False  # Gemma, OLMo 2: scale in float32, then cast (Llama: cast, then scale)
    qkv_bias: bool = False  # Qwen2: q/k/v projections always have biases
    fused_projections: bool = False  # Phi-3: one qkv_proj and one gate_up_proj
    embed_scale: bool = False  # Gemma: embeddings x sqrt(hidden_size), rounded to the embedding dtype
    act_key: str = "hidden_act"  # config.json key of the MLP activation
    sliding: str = "none"  # which layers use `sliding_window`: "none", "all", or config.json's "layer_types"
    attention_sinks: bool = False  # gpt-oss: a learned logit per head (`self_attn.sinks`) in every softmax denominator
    experts: ExpertLayout | None = None  # mixture-of-experts families
    key_names: tuple[tuple[str, str], ...] = ()  # (field, config.json key) where the family spells a key its own way
    fixed: tuple[tuple[str, Any], ...] = ()  # (config.json key, the one value ochat supports): anything else refused
    quantized: tuple[str, ...] = ()  # quantization_config quant_methods ochat dequantises while reading the weights


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("LlamaForCausalLM", LLAMA_NORMS, keys=("attention_bias", "mlp_bias")),
    "mistral": Architecture("MistralForCausalLM", LLAMA_NORMS, sliding="all"),
    "qwen2": Architecture("Qwen2ForCausalLM", LLAMA_NORMS, qkv_bias=True, sliding="layer_types"),
    "qwen3": Architecture("Qwen3ForCausalLM", LLAMA_NORMS, keys=("attention_bias",), qk_norm="head",
                          sliding="layer_types"),
    "gemma2": Architecture("Gemma2ForCausalLM", GEMMA_NORMS,
                           keys=("attention_bias", "query_pre_attn_scalar", "attn_logit_softcapping",
                                 "final_logit_softcapping"),
                           norm_offset=1.0, norm_scale_in_float32=True, embed_scale=True,
                           act_key="hidden_activation", sliding="layer_types"),
    # transformers' Gemma 3 ignores attn_logit_softcapping; a value in config.json is kept, unused, in `extra`
    "gemma3_text": Architecture("Gemma3ForCausalLM", GEMMA_NORMS,
                                keys=("attention_bias", "query_pre_attn_scalar", "final_logit_softcapping",
                                      "rope_local_base_freq"),
                                qk_norm="head", norm_offset=1.0, norm_scale_in_float32=True, embed_scale=True,
                                act_key="hidden_activation", sliding="layer_types"),
    "phi3": Architecture("Phi3ForCausalLM", LLAMA_NORMS, keys=("partial_rotary_factor",), fused_projections=True,
                         sliding="all"),
    "olmo2": Architecture("Olmo2ForCausalLM", OLMO2_NORMS, keys=("attention_bias",), qk_norm="projection",
                          norm_scale_in_float32=True),
    "mixtral": Architecture("MixtralForCausalLM", LLAMA_NORMS, keys=MOE_KEYS, sliding="all",
                            experts=ExpertLayout("block_sparse_moe", ("w1", "w3", "w2"), always_norm_topk=True),
                            key_names=(("num_experts", "num_local_experts"),), fixed=(("router_jitter_noise", 0.0),)),
    "olmoe": Architecture("OlmoeForCausalLM", LLAMA_NORMS, keys=("attention_bias", "norm_topk_prob") + MOE_KEYS,
                          qk_norm="projection", experts=ExpertLayout(), fixed=(("clip_qkv", None),)),
    "qwen2_moe": Architecture("Qwen2MoeForCausalLM", LLAMA_NORMS,
                              keys=QWEN_MOE_KEYS + ("shared_expert_intermediate_size",), qkv_bias=True,
                              experts=ExpertLayout(), fixed=(("qkv_bias", True),)),
    "qwen3_moe": Architecture("Qwen3MoeForCausalLM", LLAMA_NORMS, keys=("attention_bias",) + QWEN_MOE_KEYS,
                              qk_norm="head", experts=ExpertLayout()),
    # hidden_act is in config.json but unused: the experts' clamped SwiGLU takes swiglu_alpha and swiglu_limit
    "gpt_oss": Architecture("GptOssForCausalLM", LLAMA_NORMS,
                            keys=("attention_bias", "swiglu_alpha", "swiglu_limit") + MOE_KEYS,
                            norm_scale_in_float32=True, sliding="layer_types", attention_sinks=True,
                            experts=ExpertLayout(always_norm_topk=True, router="router", biases=True, fused=True,
                                                 act="clamped_swiglu"),
                            key_names=(("num_experts", "num_local_experts"),), quantized=("mxfp4",)),
}

# config.json keys whose facts ModelConfig holds in another form (rebuilt by to_hf_config), or that describe the
# file rather than the model
_REWRITTEN_KEYS = {"rope_parameters", "rope_scaling", "rope_theta", "rope_local_base_freq", "partial_rotary_factor",
                   "sliding_window_pattern", "_sliding_window_pattern", "use_sliding_window", "max_window_layers",
                   "layer_types", "hidden_act", "hidden_activation", "architectures", "torch_dtype", "dtype",
                   "transformers_version", "use_cache", "num_experts", "num_local_experts", "quantization_config"}


def unsupported_model_type(model_type: str) -> str:
    """The one-line refusal for a model type ochat cannot train."""
    return f"model_type {model_type!r} not supported (supported: {', '.join(ARCHITECTURES)})"


@dataclass(frozen=True)
class Rotary:
    """The rotary embedding of a group of layers; hashable, so the model computes each one once per forward."""

    theta: float
    dim: int  # rotating features per head (head_dim, less with Phi-3's partial_rotary_factor)
    scaling: tuple | None  # sorted (key, value) pairs of the Hugging Face rope dict (rope_type: linear, llama3, longrope,
    # yarn)
    max_position_embeddings: int  # LongRoPE's default factor is max_position_embeddings / original

    @property
    def scaling_dict(self) -> dict | None:
        return dict(self.scaling) if self.scaling else None


@dataclass(frozen=True)
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"  # the MLP's gate activation: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU, Gemma)
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # sorted (key, value) pairs of the HF dict (lists as tuples), hashable
    rope_local_base_freq: float | None = None  # Gemma 3: RoPE base of the sliding-window layers (no scaling there)
    partial_rotary_factor: float = 1.0  # Phi-3 family (Phi-4-mini 0.75): share of each head that rotates
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # per layer "sliding_attention" / "full_attention"; None: every layer
    attention_bias: bool = False  # q/k/v/o biases (Llama, Qwen3, Gemma, OLMo 2 option)
    mlp_bias: bool = False  # Llama option
    query_pre_attn_scalar: float | None = None  # Gemma: softmax scale = query_pre_attn_scalar ** -0.5
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> c * tanh(scores / c)
    final_logit_softcapping: float | None = None  # Gemma 2 (Gemma 3 option): logits -> c * tanh(logits / c)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: Any = 2
    pad_token_id: int | None = None
    num_experts: int = 0  # mixture of experts: routed experts per expert layer (0: a dense model)
    num_experts_per_tok: int = 0  # experts each token is routed to (top-k)
    moe_intermediate_size: int | None = None  # Qwen MoE: an expert's intermediate size (else intermediate_size)
    norm_topk_prob: bool = False  # the top-k routing probabilities renormalised to sum 1 (Mixtral: always)
    shared_expert_intermediate_size: int | None = None  # Qwen2-MoE: a sigmoid-gated shared expert beside the rest
    decoder_sparse_step: int = 1  # Qwen MoE: layer i has experts when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and it is not listed here (those keep a dense MLP)
    router_aux_loss_coef: float = 0.0  # the load-balancing loss's weight in the training loss (0: off)
    swiglu_alpha: float | None = None  # gpt-oss experts: gate * sigmoid(alpha * gate) * (up + 1) ...
    swiglu_limit: float | None = None  # ... with gate clamped above at limit, up to [-limit, limit]
    extra: tuple = field(default=(), compare=False)  # other HF keys, kept for to_hf_config

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ValueError(unsupported_model_type(self.model_type))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"{self.model_type}: MLP activation {self.hidden_act!r} not supported (one of {ACTIVATIONS})")
        arch = self.arch
        for name in OPTIONAL_FIELDS:
            default = ModelConfig.__dataclass_fields__[name].default
            if name not in arch.keys and getattr(self, name) != default:
                raise ValueError(f"{self.model_type} has no {name} (set to {getattr(self, name)!r})")
        if self.sliding_window is not None and arch.sliding == "none":
            raise ValueError(f"{self.model_type} has no sliding_window")
        if self.layer_types is not None:
            if arch.sliding != "layer_types":
                raise ValueError(f"{self.model_type} has no layer_types")
            if len(self.layer_types) != self.num_hidden_layers or \
                    not set(self.layer_types) <= {"sliding_attention", "full_attention"}:
                raise ValueError(f"layer_types must give each of the {self.num_hidden_layers} layers "
                                 f"'sliding_attention' or 'full_attention', got {self.layer_types}")
        if arch.experts is not None and arch.experts.act == "clamped_swiglu":  # transformers' defaults where unset
            for name, default in (("swiglu_alpha", 1.702), ("swiglu_limit", 7.0)):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, default)
        if arch.experts is not None and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"{self.model_type}: num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                             f"got {self.num_experts_per_tok}")
        rt = (self.rope_scaling_dict or {}).get("rope_type", "default")
        if rt not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {rt!r} not supported (one of {ROPE_TYPES})")

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.model_type]

    # ---------------------------------------------------------------- per layer
    def layer_type(self, i: int) -> str:
        """'sliding_attention' or 'full_attention' for decoder layer i."""
        if self.sliding_window is None:
            return "full_attention"
        return "sliding_attention" if self.layer_types is None else self.layer_types[i]

    def layer_window(self, i: int) -> int | None:
        """The sliding window of decoder layer i (None: full causal attention)."""
        return self.sliding_window if self.layer_type(i) == "sliding_attention" else None

    def layer_rotary(self, i: int) -> Rotary:
        """The rotary embedding of decoder layer i (Gemma 3's sliding layers have their own base, unscaled)."""
        if self.rope_local_base_freq is not None and self.layer_type(i) == "sliding_attention":
            return Rotary(self.rope_local_base_freq, self.rotary_dim, None, self.max_position_embeddings)
        return Rotary(self.rope_theta, self.rotary_dim, self.rope_scaling, self.max_position_embeddings)

    def layer_has_experts(self, i: int) -> bool:
        """Whether decoder layer i has a mixture-of-experts block (else a dense MLP): the one place that decides."""
        return (self.arch.experts is not None and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def expert_layers(self) -> int:
        return sum(map(self.layer_has_experts, range(self.num_hidden_layers)))

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def normalizes_topk(self) -> bool:
        return self.norm_topk_prob or (self.arch.experts is not None and self.arch.experts.always_norm_topk)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_scale(self) -> float | None:
        """The softmax scale when it is not 1/sqrt(head_dim) (Gemma's query_pre_attn_scalar), else None."""
        if self.query_pre_attn_scalar is None or self.query_pre_attn_scalar == self.head_dim:
            return None
        return self.query_pre_attn_scalar ** -0.5

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    # ---------------------------------------------------------------- reading and writing
    @classmethod
    def from_hf_config(cls, cfg: dict | str | os.PathLike) -> "ModelConfig":
        """Read a config.json (dict, file or checkpoint folder) through transformers' config class of its type."""
        where = "config"
        if not isinstance(cfg, dict):
            where = os.fspath(cfg)
            if os.path.isdir(where):
                where = os.path.join(where, "config.json")
            with open(where) as f:
                cfg = json.load(f)
        mt = cfg.get("model_type", "llama")
        if mt not in ARCHITECTURES:
            raise ValueError(f"{where}: {unsupported_model_type(mt)}")
        if cfg.get("quantization_config") is not None:
            quant = cfg["quantization_config"]
            method = quant.get("quant_method") if isinstance(quant, dict) else quant
            if method not in ARCHITECTURES[mt].quantized:
                readable = "".join(f", and {'/'.join(a.quantized)} for {t}" for t, a in ARCHITECTURES.items()
                                   if a.quantized)
                raise ValueError(f"{where}: {mt} weights quantised as {method!r} (quantization_config) not supported: "
                                 f"ochat reads unquantised weights{readable}")
        try:
            kw = _read_transformers_config(dict(cfg, model_type=mt))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        written = cls(**kw).to_hf_config().keys() | _REWRITTEN_KEYS
        kw["extra"] = tuple(sorted((k, json.dumps(v)) for k, v in cfg.items() if k not in written))
        return cls(**kw)

    def to_hf_config(self) -> dict:
        """A config.json dict that transformers loads with this model type's config class."""
        arch = self.arch
        d = {k: json.loads(v) for k, v in self.extra}
        d.update(
            architectures=[arch.hf_class], model_type=self.model_type, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, rope_scaling=_json_rope(self.rope_scaling_dict),
            tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id, torch_dtype="float32",
        )
        d[arch.act_key] = self.hidden_act
        names = dict(arch.key_names)
        d.update({names.get(k, k): list(v) if isinstance(v, tuple) else v
                  for k, v in ((k, getattr(self, k)) for k in arch.keys)})
        if arch.sliding != "none":
            d["sliding_window"] = self.sliding_window
        if arch.sliding == "layer_types":
            types = [self.layer_type(i) for i in range(self.num_hidden_layers)]
            d["layer_types"] = types
            if self.model_type in ("qwen2", "qwen3"):  # the older spelling, for readers without layer_types
                d.update(use_sliding_window=self.sliding_window is not None,
                         max_window_layers=types.index("sliding_attention") if "sliding_attention" in types
                         else self.num_hidden_layers)
        rs = self.rope_scaling_dict or {}
        if self.model_type == "phi3" and rs.get("rope_type") == "longrope":
            # transformers' Phi-3 reads the top-level key first (its default is 4096)
            d["original_max_position_embeddings"] = rs["original_max_position_embeddings"]
        return d

    # ---------------------------------------------------------------- preset
    @classmethod
    def debug(cls, **overrides) -> "ModelConfig":
        """Tiny float32-friendly model for CPU tests: 2 layers, hidden 64, GQA 4/2, context 64."""
        kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-5, rope_theta=10000.0)
        kw.update(overrides)
        return cls(**kw)

    # ---------------------------------------------------------------- counting
    def num_params(self, embeddings: bool = True, active: bool = False) -> int:
        """Parameters of the module: every projection (fused or not, same count) and its biases, every RMSNorm
        weight (the layer's two or four, q/k norms, the final norm), the embedding and an untied lm_head.
        Expert layers count their router, their experts (with `active`: only the top-k a token runs through) and a
        shared expert with its gate; gpt-oss's biases of router and experts, and its attention sinks (one per head)."""
        h, d, arch = self.hidden_size, self.head_dim, self.arch
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * q + 2 * h * kv + q * h
        if arch.qkv_bias or self.attention_bias:
            attn += q + 2 * kv + (h if self.attention_bias else 0)
        if arch.qk_norm == "head":
            attn += 2 * d
        elif arch.qk_norm == "projection":
            attn += q + kv
        if arch.attention_sinks:
            attn += self.num_attention_heads
        dense = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h if self.mlp_bias else 0)
        experts = self.num_experts_per_tok if active else self.num_experts
        i, biases = self.expert_intermediate_size, arch.experts is not None and arch.experts.biases
        sparse = ((h + biases) * self.num_experts + experts * (3 * h * i + biases * (2 * i + h))
                  + (3 * h * self.shared_expert_intermediate_size + h if self.shared_expert_intermediate_size else 0))
        layer = attn + len(arch.norms) * h
        n = sum(layer + (sparse if self.layer_has_experts(i) else dense) for i in range(self.num_hidden_layers)) + h
        emb = self.vocab_size * h
        if embeddings:
            n += emb if self.tie_word_embeddings else 2 * emb
        return n

    def flops_per_token(self, mean_len_sq_over_tokens: float) -> float:
        """Training FLOPs (forward + backward) per token.

        6 * N (every parameter outside the embedding lookup, the lm_head included; the norm weights and biases
        are a rounding error but counted; of the experts only the top-k a token runs through) plus causal
        attention: QK^T and AV are 2 * 2 * Hq * D flops per token pair, halved by causality, x3 for fwd+bwd:
        6 * Hq * D * (sum(len^2) / tokens) per full-attention layer, with `mean_len_sq_over_tokens` = sum over
        sequences of len^2 divided by the number of tokens (= len for a single sequence). A sliding-window layer
        (window W) sees at most W keys per token: 6 * Hq * D * min(sum(len^2) / tokens, 2 W), exact for
        conversations up to W tokens and at most a third high beyond. Not counted: softmax, soft-capping, norms
        and activations (elementwise work).
        """
        n_matmul = self.num_params(embeddings=False, active=True) + self.vocab_size * self.hidden_size
        per_layer = 6 * self.num_attention_heads * self.head_dim
        attn = sum(per_layer * (mean_len_sq_over_tokens if w is None else min(mean_len_sq_over_tokens, 2 * w))
                   for w in map(self.layer_window, range(self.num_hidden_layers)))
        return 6 * n_matmul + attn


def _json_rope(rope: dict | None) -> dict | None:
    return None if rope is None else {k: list(v) if isinstance(v, tuple) else v for k, v in rope.items()}


def _rope_fields(rope: dict, what: str) -> tuple[float, tuple | None, float]:
    """(theta, scaling pairs or None, partial_rotary_factor) of one transformers `rope_parameters` dict."""
    rt = rope.get("rope_type", rope.get("type", "default"))
    if rt not in ROPE_TYPES:
        raise ValueError(f"{what}rope type {rt!r} not supported (one of {ROPE_TYPES})")
    scaling = None
    if rt != "default":
        scaling = {k: tuple(v) if isinstance(v, list) else v for k, v in rope.items()
                   if k not in ("rope_theta", "partial_rotary_factor", "type") and v is not None}
        scaling = tuple(sorted(scaling.items()))
    return float(rope["rope_theta"]), scaling, float(rope.get("partial_rotary_factor", 1.0))


def _read_transformers_config(cfg: dict) -> dict:
    """ModelConfig keyword arguments from a config.json dict, as transformers' config class of its type reads it
    (its defaults for missing keys, its conversions of older spellings)."""
    from transformers import AutoConfig

    mt = cfg["model_type"]
    arch = ARCHITECTURES[mt]
    hf = AutoConfig.for_model(**cfg)
    if getattr(hf, "use_bidirectional_attention", False):
        raise ValueError(f"{mt} with use_bidirectional_attention (an encoder) not supported")
    for key, supported in arch.fixed:
        if getattr(hf, key, supported) != supported:
            raise ValueError(f"{mt} with {key}={getattr(hf, key)!r} not supported (only {supported!r})")
    if arch.sliding == "none" and getattr(hf, "sliding_window", None):
        raise ValueError(f"{mt} with a sliding window not supported")
    kw = {name: getattr(hf, name) for name in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id",
        "pad_token_id")}
    kw.update(model_type=mt, num_key_value_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
              head_dim=getattr(hf, "head_dim", None), hidden_act=getattr(hf, arch.act_key))
    if isinstance(kw["eos_token_id"], list):
        kw["eos_token_id"] = tuple(kw["eos_token_id"])
    rope = hf.rope_parameters
    if "full_attention" in rope:  # Gemma 3: one rope dict per layer type
        theta, scaling, _ = _rope_fields(rope["sliding_attention"], "sliding layers' ")
        if scaling is not None:
            raise ValueError("rope scaling on sliding-window layers not supported")
        kw["rope_local_base_freq"] = theta
        rope = rope["full_attention"]
    kw["rope_theta"], kw["rope_scaling"], partial = _rope_fields(rope, "")
    if "partial_rotary_factor" in arch.keys:
        kw["partial_rotary_factor"] = partial
    kw.update({k: getattr(hf, k) for k in arch.keys if k not in ("rope_local_base_freq", "partial_rotary_factor")})
    if "mlp_only_layers" in kw:
        kw["mlp_only_layers"] = tuple(kw["mlp_only_layers"])
    if arch.sliding != "none" and getattr(hf, "sliding_window", None) is not None:
        kw["sliding_window"] = hf.sliding_window
        types = tuple(getattr(hf, "layer_types", None) or ()) if arch.sliding == "layer_types" else ()
        if set(types) - {"sliding_attention", "full_attention"}:
            raise ValueError(f"layer types {sorted(set(types))} not supported (sliding_attention, full_attention)")
        if "full_attention" in types:
            kw["layer_types"] = types
    return kw
