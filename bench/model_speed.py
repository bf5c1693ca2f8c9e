"""Forward+backward speed of PackedCausalLM vs transformers (padded, SDPA) on the 1.1B LLaMA shape.

    python bench/model_speed.py [--steps 8] [--out DIR]

Same sequences for both: OpenChat V1-like lengths (mean ~1,550, capped at 2,048, about half at the cap),
greedily packed into 16k-token packs for ochat; for transformers each pack's sequences form one batch
padded to its longest (SDPA, attention_mask). bf16 weights, fwd+bwd only (no optimizer), activation
checkpointing on and off. Prints a table; writes model_speed.json / model_speed.md under --out ($OUT).
"""
import argparse
import gc
import json
import os
import time

import numpy as np
import torch
from shapes import tinyllama_1b

from ochat.model.decoder import PackedCausalLM
from ochat.training.metrics import PEAK_FLOPS, step_flops

PEAK_BF16 = PEAK_FLOPS["H100"]  # the H100 and H200 share it


def v1_lengths(n, rng):
    """Half at the 2,048 cap, the rest uniform in [128, 2048): mean ~1,550."""
    at_cap = rng.random(n) < 0.5
    return np.where(at_cap, 2048, rng.integers(128, 2048, n))


def make_packs(lengths, budget):
    packs, cur, size = [], [], 0
    for n in lengths:
        if size + n > budget:
            packs.append(cur)
            cur, size = [], 0
        cur.append(int(n))
        size += n
    if cur:
        packs.append(cur)
    return packs


def ochat_batch(pack, vocab, dev):
    ids = torch.randint(0, vocab, (sum(pack),), device=dev)
    pos = torch.cat([torch.arange(n, device=dev) for n in pack])
    cu = torch.tensor([0] + np.cumsum(pack).tolist(), dtype=torch.int32, device=dev)
    labels = torch.roll(ids, -1)
    w = torch.ones(len(ids), device=dev)
    w[cu[1:] - 1] = 0
    tidx = torch.nonzero(w).squeeze(1)
    return dict(input_ids=ids, position_ids=pos, cu_seqlens=cu, max_seqlen=max(pack), labels=labels,
                label_weights=w, target_index=tidx)


def hf_batch(pack, vocab, dev):
    b, L = len(pack), max(pack)
    ids = torch.randint(0, vocab, (b, L), device=dev)
    mask = torch.zeros(b, L, dtype=torch.long, device=dev)
    for i, n in enumerate(pack):
        mask[i, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def run(name, model, batches, step_fn, warmup, steps, cfg, tokens_of, dev="cuda"):
    """Tokens/s, MFU and peak memory of `steps` forward+backward passes after `warmup` (on a CPU, `dev` "cpu":
    tokens/s alone, a smoke run)."""
    cuda = dev == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup):
        step_fn(model, batches[i % len(batches)])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens, flops = 0, 0.0
    for i in range(steps):
        b = batches[(warmup + i) % len(batches)]
        step_fn(model, b)
        lens = tokens_of(b)
        tokens += sum(lens)
        flops += step_flops(cfg, sum(lens), sum(n * n for n in lens))
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    r = dict(config=name, tokens_per_s=tokens / dt, mfu=flops / dt / PEAK_BF16 if cuda else None,
             peak_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else None, steps=steps, tokens=tokens)
    speed = f"MFU {r['mfu']:.1%}  peak {r['peak_gb']:.1f} GB" if cuda else "(CPU)"
    print(f"{name:55s} {r['tokens_per_s']:9.0f} tok/s  {speed}", flush=True)
    return r


def ochat_step(model, b):
    out = model(**b)
    out.weighted_loss.backward()
    model.zero_grad(set_to_none=True)


def hf_step(model, b):
    model(**b).loss.backward()
    model.zero_grad(set_to_none=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget", type=int, default=16384)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    import transformers

    dev = "cuda"
    rng = np.random.default_rng(0)
    lengths = v1_lengths(400, rng)
    packs = make_packs(lengths, args.budget)[: args.warmup + args.steps]
    cfg = tinyllama_1b()
    results = []
    torch.manual_seed(0)
    model = PackedCausalLM.from_config(cfg, dtype=torch.bfloat16, device=dev, attn_impl="auto")
    from ochat.kernels.attention import resolve_backend
    backend = resolve_backend("auto", dev)
    batches = [ochat_batch(p, cfg.vocab_size, dev) for p in packs]
    model.train()
    for ckpt in (True, False):
        model.gradient_checkpointing_enable(1.0 if ckpt else 0.0)
        results.append(run(f"ochat packed ({backend}), ckpt {'on' if ckpt else 'off'}", model, batches, ochat_step,
                           args.warmup, args.steps, cfg, lambda b: (b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).tolist()))
    sd = {k: v for k, v in model.state_dict().items()}
    del model, batches
    gc.collect()
    torch.cuda.empty_cache()
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_config())
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(dev):
        hf = transformers.LlamaForCausalLM(hf_cfg).to(torch.bfloat16)
    hf.load_state_dict(sd, strict=False)
    del sd
    hf.train()
    hbatches = [hf_batch(p, cfg.vocab_size, dev) for p in packs]
    for ckpt in (True, False):
        if ckpt:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_disable()
        results.append(run(f"transformers padded (SDPA), ckpt {'on' if ckpt else 'off'}", hf, hbatches, hf_step,
                           args.warmup, args.steps, cfg, lambda b: b["attention_mask"].sum(1).tolist()))
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), budget=args.budget,
                mean_len=float(np.mean([n for p in packs for n in p])), packs=len(packs),
                seqs_per_pack=float(np.mean([len(p) for p in packs])))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "model_speed.json"), "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=2)
    lines = [f"{meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, {meta['date']}; "
             f"1.1B LLaMA shape, bf16, fwd+bwd, {args.budget}-token packs, mean length {meta['mean_len']:.0f}",
             "", "| configuration | tokens/s | MFU | peak GB |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['config']} | {r['tokens_per_s']:.0f} | {r['mfu']:.1%} | {r['peak_gb']:.1f} |" for r in results]
    with open(os.path.join(args.out, "model_speed.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
