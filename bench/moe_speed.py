"""Forward+backward speed of ochat's mixture-of-experts decoder vs transformers v5 on the Qwen3-30B-A3B layer shape.

    python bench/moe_speed.py [--layers 8] [--steps 8] [--out DIR]      # one GPU, bf16
    python bench/moe_speed.py --tiny                                     # CPU smoke run (tiny shape, float32)

The shape: hidden 2048, GQA 32/4 of head_dim 128, 128 experts of intermediate 768, top-8 renormalised, vocabulary
151,936; `--layers` of its 48 decoder layers (weights, gradients and activations of all 48 do not fit one GPU).
Same sequences for both: OpenChat V1-like lengths (bench/model_speed.py) greedily packed into `--budget`-token
packs. ochat: each pack flat (varlen attention, experts sorted once, grouped GEMMs or `--ochat-experts loop`).
transformers, with its `experts_implementation` (grouped_mm by default): each pack's sequences as one padded batch
(SDPA, attention_mask), and each pack as one packed row (position_ids, cu_seq_lens: FlashAttention-4 where
installed, else torch's varlen_attn, through the attention interface as bench/throughput.py registers it) with
Liger's Qwen3-MoE kernels where its version has them: the strongest peer configuration. All train on weighted CE + router_aux_loss_coef x the load-balancing loss; no optimizer.
Tokens/s counts real tokens; MFU counts the active parameters (router, top-8 experts) against 790 TFLOP/s
(`ModelConfig.flops_per_token`). Prints a table; writes moe_speed.json / moe_speed.md under --out ($OUT).
"""
import argparse
import gc
import json
import os
import time

import numpy as np
import throughput  # same folder: transformers' packed-row attention functions
import torch
from model_speed import hf_batch, make_packs, ochat_batch, run, v1_lengths

from ochat.model.config import ModelConfig
from ochat.model.decoder import PackedCausalLM
from ochat.model.experts import Experts


def qwen3_30b_a3b(layers: int) -> ModelConfig:
    """Qwen3-30B-A3B's shape with `layers` decoder layers."""
    return ModelConfig(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                       moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                       num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                       max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6, router_aux_loss_coef=0.001,
                       bos_token_id=None, eos_token_id=151645)


TINY = ModelConfig.debug(model_type="qwen3_moe", vocab_size=512, max_position_embeddings=4096, num_experts=8,
                         num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                         router_aux_loss_coef=0.001)


def ochat_step(model, b):
    out = model(**b)
    (out.weighted_loss + out.aux_loss).backward()
    model.zero_grad(set_to_none=True)


def hf_packed_batch(pack, vocab, dev):
    """One pack as transformers' packed row: position_ids restart per sequence, cu_seq_lens for varlen attention,
    labels unshifted (transformers shifts them) with each sequence's first token ignored."""
    b = ochat_batch(pack, vocab, dev)
    cu, ids = b["cu_seqlens"], b["input_ids"]
    labels = ids.clone()
    labels[cu[:-1].long()] = -100
    return dict(input_ids=ids[None], position_ids=b["position_ids"][None], labels=labels[None], cu_seq_lens_q=cu,
                cu_seq_lens_k=cu, max_length_q=b["max_seqlen"], max_length_k=b["max_seqlen"])


def apply_liger_qwen3_moe() -> bool:
    """Liger's kernels on transformers' Qwen3-MoE (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy), if this
    Liger version has them; they patch the classes for the whole process."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3_moe
    except ImportError:
        return False
    apply_liger_kernel_to_qwen3_moe(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    return True


def build_hf(cfg: ModelConfig, attn: str, experts: str, state: dict, dtype, dev):
    """transformers' model of `cfg` with ochat's weights `state`, in training mode."""
    import transformers

    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_config())
    with torch.device(dev):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn,
                                                           experts_implementation=experts).to(dtype)
    hf.load_state_dict(state, strict=False)
    hf.config.use_cache = False
    hf.train()
    return hf


def hf_step(model, b):
    model(**b, output_router_logits=True).loss.backward()
    model.zero_grad(set_to_none=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny Qwen3-MoE, float32, 2 steps")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget", type=int, default=16384)
    ap.add_argument("--ochat-experts", default="auto", choices=("auto", "grouped", "loop"))
    ap.add_argument("--hf-experts", default="grouped_mm", help="transformers' experts_implementation")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    import transformers

    if args.tiny:
        dev, dtype, cfg = "cpu", torch.float32, TINY
        args.steps, args.warmup, args.budget = 2, 1, 256
    else:
        dev, dtype, cfg = "cuda", torch.bfloat16, qwen3_30b_a3b(args.layers)
    rng = np.random.default_rng(0)
    lengths = rng.integers(8, 64, 200) if args.tiny else v1_lengths(400, rng)
    packs = make_packs(lengths, args.budget)[: args.warmup + args.steps]
    results = []

    torch.manual_seed(0)
    model = PackedCausalLM.from_config(cfg, dtype=dtype, device=dev, attn_impl="auto")
    for m in model.modules():
        if isinstance(m, Experts):
            m.impl = args.ochat_experts
    model.train()
    batches = [ochat_batch(p, cfg.vocab_size, dev) for p in packs]
    results.append(run(f"ochat packed, experts {args.ochat_experts}", model, batches, ochat_step, args.warmup,
                         args.steps, cfg, lambda b: (b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).tolist(), dev))
    state = model.state_dict()
    del model, batches
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()

    hf = build_hf(cfg, "sdpa", args.hf_experts, state, dtype, dev)
    hbatches = [hf_batch(p, cfg.vocab_size, dev) for p in packs]
    results.append(run(f"transformers padded (SDPA), experts {args.hf_experts}", hf, hbatches, hf_step,
                         args.warmup, args.steps, cfg, lambda b: b["attention_mask"].sum(1).tolist(), dev))
    del hf, hbatches
    gc.collect()

    from ochat.kernels.attention import available

    throughput._register_varlen()
    attn = "ochat_fa4" if dev == "cuda" and available("flash_attn_4", dev) else "ochat_varlen" if dev == "cuda" \
        else "ochat_sdpa"
    liger = apply_liger_qwen3_moe() if dev == "cuda" else False
    hf = build_hf(cfg, attn, args.hf_experts, state, dtype, dev)
    hbatches = [hf_packed_batch(p, cfg.vocab_size, dev) for p in packs]
    name = f"transformers packed row ({throughput.HF_ATTENTION[attn]}{', Liger' if liger else ''}), experts " \
           f"{args.hf_experts}"
    results.append(run(name, hf, hbatches, hf_step, args.warmup, args.steps, cfg,
                         lambda b: (b["cu_seq_lens_q"][1:] - b["cu_seq_lens_q"][:-1]).tolist(), dev))
    del state

    meta = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__,
                transformers=transformers.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                layers=cfg.num_hidden_layers, budget=args.budget, packs=len(packs),
                mean_len=float(np.mean([n for p in packs for n in p])),
                active_params=cfg.num_params(active=True), params=cfg.num_params())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "moe_speed.json"), "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=2)
    shape = "tiny Qwen3-MoE, float32" if args.tiny else f"Qwen3-30B-A3B shape, {cfg.num_hidden_layers} layers, bf16"
    lines = [f"{meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, {meta['date']}; "
             f"{shape}, fwd+bwd, {args.budget}-token packs, mean length {meta['mean_len']:.0f}",
             "", "| configuration | tokens/s | MFU | peak GB |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['config']} | {r['tokens_per_s']:.0f} | "
              + (f"{r['mfu']:.1%} | {r['peak_gb']:.1f} |" if r["mfu"] is not None else "- | - |") for r in results]
    with open(os.path.join(args.out, "moe_speed.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
