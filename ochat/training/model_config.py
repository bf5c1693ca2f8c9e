"""ModelConfig: the architecture facts of a LLaMA-family model, read from a Hugging Face config.json.

Covers Llama 2/3 (GQA, rope_theta, llama3 rope scaling), Mistral (sliding_window), Qwen2 (q/k/v
biases), tied or untied embeddings. Counts parameters and training FLOPs so MFU is computed in one place.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

_KNOWN_TYPES = ("llama", "mistral", "qwen2")


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
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # sorted (key, value) pairs of the HF dict, hashable
    sliding_window: int | None = None
    attention_bias: bool = False  # q/k/v/o biases (Llama option)
    qkv_bias: bool = False  # q/k/v biases only (Qwen2)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: Any = 2
    pad_token_id: int | None = None
    extra: tuple = field(default=(), compare=False)  # other HF keys, kept for to_hf_config

    def __post_init__(self):
        if self.model_type not in _KNOWN_TYPES:
            raise ValueError(f"model_type {self.model_type!r} not supported (one of {_KNOWN_TYPES})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    # ---------------------------------------------------------------- reading and writing
    @classmethod
    def from_hf_config(cls, cfg: dict | str | os.PathLike) -> "ModelConfig":
        if not isinstance(cfg, dict):
            path = os.fspath(cfg)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                cfg = json.load(f)
        cfg = dict(cfg)
        mt = cfg.get("model_type", "llama")
        rope_theta = cfg.get("rope_theta")
        rope_scaling = cfg.get("rope_scaling")
        rp = cfg.get("rope_parameters")  # transformers 5 spelling
        if isinstance(rp, dict):
            rope_theta = rp.get("rope_theta", rope_theta)
            if rp.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type", "default")) == "default":
            rope_scaling = None
        if rope_scaling is not None:
            rt = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if rt not in ("llama3", "linear"):
                raise ValueError(f"rope_scaling type {rt!r} not supported (llama3, linear)")
            rope_scaling = dict(rope_scaling, rope_type=rt)
            rope_scaling.pop("type", None)
        sliding = cfg.get("sliding_window") if mt in ("mistral", "qwen2") else None
        if mt == "qwen2" and not cfg.get("use_sliding_window", False):
            sliding = None
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: cfg[k] for k in known if k in cfg and k not in ("rope_scaling", "rope_theta", "sliding_window", "extra", "head_dim")}
        kw["model_type"] = mt
        kw["head_dim"] = cfg.get("head_dim")
        kw["rope_theta"] = float(rope_theta if rope_theta is not None else (1e6 if mt == "qwen2" else 1e4))
        kw["rope_scaling"] = tuple(sorted(rope_scaling.items())) if rope_scaling else None
        kw["sliding_window"] = sliding
        kw["qkv_bias"] = mt == "qwen2"
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = tuple(kw["eos_token_id"])
        kw.setdefault("num_key_value_heads", kw.get("num_attention_heads", 32))
        skip = known | {"rope_parameters", "architectures", "torch_dtype", "dtype", "transformers_version",
                        "use_sliding_window", "max_window_layers", "layer_types", "use_cache"}
        extra = tuple(sorted((k, json.dumps(v)) for k, v in cfg.items() if k not in skip))
        return cls(**kw, extra=extra)

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def to_hf_config(self) -> dict:
        """A config.json dict that transformers loads with LlamaConfig / MistralConfig / Qwen2Config."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        d = {k: json.loads(v) for k, v in self.extra}
        d.update(
            architectures=[arch], model_type=self.model_type, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, rope_scaling=self.rope_scaling_dict,
            tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            pad_token_id=self.pad_token_id, hidden_act="silu", torch_dtype="float32",
        )
        if self.model_type == "llama":
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "mistral":
            d.update(sliding_window=self.sliding_window)
        else:
            d.update(sliding_window=self.sliding_window, use_sliding_window=self.sliding_window is not None,
                     max_window_layers=self.num_hidden_layers if self.sliding_window is None else 0)
        return d

    # ---------------------------------------------------------------- presets
    @classmethod
    def debug(cls, **overrides) -> "ModelConfig":
        """Tiny float32-friendly model for CPU tests: 2 layers, hidden 64, GQA 4/2, context 64."""
        kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-5, rope_theta=10000.0)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def tinyllama_1b(cls, vocab_size: int = 32002) -> "ModelConfig":
        """The 1.1B LLaMA shape of the benchmarks (TinyLlama: 22 layers, hidden 2048, GQA 32/4; vocabulary of
        Llama 2 + OpenChat's two tokens)."""
        return cls(vocab_size=vocab_size, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                   num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5)

    @classmethod
    def llama2_7b(cls, vocab_size: int = 32002) -> "ModelConfig":
        """The Llama 2 7B shape of the benchmarks (32 layers, hidden 4096, 32 heads, no GQA)."""
        return cls(vocab_size=vocab_size, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)

    @classmethod
    def llama3_8b(cls) -> "ModelConfig":
        """The Llama 3 8B shape (32 layers, hidden 4096, intermediate 14336, GQA 32/8, vocabulary 128256,
        rope_theta 500000)."""
        return cls(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                   rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)

    # ---------------------------------------------------------------- counting
    def num_params(self, embeddings: bool = True) -> int:
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * q + 2 * h * kv + q * h
        if self.qkv_bias or self.attention_bias:
            attn += q + 2 * kv + (h if self.attention_bias else 0)
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h if self.mlp_bias else 0)
        layer = attn + mlp + 2 * h
        n = self.num_hidden_layers * layer + h
        emb = self.vocab_size * h
        if embeddings:
            n += emb if self.tie_word_embeddings else 2 * emb
        return n

    def flops_per_token(self, mean_len_sq_over_tokens: float) -> float:
        """Training FLOPs (forward + backward) per token.

        6 * N_matmul (every weight matrix except the embedding lookup; the lm_head counts) plus causal
        attention: QK^T and AV are 2 * 2 * L * Hq * D flops per token pair, halved by causality, x3 for
        fwd+bwd: 6 * layers * Hq * D * (sum(len^2) / tokens), with `mean_len_sq_over_tokens` = sum over
        sequences of len^2 divided by the number of tokens (= len for a single sequence).
        """
        n_matmul = self.num_params(embeddings=False) + self.vocab_size * self.hidden_size
        attn = 6 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * mean_len_sq_over_tokens
        return 6 * n_matmul + attn
