"""GPU: PackedCausalLM in bf16 on the GPU backends (torch varlen, flash-attn, or the fallback a variant needs),
for every supported architecture: against transformers in float32 per conversation (logits and gradients; with
compiled decoder layers too), packed against each conversation alone, and isolation (perturbing one conversation
leaves the others bit-identical).
"""
import pytest
import torch
import transformers

from ochat.model.config import ModelConfig
from ochat.model.decoder import PackedCausalLM
from tests.helpers.models import rope_pairs

pytestmark = pytest.mark.gpu

SHAPE = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2,
             vocab_size=1000, max_position_embeddings=1024)
GEMMA = dict(hidden_act="gelu_pytorch_tanh", head_dim=128, query_pre_attn_scalar=96, sliding_window=256,
             layer_types=("sliding_attention", "full_attention"), tie_word_embeddings=True)
GPU_VARIANTS = {
    "llama": dict(),
    "mistral": dict(model_type="mistral", sliding_window=256),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=96),
    "gemma2": dict(model_type="gemma2", attn_logit_softcapping=1.0, final_logit_softcapping=5.0, **GEMMA),
    "gemma3": dict(model_type="gemma3_text", rope_theta=1e6, rope_local_base_freq=1e4,
                   rope_scaling=rope_pairs(rope_type="linear", factor=8.0), **GEMMA),
    "phi3": dict(model_type="phi3", partial_rotary_factor=0.75, max_position_embeddings=4096, rope_scaling=rope_pairs(
        rope_type="longrope", original_max_position_embeddings=512, short_factor=[1.0 + 0.05 * i for i in range(24)],
        long_factor=[1.0 + 0.5 * i for i in range(24)])),
    "olmo2": dict(model_type="olmo2"),
}
LENGTHS = [1, 300, 1024, 77, 513]  # Phi-3 case: 1024 and 513 are above the original context (long factors)


def build(name):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    torch.manual_seed(0)
    cfg = ModelConfig.debug(**dict(SHAPE, **GPU_VARIANTS[name]))
    ours = PackedCausalLM.from_config(cfg, dtype=torch.bfloat16, device="cuda", attn_impl="auto")
    with torch.no_grad():  # non-trivial norms and biases
        for n, p in ours.named_parameters():
            if n.endswith("norm.weight") or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return cfg, ours


def pack(cfg, lengths=LENGTHS):
    seqs = [torch.randint(0, cfg.vocab_size, (n,), device="cuda") for n in lengths]
    pos = torch.cat([torch.arange(n, device="cuda") for n in lengths])
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    return seqs, torch.cat(seqs), pos, cu, max(lengths)


def transformers_twin(cfg, ours, dtype):
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_config())
    hf_cfg._attn_implementation = "eager"  # soft-capping and windows as transformers defines them
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).to(dtype).cuda()
    missing, unexpected = hf.load_state_dict({k: v.to(dtype) for k, v in ours.state_dict().items()}, strict=False)
    assert not unexpected and all("inv_freq" in m for m in missing), (missing, unexpected)
    return hf


@pytest.mark.parametrize("name", list(GPU_VARIANTS))
def test_bf16_packed_matches_transformers_per_conversation(name):
    cfg, ours = build(name)
    check_against_transformers(name, cfg, ours)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_bf16_compiled_layers_match_transformers_per_conversation(name):
    """compile_layers on the GPU: the compiler's norms, RoPE and GLU around the attention kernel, half the layers
    recomputed."""
    cfg, ours = build(name)
    ours.compile_layers()
    ours.gradient_checkpointing_enable(0.5)
    ours.train()
    check_against_transformers(name, cfg, ours)


@pytest.mark.parametrize("name, mode", [("llama", "selective"), ("gemma2", "selective"), ("qwen3", "selective-attention")])
def test_bf16_selective_recompute_matches_transformers_per_conversation(name, mode):
    """Selective recompute on the GPU (the fused kernels and the attention backend rerun or kept under PyTorch's
    selective checkpointing): the same logits and gradients as transformers in float32."""
    cfg, ours = build(name)
    ours.gradient_checkpointing_enable(1.0, mode)
    ours.train()
    check_against_transformers(name, cfg, ours)


def check_against_transformers(name, cfg, ours):
    """Logits and gradients of `ours` (bf16, packed) against transformers in float32, conversation by conversation."""
    hf32 = transformers_twin(cfg, ours, torch.float32)  # float32 truth
    hf16 = transformers_twin(cfg, ours, torch.bfloat16)
    seqs, ids, pos, cu, mx = pack(cfg)
    logits = ours(ids, pos, cu, mx).float()
    offs = cu.tolist()
    for i, s in enumerate(seqs):
        with torch.no_grad():
            ref = hf32(input_ids=s[None]).logits[0]
            base = hf16(input_ids=s[None]).logits[0].float()
        err = (logits[offs[i]:offs[i + 1]].detach() - ref).norm() / ref.norm()
        base_err = (base - ref).norm() / ref.norm()
        # bf16 tolerance: no worse than transformers' own bf16 error (x2) plus 1e-2 relative
        assert err <= 2 * base_err + 1e-2, (name, i, err.item(), base_err.item())
    # gradients: bf16 packed vs float32 per conversation
    proj = torch.randn_like(logits)
    (logits * proj).sum().backward()
    for i, s in enumerate(seqs):
        (hf32(input_ids=s[None]).logits[0] * proj[offs[i]:offs[i + 1]]).sum().backward()
    ref_params = dict(hf32.named_parameters())
    for n, p in ours.named_parameters():
        g, r = p.grad.float(), ref_params[n].grad
        assert ((g - r).norm() / r.norm()).item() < 5e-2, (name, n)


@pytest.mark.parametrize("name", list(GPU_VARIANTS))
def test_bf16_packed_equals_alone_and_conversations_are_isolated(name):
    cfg, ours = build(name)
    seqs, ids, pos, cu, mx = pack(cfg)
    with torch.no_grad():
        a = ours(ids, pos, cu, mx).float()
        for i, s in enumerate(seqs):
            alone = ours(s, torch.arange(len(s), device="cuda"), torch.tensor([0, len(s)], dtype=torch.int32,
                                                                             device="cuda"), len(s)).float()
            err = ((a[cu[i]:cu[i + 1]] - alone).norm() / alone.norm()).item()
            assert err < 1e-2, (name, i, err)  # bf16 rounding of other GEMM shapes only
        changed = ids.clone()
        changed[cu[1]:cu[2]] = (changed[cu[1]:cu[2]] + 1) % cfg.vocab_size
        changed[cu[3]:cu[4]] = (changed[cu[3]:cu[4]] + 5) % cfg.vocab_size
        b = ours(changed, pos, cu, mx).float()
    for i in (0, 2, 4):
        assert torch.equal(a[cu[i]:cu[i + 1]], b[cu[i]:cu[i + 1]]), (name, i)
    assert not torch.equal(a[cu[3]:cu[4]], b[cu[3]:cu[4]])
