"""PackedCausalLM: a padding-free LLaMA-family decoder (Llama 2/3, Mistral, Qwen2) on packed tokens.

Architecture (parameter names identical to Hugging Face, so state dicts map 1:1):
- embed_tokens -> N x [RMSNorm -> GQA attention (RoPE from position_ids, varlen causal attention
  over cu_seqlens, optional sliding window, optional q/k/v biases) -> residual -> RMSNorm -> SwiGLU
  -> residual] -> RMSNorm -> lm_head (tied to embed_tokens or not).
- Inputs are flat: input_ids [T], position_ids [T] (restart at 0 per conversation), cu_seqlens int32
  [B+1], max_seqlen. No padding and no attention across conversation boundaries.
- With labels/label_weights (already shifted) the forward returns LossSums from the fused, chunked
  linear cross-entropy: the full [T, V] logits are never held. The loss runs inside `lm_head.forward`
  so DeepSpeed ZeRO-3 gathers the lm_head weight (the tied weight too: it is a parameter of lm_head).
- Gradient checkpointing per decoder layer, non-reentrant (`torch.utils.checkpoint`, use_reentrant=False),
  of all layers or of an evenly spread fraction of them.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ochat.kernels.attention import resolve_backend, varlen_attention
from ochat.kernels.linear_cross_entropy import LossSums, weighted_linear_cross_entropy
from ochat.kernels.rms_norm import rms_norm
from ochat.kernels.rope import apply_rotary
from ochat.kernels.swiglu import swiglu
from ochat.training import hf_weights
from ochat.training.model_config import ModelConfig


def rope_inv_freq(config: ModelConfig, device=None) -> torch.Tensor:
    """Inverse RoPE frequencies [D/2] in float32, with Llama 3 ("llama3") or linear scaling applied."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    rs = config.rope_scaling_dict
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


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.hq, self.hkv, self.d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        qkv_bias = c.qkv_bias or c.attention_bias
        self.q_proj = nn.Linear(c.hidden_size, self.hq * self.d, bias=qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.hkv * self.d, bias=qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.hkv * self.d, bias=qkv_bias)
        self.o_proj = nn.Linear(self.hq * self.d, c.hidden_size, bias=c.attention_bias)
        self.window = c.sliding_window
        self.attention_hook = None  # replaces varlen_attention when set (sequence parallelism routes it over ranks)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, backend):
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.hq, self.d)  # [T, Hq, D]
        k = self.k_proj(x).view(t, self.hkv, self.d)  # [T, Hkv, D]
        v = self.v_proj(x).view(t, self.hkv, self.d)
        q, k = apply_rotary(q, k, cos, sin)
        attend = self.attention_hook or varlen_attention
        o = attend(q, k, v, cu_seqlens, max_seqlen, window=self.window, backend=backend)
        return self.o_proj(o.reshape(t, self.hq * self.d))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, backend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class LMHead(nn.Module):
    """The output projection; computes logits or (inside its own forward, for ZeRO-3) the loss sums."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c.vocab_size, c.hidden_size))

    def forward(self, hidden, labels=None, label_weights=None):
        if labels is None:
            return hidden @ self.weight.t()
        return weighted_linear_cross_entropy(hidden, self.weight, labels, label_weights)


class PackedCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, attn_impl: str = "auto"):
        super().__init__()
        self.config = config
        self.attn_impl = attn_impl
        self.model = Backbone(config)
        self.lm_head = LMHead(config)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.checkpointed_layers: frozenset[int] = frozenset()  # decoder layers recomputed in the backward
        self.checkpoint_fn = _recompute_in_backward  # (layer, *inputs) -> outputs; offload swaps in DeepSpeed's
        self._inv_freq = {}
        self._attn_backend: dict[torch.device, str] = {}  # attn_impl resolved once per device
        if self.lm_head.weight.device.type != "meta":
            self.reset_parameters()

    # ---------------------------------------------------------------- init
    def reset_parameters(self, std: float = 0.02):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        if not self.config.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)

    def gradient_checkpointing_enable(self, fraction: float = 1.0):
        """Recompute the activations of `fraction` of the decoder layers (evenly spread) in the backward.

        1.0 checkpoints every layer (least memory, about a third more compute); a fraction between
        trades the memory left on the GPU for speed (0.5: every other layer).
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"gradient checkpointing fraction must be in [0, 1], got {fraction}")
        n = len(self.model.layers)
        k = round(fraction * n)
        self.checkpointed_layers = frozenset(i * n // k for i in range(k))

    def gradient_checkpointing_disable(self):
        self.checkpointed_layers = frozenset()

    # ---------------------------------------------------------------- forward
    def _rope(self, position_ids, dtype):
        dev = position_ids.device
        if dev not in self._inv_freq:
            self._inv_freq[dev] = rope_inv_freq(self.config, dev)
        freqs = position_ids.float()[:, None] * self._inv_freq[dev][None, :]  # [T, D/2], float32
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def hidden_states(self, input_ids, position_ids, cu_seqlens, max_seqlen):
        """Final-normed hidden states [T, H]."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self._rope(position_ids, x.dtype)
        if x.device not in self._attn_backend:
            self._attn_backend[x.device] = resolve_backend(self.attn_impl, x.device)
        backend = self._attn_backend[x.device]
        cu_seqlens = cu_seqlens.to(torch.int32)
        max_seqlen = int(max_seqlen)
        recompute = self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.model.layers):
            if recompute and i in self.checkpointed_layers:
                x = self.checkpoint_fn(layer, x, cos, sin, cu_seqlens, max_seqlen, backend)
            else:
                x = layer(x, cos, sin, cu_seqlens, max_seqlen, backend)
        return self.model.norm(x)

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen, labels=None, label_weights=None,
                target_index=None):
        """Logits [T, V], or LossSums when labels and label_weights (shifted: row t predicts labels[t]) are given.

        target_index (optional, int64 [N], from the collate): only those rows go through lm_head/loss.
        """
        h = self.hidden_states(input_ids, position_ids, cu_seqlens, max_seqlen)
        if labels is None:
            return self.lm_head(h)
        if label_weights is None:
            label_weights = (labels >= 0).float()
        if target_index is not None:
            h, labels, label_weights = h[target_index], labels[target_index], label_weights[target_index]
        return self.lm_head(h, labels, label_weights)

    # ---------------------------------------------------------------- loading and saving
    @classmethod
    def from_config(cls, config: ModelConfig, dtype=torch.float32, device="cpu", attn_impl="auto"):
        with torch.device(device):
            model = cls(config, attn_impl=attn_impl)
        return model.to(dtype)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", attn_impl="auto") -> "PackedCausalLM":
        """Load a HF checkpoint folder (safetensors or .bin, single or sharded) without a second copy:
        the module is built on the meta device and each tensor, read from the file, is assigned in place."""
        config = ModelConfig.from_hf_config(path)
        with torch.device("meta"):
            model = cls(config, attn_impl=attn_impl)
        return hf_weights.load_weights(model, path, dtype, device)

    def save_pretrained(self, path, max_shard_bytes: int = hf_weights.MAX_SHARD_BYTES):
        """Write config.json + safetensors that transformers loads (sharded with an index above max_shard_bytes)."""
        hf_weights.save_weights(path, hf_weights.full_state_dict(self), self.config, max_shard_bytes=max_shard_bytes)
