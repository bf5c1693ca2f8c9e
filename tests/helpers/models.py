"""Tiny models of each supported architecture beside their transformers twins, and packs of random conversations."""
import torch
import transformers

from ochat.training.model import PackedCausalLM
from ochat.training.model_config import ModelConfig

LENGTHS = [7, 1, 64, 23, 40]  # includes length 1 and the tiny config's context limit (64)

VARIANTS = {
    "llama2": dict(),
    "llama3_rope_scaling": dict(rope_theta=500000.0, rope_scaling=tuple(sorted(dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16).items()))),
    "mistral_window": dict(model_type="mistral", sliding_window=8),
    "qwen2_bias": dict(model_type="qwen2", qkv_bias=True, rope_theta=1e6),
    "tied": dict(tie_word_embeddings=True),
}
HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def make_pair(name, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig.debug(**VARIANTS[name])
    ours = PackedCausalLM(cfg, attn_impl="sdpa")
    with torch.no_grad():  # non-trivial norms and biases
        for n, p in ours.named_parameters():
            if n.endswith("layernorm.weight") or n.endswith("norm.weight") or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_config())
    hf_cfg._attn_implementation = "eager"
    hf = getattr(transformers, HF_CLASSES[cfg.model_type])(hf_cfg).float()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
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
