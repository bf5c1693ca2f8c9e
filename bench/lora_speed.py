"""LoRA and QLoRA training speed: ochat against transformers + peft + Liger, one process, one GPU.

    python bench/lora_speed.py --out $OUT                          # 1.1B and Llama 3 8B shapes, ranks 16 and 64
    python bench/lora_speed.py --shapes 8b --ranks 16 --ckpt on --out $OUT
    python bench/lora_speed.py --tiny --out /tmp/lora_speed         # smoke test of the harness (CPU or GPU)

The packs of bench/throughput.py (heavy-tailed synthetic conversations + the bundled ShareGPT sample, 16k-token
packs by the multipack sampler), the same ones for every configuration of a shape; one optimizer step per pack.
Configurations, each at every --ranks rank, adapters on every linear layer of the decoder layers (q, k, v, o,
gate, up, down), alpha 2 x rank, no dropout:
  ochat_lora       PackedCausalLM with --lora-rank's adapters (each wrapped layer one autograd node:
                   ochat.kernels.lora_linear), FlashAttention-4 where installed, else torch varlen_attn (FA2)
  ochat_lora_peft  the same with peft's own forward of the wrapped layers (what ochat ran before the one-node
                   layer): what that layer buys
  ochat_qlora      ochat_lora on the base quantised to 4-bit NF4 (--qlora)
  hf_peft          LlamaForCausalLM wrapped by peft (get_peft_model, same targets, rank and alpha), Liger kernels
                   (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) where installed, the packed row with
                   FlashAttention-4 through transformers' attention interface where installed, else torch varlen_attn
                   (FA2; on the CPU SDPA per conversation): throughput.py's hf_liger_fa4 / hf_liger peer
  ochat_full       full fine-tuning of the same model (AdamW over every weight), for LoRA's speedup over it
Both sides: bf16 base; adapters held, computed and stepped in bf16 by AdamW over the adapters alone (the trainer's
DeepSpeed engine computes them in bf16 too, from a float32 master copy whose step, a few MB here, is not timed);
activation checkpointing of every decoder layer on both sides or on neither (--ckpt on/off), or selective on ochat's
LoRA models against every layer on the peer's (--ckpt selective: the peer has no selective mode).
MFU counts LoRA's FLOPs: 4 N per token for the frozen base (forward and input gradient of every matmul weight
outside the embedding, lm_head included; no weight gradient) + causal attention forward and backward (as
ModelConfig.flops_per_token) + 6 per adapter weight; ochat_full counts 6 N. Peak memory:
torch.cuda.max_memory_allocated from after the build. Writes lora_speed.json and lora_speed.md into --out and
prints the table last. On an H200: about 4-6 minutes for both shapes at both ranks (each configuration: build,
2 warm-up and 5 timed steps; full fine-tuning of the 8B shape without checkpointing may not fit: its row then
says so and the others run).
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from functools import partial
from pathlib import Path

import throughput  # same folder: packs, collate, the transformers peer, the timing loop
import torch
from shapes import SHAPES

from ochat.model import lora
from ochat.model.config import ModelConfig

CONFIGS = ("ochat_lora", "ochat_lora_peft", "ochat_qlora", "hf_peft", "ochat_full")
DEFAULT_CONFIGS = ",".join(CONFIGS)


def lora_flops(config: ModelConfig, packs, model) -> float:
    """Training FLOPs of the packs with the base frozen: 4 N per token (6 N less the weight gradients) + attention
    + 6 per trainable adapter weight."""
    tokens = sum(len(t) for p in packs for t, _ in p)
    n_matmul = config.num_params(embeddings=False) + config.vocab_size * config.hidden_size
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return throughput.model_flops(config, packs) - 2 * n_matmul * tokens + 6 * adapters * tokens


OCHAT_RECOMPUTE = {"off": 0.0, "on": 1.0, "selective": "selective"}  # --ckpt: ochat's LoRA models' recompute


def adapters_to_bf16(model) -> None:
    """Hold the trainable adapters in bf16, as the trainer's DeepSpeed engine computes them."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.bfloat16()


def build_ochat_lora(config: ModelConfig, device, ckpt: str, rank: int, *, qlora=False, peft_forward=False,
                     attn_impl="auto"):
    """ochat's model with LoRA adapters of `rank` on every decoder linear (and --qlora's NF4 base), its decoder
    layers checkpointed as --ckpt says."""
    from ochat.model import ModelTransforms, PackedCausalLM, apply_transforms

    torch.manual_seed(0)
    with torch.device(device):
        model = PackedCausalLM(config, attn_impl=attn_impl).to(torch.bfloat16)
    apply_transforms(model, ModelTransforms(lora_rank=rank, qlora=qlora, recompute=OCHAT_RECOMPUTE[ckpt]))
    if peft_forward:
        for layer in lora.wrapped_layers(model):
            del layer.forward  # back to peft's lora.Linear.forward
    adapters_to_bf16(model)
    model.train()
    return model


def build_hf_peft(config: ModelConfig, device, ckpt: str, rank: int, attn: str):
    """transformers' Llama wrapped by peft with the adapters ochat's --lora-rank makes."""
    import peft

    model = throughput.build_hf(config, attn, device, ckpt != "off")  # non-reentrant: no input gradient needed
    cfg = lora.lora_config(model, rank, lora.default_alpha(rank), 0.0, "all")  # ochat's: the same layer names
    model = peft.get_peft_model(model, cfg, autocast_adapter_dtype=False)
    adapters_to_bf16(model)
    model.train()
    return model


def peer_attention(device: str, fa4: bool) -> tuple[str, str]:
    """(the transformers attention name, its label): FlashAttention-4, else torch varlen_attn, on the CPU SDPA."""
    throughput._register_varlen()
    if device != "cuda":
        return "ochat_sdpa", "sdpa"
    return ("ochat_fa4", "fa4") if fa4 else ("ochat_varlen", "fa2")


def liger_applied() -> bool:
    """Liger's kernels patched into transformers' Llama, when installed (False: the peer runs without them)."""
    try:
        throughput._apply_liger()
    except ImportError:
        print("[peer] liger_kernel not installed: hf_peft runs without Liger", flush=True)
        return False
    return True


def runs_of(shape: str, config: ModelConfig, configs: list[str], ranks: list[int], device: str, ckpt: str,
            fa4: bool, peer: tuple[str, str], liger: bool, pack_tokens: int):
    """(name, rank, build, make_step, flops) of every configuration asked for one shape."""
    attn_impl = "flash_attn_4" if fa4 else "auto"
    ochat_step = partial(throughput.ochat_step_fn, device=device)
    out = []
    for rank in ranks:
        for key in [c for c in configs if c != "ochat_full"]:
            if key == "hf_peft":
                label = f"hf_peft ({peer[1]}{', Liger' if liger else ''})"
                build = partial(build_hf_peft, config, device, ckpt, rank, peer[0])
                make_step = partial(throughput.hf_step_fn, "varlen", device=device, pack_tokens=pack_tokens)
            else:
                label, make_step = key, ochat_step
                build = partial(build_ochat_lora, config, device, ckpt, rank, qlora=key == "ochat_qlora",
                                peft_forward=key == "ochat_lora_peft", attn_impl=attn_impl)
            out.append((f"{shape} r{rank} {label}", key, rank, build, make_step, lora_flops))
    if "ochat_full" in configs:
        out.append((f"{shape} full fine-tuning", "ochat_full", 0,
                    partial(throughput.build_ochat, config, device, ckpt != "off", attn_impl), ochat_step, None))
    return out


def table(results: list[dict]) -> list[str]:
    """Markdown rows: tokens/s, the ratios to hf_peft of the same shape and rank and to full fine-tuning of the
    same shape, MFU, peak memory."""
    ok = [r for r in results if "tokens_per_s" in r]
    peers = {(r["shape"], r["rank"]): r for r in ok if r["config"] == "hf_peft"}
    full = {r["shape"]: r for r in ok if r["config"] == "ochat_full"}

    def ratio(r, other):
        return f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}x" if other and other is not r else "-"

    lines = ["| configuration | tokens/s | / hf_peft | / full fine-tuning | MFU | peak GiB |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:80]} | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['tokens_per_s']:.0f} | {ratio(r, peers.get((r['shape'], r['rank'])))} | "
                     f"{ratio(r, full.get(r['shape']))} | {100 * r['mfu']:.1f}% | {r['peak_gb'] or 0:.1f} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1b,8b", help=f"comma-separated, of {', '.join(sorted(SHAPES))}")
    ap.add_argument("--ranks", default="16,64", help="comma-separated LoRA ranks")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--ckpt", choices=sorted(OCHAT_RECOMPUTE), default="off",
                    help="activation checkpointing of every decoder layer, on both sides; selective: ochat's LoRA "
                         "layers selectively, the peer and full fine-tuning fully (the peer has no selective mode)")
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps per configuration")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--pack-tokens", type=int, default=16384)
    ap.add_argument("--conversations", type=int, default=300, help="synthetic conversations (plus the sample)")
    ap.add_argument("--tiny", action="store_true", help="tiny shape, 2 steps, 2k-token packs: a smoke test")
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    if args.tiny:
        args.shapes, args.steps, args.warmup, args.pack_tokens = "tiny", 2, 1, 2048
    shapes, configs = args.shapes.split(","), args.configs.split(",")
    ranks = [int(r) for r in args.ranks.split(",")]
    if set(shapes) - set(SHAPES) or set(configs) - set(CONFIGS) or min(ranks) < 1:
        ap.error(f"--shapes of {', '.join(sorted(SHAPES))}; --configs of {', '.join(CONFIGS)}; --ranks >= 1")

    import peft
    import transformers

    from ochat.kernels.attention import available

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fa4 = available("flash_attn_4", device)
    ckpt = args.ckpt
    peer = peer_attention(device, fa4)
    liger = "hf_peft" in configs and liger_applied()  # ochat's model is not transformers': Liger leaves it alone
    info = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                transformers=transformers.__version__, peft=peft.__version__,
                device=torch.cuda.get_device_name() if device == "cuda" else "cpu", flash_attn_4=fa4, liger=liger,
                ckpt=ckpt, pack_tokens=args.pack_tokens, steps=args.steps, warmup=args.warmup)
    print(json.dumps(info), flush=True)

    results = []
    for shape in shapes:
        config = SHAPES[shape]
        convs, _ = throughput.make_conversations(args.conversations, config.vocab_size, min(4096, args.pack_tokens))
        packs = throughput.make_packs(convs, args.pack_tokens, args.steps + args.warmup)
        if len(packs) < args.steps + args.warmup:
            ap.error(f"{len(packs)} packs of {args.pack_tokens} tokens: raise --conversations")
        print(f"[data] {shape}: {sum(len(t) for p in packs[args.warmup:] for t, _ in p)} timed tokens in "
              f"{args.steps} packs", flush=True)
        for name, key, rank, build, make_step, flops in runs_of(shape, config, configs, ranks, device, ckpt, fa4,
                                                                 peer, liger, args.pack_tokens):
            row = dict(name=name, shape=shape, config=key, rank=rank)
            try:
                res, model, opt, one = throughput.run_config(name, build, make_step, packs, args.warmup, device,
                                                             config, flops)
                row.update(res, name=name)
                del model, opt, one
            except Exception as e:  # noqa: BLE001  (one configuration failing must not lose the others)
                import traceback

                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            results.append(row)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()

    lines = [f"# LoRA speed ({info['device']}, {info['date']}, torch {info['torch']}, transformers "
             f"{info['transformers']}, peft {info['peft']})", "",
             f"{args.steps} timed steps of <= {args.pack_tokens}-token packs after {args.warmup} warm-up; "
             f"activation checkpointing {ckpt} (peer: {'on' if ckpt != 'off' else 'off'}); peer attention {peer[1]}, "
             f"Liger {'on' if liger else 'absent'}; MFU on LoRA's 4N + attention basis (ochat_full: 6N).", "",
             *table(results)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora_speed.md").write_text("\n".join(lines) + "\n")
    (out / "lora_speed.json").write_text(json.dumps(dict(info=info, results=results), indent=1))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
