"""Tiny models of each supported architecture beside their transformers twins, and packs of random conversations."""
import torch
import transformers

from ochat.kernels.attention import varlen_attention_sdpa
from ochat.model.config import ARCHITECTURES, ModelConfig
from ochat.model.decoder import PackedCausalLM
from ochat.model.experts import to_checkpoint

LENGTHS = [7, 1, 64, 23, 40]  # includes length 1 and the tiny config's context limit (64)


def rope_pairs(**kw):
    """A Hugging Face rope dict as ModelConfig.rope_scaling holds it (sorted pairs, lists as tuples)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kw.items()))


GEMMA = dict(hidden_act="gelu_pytorch_tanh", head_dim=32, query_pre_attn_scalar=20, sliding_window=8,
             layer_types=("sliding_attention", "full_attention"), tie_word_embeddings=True)
VARIANTS = {
    "llama2": dict(),
    "llama3_rope_scaling": dict(rope_theta=500000.0, rope_scaling=rope_pairs(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "mistral_window": dict(model_type="mistral", sliding_window=8),
    "qwen2_bias": dict(model_type="qwen2", rope_theta=1e6),
    "tied": dict(tie_word_embeddings=True),
    # head_dim 24 while hidden / heads = 16; q/k RMSNorm per head
    "qwen3_qk_norm": dict(model_type="qwen3", head_dim=24, rope_theta=1e6),
    # (1 + w) norms before and after attention and MLP, GeGLU, scaled embeddings, query_pre_attn_scalar,
    # small soft-caps (they bend the tiny model's scores and logits), sliding then global layer, tied
    "gemma2": dict(model_type="gemma2", attn_logit_softcapping=0.2, final_logit_softcapping=3.0, **GEMMA),
    # as Gemma 2 without soft-capping, plus q/k norms, a local RoPE base and linear scaling on the global layer
    "gemma3": dict(model_type="gemma3_text", rope_theta=1e6, rope_local_base_freq=100.0,
                   rope_scaling=rope_pairs(rope_type="linear", factor=4.0), **GEMMA),
    # fused qkv_proj / gate_up_proj, LongRoPE (conversations above 16 tokens take the long factors), partial rotary
    "phi3_longrope": dict(model_type="phi3", partial_rotary_factor=0.75, rope_scaling=rope_pairs(
        rope_type="longrope", original_max_position_embeddings=16, short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
        long_factor=[1.5, 2.0, 3.0, 4.0, 6.0, 8.0])),
    # norms after attention and MLP only, q/k RMSNorm over the whole projection
    "olmo2": dict(model_type="olmo2"),
}
HF_CLASSES = {name: arch.hf_class for name, arch in ARCHITECTURES.items()}


def as_in_transformers(name, tensor, cfg) -> dict:
    """An ochat parameter (or its gradient) by the names and layout of transformers' module: the same, but for
    gpt-oss's experts and router (transformers' modules hold the checkpoint's tensors)."""
    if cfg.arch.experts is not None and cfg.arch.experts.fused:
        return to_checkpoint(name, tensor, cfg)
    return {name: tensor}


def make_pair(name, seed=0, variants=VARIANTS):
    """ochat's model of variants[name] (random weights) and transformers' with the same weights (float32, eager)."""
    torch.manual_seed(seed)
    cfg = ModelConfig.debug(**variants[name])
    ours = PackedCausalLM(cfg, attn_impl="sdpa")
    with torch.no_grad():  # non-trivial norms, biases and attention sinks; routers far from ties (std 1)
        for n, p in ours.named_parameters():
            if n.endswith("layernorm.weight") or n.endswith("norm.weight") or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif n.endswith("mlp.gate.weight"):
                p.mul_(50.0)
            elif n.endswith("self_attn.sinks"):
                p.add_(torch.randn_like(p))
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_config())
    hf_cfg._attn_implementation = "eager"
    hf = getattr(transformers, HF_CLASSES[cfg.model_type])(hf_cfg).float()
    state = {k: v for n, t in ours.state_dict().items() for k, v in as_in_transformers(n, t, cfg).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("inv_freq" in m for m in missing), (missing, unexpected)
    if cfg.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return cfg, ours, hf


def make_pack(cfg, lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lengths]
    ids = torch.cat(seqs)
    pos = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return seqs, ids, pos, cu, max(lengths)


def assert_close(a, b, rtol=1e-5, what=""):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= rtol * max(scale, 1e-6) + 1e-7, f"{what}: max abs err {err:.3g} vs scale {scale:.3g}"


def packed_equals_alone(model, cfg, what: str):
    """Run `model` on a pack of fresh conversations and check each conversation's slice against the conversation
    run alone (rtol 1e-6); -> the pack (seqs, ids, pos, cu, max_seqlen) and the packed output."""
    seqs, ids, pos, cu, mx = make_pack(cfg)
    with torch.no_grad():
        packed = model(ids, pos, cu, mx)
        for i, s in enumerate(seqs):
            alone = model(s, torch.arange(len(s)), torch.tensor([0, len(s)], dtype=torch.int32), len(s))
            assert_close(packed[cu[i]:cu[i + 1]], alone, rtol=1e-6, what=f"{what} conversation {i} packed vs alone")
    return (seqs, ids, pos, cu, mx), packed


def leaky_attention(q, k, v, cu_seqlens, max_seqlen=None, window=None, backend=None, **variant):
    """Attention across the whole pack, ignoring conversation boundaries: what the isolation checks must catch."""
    whole = torch.tensor([0, q.shape[0]], dtype=torch.int32)
    return varlen_attention_sdpa(q, k, v, whole, window=window, **variant)
