"""GPU: PackedCausalLM in bf16 with the torch varlen (or flash-attn) backend against transformers per conversation."""
import pytest
import torch
import transformers

from ochat.training.model import PackedCausalLM
from ochat.training.model_config import ModelConfig

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("mistral", {"sliding_window": 256}),
                                              ("qwen2", {"qkv_bias": True})])
def test_bf16_packed_matches_transformers_per_conversation(model_type, extra):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    torch.manual_seed(0)
    cfg = ModelConfig.debug(model_type=model_type, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                            num_key_value_heads=2, num_hidden_layers=2, vocab_size=1000, max_position_embeddings=1024, **extra)
    ours = PackedCausalLM.from_config(cfg, dtype=torch.bfloat16, device="cuda", attn_impl="auto")
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_config())
    hf_cfg._attn_implementation = "sdpa"
    cls = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    hf = getattr(transformers, cls)(hf_cfg)
    hf.load_state_dict(ours.state_dict(), strict=False)
    hf32 = hf.float().cuda()  # float32 truth
    hf16 = getattr(transformers, cls)(hf_cfg).to(torch.bfloat16).cuda()
    hf16.load_state_dict(ours.state_dict(), strict=False)

    lengths = [1, 300, 1024, 77, 513]
    seqs = [torch.randint(0, cfg.vocab_size, (n,), device="cuda") for n in lengths]
    ids = torch.cat(seqs)
    pos = torch.cat([torch.arange(n, device="cuda") for n in lengths])
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    logits = ours(ids, pos, cu, max(lengths)).float()
    offs = cu.tolist()
    for i, s in enumerate(seqs):
        with torch.no_grad():
            ref = hf32(input_ids=s[None]).logits[0]
            base = hf16(input_ids=s[None]).logits[0].float()
        err = (logits[offs[i]:offs[i + 1]].detach() - ref).norm() / ref.norm()
        base_err = (base - ref).norm() / ref.norm()
        # bf16 tolerance: no worse than transformers' own bf16 error (x2) plus 1e-2 relative
        assert err <= 2 * base_err + 1e-2, (i, err.item(), base_err.item())
    # gradients: bf16 packed vs float32 per conversation
    proj = torch.randn_like(logits)
    (logits * proj).sum().backward()
    for i, s in enumerate(seqs):
        (hf32(input_ids=s[None]).logits[0] * proj[offs[i]:offs[i + 1]]).sum().backward()
    ref_params = dict(hf32.named_parameters())
    for n, p in ours.named_parameters():
        g, r = p.grad.float(), ref_params[n].grad
        assert ((g - r).norm() / r.norm()).item() < 5e-2, n
