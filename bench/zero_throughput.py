"""Multi-GPU throughput under DeepSpeed ZeRO: ochat vs transformers + varlen attention, same packs.

    python bench/zero_throughput.py --gpus 2 --shape 7b --out $OUT       # driver: one launch per implementation
    python bench/zero_throughput.py --gpus 2 --shape tiny --steps 2      # smoke test of the harness (CPU ranks)

The driver runs `deepspeed --num_gpus N bench/zero_throughput.py --worker --impl IMPL ...` once per
implementation (a fresh process each: a 7B engine is not torn down cleanly inside one process), then
prints one table. Both implementations get the same model shape (random init), the same conversations
(bench/throughput.py's heavy-tailed synthetic lengths up to 4,096 plus the bundled sample) packed per
rank by the multipack sampler into --pack-tokens per GPU, ochat's shipped DeepSpeed config (zero2 by
default: bf16, fp32 master weights, gradient clipping 1.0), torch fused AdamW and the same decay groups,
and activation checkpointing as chosen (`--ckpt on|off`, or for ochat a fraction of the layers, e.g. 0.5):
  ochat       PackedCausalLM (defaults: fused kernels, loss on target rows only), stepped by the trainer's own
              step (ochat.training.step.train_step)
  hf_varlen   transformers LlamaForCausalLM on a packed row, torch varlen_attn through the attention
              interface with cu_seq_lens (TRL's padding-free mode; the strongest peer)
Reported per GPU: real tokens/s, MFU (model FLOPs with the causal attention term / 790 TFLOP/s), peak memory.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import shapes  # noqa: E402  (same folder)
import throughput  # noqa: E402  (same folder: data, model builders, loss functions, FLOPs)

SHAPES = dict(throughput.SHAPES, **{"7b": shapes.llama2_7b(vocab_size=32000)})  # Llama 2's own vocabulary
IMPLS = ("ochat", "hf_varlen")


def worker(args):
    import deepspeed
    import torch.distributed as dist

    from ochat.config.deepspeed import load_deepspeed_config
    from ochat.training.engine import weight_decay_groups
    from ochat.training.multipack_sampler import MultipackDistributedBatchSampler
    from ochat.training.runtime import init_distributed
    from ochat.training.step import train_step

    cuda = torch.cuda.is_available()
    init_distributed(cuda)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    shape = SHAPES[args.shape]
    ckpt = {"on": 1.0, "off": 0.0}.get(args.ckpt) if args.ckpt in ("on", "off") else float(args.ckpt)
    if args.impl == "hf_varlen" and ckpt not in (0.0, 1.0):
        raise SystemExit("transformers checkpoints all layers or none: --ckpt on or off")

    convs, _ = throughput.make_conversations(args.conversations, shape.vocab_size, 4096)
    lengths = np.array([len(t) for t, _ in convs])
    sampler = MultipackDistributedBatchSampler(lengths=lengths, batch_max_length=args.pack_tokens, num_replicas=world,
                                               rank=rank, seed=0)
    sampler.set_epoch(0)
    packs = [[convs[i] for i in p] for p in list(sampler)[: args.warmup + args.steps]]
    if len(packs) < args.warmup + args.steps:
        raise SystemExit(f"only {len(packs)} packs per rank: raise --conversations")

    dev = device.type
    if args.impl == "ochat":
        model = throughput.build_ochat(shape, dev, ckpt)
    else:
        throughput._register_varlen()
        model = throughput.build_hf(shape, "ochat_varlen", dev, ckpt)
    if not cuda:
        model.float()  # CPU smoke runs: DeepSpeed's bf16 mode is off there
    optimizer = torch.optim.AdamW(weight_decay_groups(model, 0.1), lr=1e-5, betas=(0.9, 0.95), eps=1e-5, fused=cuda)
    ds_config = load_deepspeed_config(args.zero, grad_accum=1, grad_clip=1.0, bf16=cuda)
    ds_config["zero_allow_untested_optimizer"] = True
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    def step(items):
        b = throughput.collate(items)
        if args.impl == "ochat":
            train_step(engine, [b], world)
        else:
            engine.backward(throughput.hf_varlen_loss(engine, b, device))
            engine.step()

    for items in packs[: args.warmup]:
        step(items)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    t0 = time.perf_counter()
    for items in packs[args.warmup:]:
        step(items)
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    seconds = time.perf_counter() - t0
    timed = packs[args.warmup:]
    totals = torch.tensor([sum(len(t) for p in timed for t, _ in p), throughput.model_flops(shape, timed),
                           torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0],
                          dtype=torch.float64, device=device)
    peak = totals[2:].clone()
    dist.all_reduce(totals)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        res = dict(impl=args.impl, shape=args.shape, gpus=world, zero=args.zero, ckpt=ckpt, steps=args.steps,
                   pack_tokens=args.pack_tokens, seconds=seconds, tokens=int(totals[0]),
                   tokens_per_s_per_gpu=float(totals[0]) / seconds / world,
                   mfu=float(totals[1]) / seconds / world / throughput.PEAK,
                   peak_gb=float(peak[0]) if cuda else None,
                   device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        print("[result]", json.dumps(res), flush=True)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"zero_{args.shape}_{args.impl}_{world}gpu_ckpt-{args.ckpt}.json").write_text(json.dumps(res, indent=1))


def driver(args):
    results = []
    for impl in args.impls.split(","):
        cmd = ["deepspeed", "--num_gpus", str(args.gpus), "--master_port", str(29500 + len(results)), __file__,
               "--worker", "--impl", impl, "--shape", args.shape, "--zero", args.zero, "--ckpt", args.ckpt,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--pack-tokens", str(args.pack_tokens),
               "--conversations", str(args.conversations), "--out", args.out]
        print(" ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        lines = [l for l in (proc.stdout + proc.stderr).splitlines() if "[result]" in l]
        if proc.returncode or not lines:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            print(f"[{impl}] FAILED (exit {proc.returncode})\n{tail}", flush=True)
            results.append(dict(impl=impl, error=tail[-500:]))
            continue
        results.append(json.loads(lines[-1].split("[result]", 1)[1]))
        print(lines[-1], flush=True)
    ok = {r["impl"]: r for r in results if "error" not in r}
    head = next(iter(ok.values()), {})
    md = [f"# ZeRO throughput: {args.shape} shape, {args.gpus} x {head.get('device', '?')}, {args.zero}, "
          f"activation checkpointing {args.ckpt}, {args.pack_tokens}-token packs per GPU, {head.get('date', '')}", "",
          *throughput.results_table("implementation", [(r["impl"], r, ok.get("ochat")) for r in results],
                                    tokens_key="tokens_per_s_per_gpu")]
    text = "\n".join(md)
    print(text, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"zero_{args.shape}_{args.gpus}gpu_ckpt-{args.ckpt}.md").write_text(text + "\n")
    return 0 if len(ok) == len(results) else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--zero", default="zero2", help="ochat DeepSpeed config name or JSON file")
    ap.add_argument("--ckpt", default="on", help="activation checkpointing: on, off, or (ochat) a fraction of the layers")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--pack-tokens", type=int, default=16384, help="tokens per GPU per step")
    ap.add_argument("--conversations", type=int, default=3000)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
