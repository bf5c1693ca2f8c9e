"""Long single conversations on one GPU: tokens/s, MFU and peak memory of the trainer's step at 32k, 64k, 128k
tokens and the longest that fits, for the 1.1B and the Llama 2 7B (or Llama 3 8B) shapes.

    python bench/long_context.py --out $OUT                  # 1b and 7b, about 8 minutes on one H200
    python bench/long_context.py --shapes 1b,8b --budget-s 900 --out $OUT
    python bench/long_context.py --tiny --out /tmp/lc        # smoke test of the harness on the CPU

Each shape runs in its own process (a 7B engine is not torn down cleanly, and a process the kernel kills for
host memory must not take the others with it), one random-init model, bf16, sequence parallelism 1: a pack is
one conversation of T tokens (the first 5% a prompt of weight 0, the rest targets), stepped by the trainer's
own engine and step (ochat.training.engine.build_engine, ochat.training.step.train_step). Memory plan:
  1b   ZeRO-2 (the whole model and optimizer on the GPU)
  7b   Llama 2 7B shape; 8b: Llama 3 8B. ZeRO-3 with the optimizer (fp32 master weights, Adam moments and
       fp32 gradients: 16 bytes per parameter) partly in CPU memory (DeepSpeed's offload_optimizer `ratio`:
       the share of it that fits --optimizer-host-gb; all of it would not fit a 128 GB host beside the
       activations), the bf16 weights on the GPU
  both --gradient-checkpointing (every layer), --tiled-mlp 16, --offload-activations (their inputs in CPU memory)
Sizes go 32k, 64k, 128k, then doubling up to --max-tokens while they fit: a size that runs out of GPU memory
ends the shape's ascent (the engine is not reused after an OOM), and one between the last that fitted and the
first that did not is tried in a fresh process if time is left; a size whose offloaded activations and
optimizer would pass --host-gb, or whose predicted time (from the last size's, scaled by the FLOPs) passes the
shape's share of --budget-s, is reported as skipped and not run.
Reported per size: tokens/s, MFU (ochat.training.metrics.step_flops / PEAK_FLOPS: model FLOPs, the recompute not
counted), peak GPU memory, seconds per step. Writes long_context.json and long_context.md into --out.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shapes import SHAPES as BENCH_SHAPES  # noqa: E402

from ochat.training.metrics import peak_flops, step_flops  # noqa: E402

SHAPES = dict(BENCH_SHAPES, **{"tiny-zero3": BENCH_SHAPES["tiny"]})  # tiny ones: --tiny's CPU test of both plans
ZERO3_SHAPES = ("7b", "8b", "tiny-zero3")
BUDGET_SHARE = {"1b": 0.4, "7b": 0.6, "8b": 0.6, "tiny": 0.5, "tiny-zero3": 0.5}  # of --budget-s, normalised
STARTS = (32768, 65536, 131072)
TILES = 16
OPTIMIZER_BYTES = 16  # per parameter: fp32 master weight, two Adam moments, fp32 gradient


def conversation(tokens: int, vocab: int) -> dict:
    """One conversation of `tokens` random tokens, collated as a pack: a 5% prompt, then targets."""
    from ochat.training.collate import collate_pack

    rng = np.random.default_rng(tokens)
    weights = np.ones(tokens, np.float32)
    weights[:max(1, tokens // 20)] = 0.0
    return collate_pack([(rng.integers(3, vocab, tokens).astype(np.int32), weights)])


def optimizer_ratio(shape: str, optimizer_host_gb: float) -> float:
    """The share of the optimizer state kept in CPU memory (ZeRO-3's offload_optimizer ratio)."""
    need = OPTIMIZER_BYTES * SHAPES[shape].num_params() / 2**30
    return min(1.0, optimizer_host_gb / need)


def host_gb_needed(shape: str, tokens: int, ratio: float, offload: bool) -> float:
    """CPU memory of the offloaded optimizer share and of the offloaded layer inputs (bf16), in GiB."""
    c = SHAPES[shape]
    activations = c.num_hidden_layers * tokens * c.hidden_size * 2 if offload else 0
    optimizer = OPTIMIZER_BYTES * c.num_params() * ratio if shape in ZERO3_SHAPES else 0
    return (activations + optimizer) / 2**30


# ----------------------------------------------------------------------------- worker: one shape, one process
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine(args, cuda: bool):
    """The trainer's engine for a random-init model of the shape, with the memory plan of the module doc."""
    from ochat.config.deepspeed import load_deepspeed_config
    from ochat.config.train_config import TrainConfig
    from ochat.model import PackedCausalLM, apply_transforms
    from ochat.training.engine import build_engine
    from ochat.training.runtime import Runtime, init_distributed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    init_distributed(cuda)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    cfg = TrainConfig(model_path="random", data_path="-", save_path="-", lr=1e-5, gradient_checkpointing=1.0,
                      tiled_mlp=TILES, offload_activations=cuda)  # on a CPU there is nothing to offload to
    zero3 = args.shape in ZERO3_SHAPES
    ds = load_deepspeed_config("zero3" if zero3 else "zero2", grad_accum=1, grad_clip=1.0, bf16=cuda,
                               transforms=cfg.transforms)
    if zero3:
        ds["zero_optimization"].update(offload_optimizer={"device": "cpu", "pin_memory": cuda, "ratio": args.ratio},
                                       sub_group_size=int(1e8))  # the ratio splits the optimizer by sub-groups
    torch.manual_seed(0)
    model = PackedCausalLM.from_config(SHAPES[args.shape], dtype=torch.bfloat16 if cuda else torch.float32,
                                       device=device)
    apply_transforms(model, cfg.transforms, ds_config=ds)
    rt = Runtime(rank=0, world_size=1, device=device, bf16=cuda, launched=False)
    return build_engine(cfg, rt, model, ds, total_steps=1000, warmup_steps=0), cfg


def worker(args) -> None:
    """Step each size of --sizes in turn; print one `[result] {json}` line per size as soon as it is known."""
    from ochat.training.step import train_step

    cuda = torch.cuda.is_available()
    shape = SHAPES[args.shape]
    t0 = time.time()
    engine, cfg = _engine(args, cuda)
    print(f"[setup] {args.shape}: engine ready in {time.time() - t0:.0f}s", flush=True)
    last = tuple(map(float, args.prior.split(":"))) if args.prior else None  # (tokens, s/step) of the last size run
    warm = False  # the first size run also warms up the kernels (an untimed step)
    for i, tokens in enumerate(args.size_list):
        res = dict(shape=args.shape, tokens=tokens, zero="zero3" if args.shape in ZERO3_SHAPES else "zero2",
                   optimizer_on_cpu=round(args.ratio, 2) if args.shape in ZERO3_SHAPES else 0.0,
                   flags=f"--gradient-checkpointing --tiled-mlp {TILES}"
                         + (" --offload-activations" if cfg.offload_activations else ""))
        host = host_gb_needed(args.shape, tokens, args.ratio, cfg.offload_activations)
        flops = step_flops(shape, tokens, float(tokens) ** 2)
        predicted = last[1] * flops / step_flops(shape, last[0], float(last[0]) ** 2) if last else None
        steps = 1 if predicted is None or predicted > 15 else 2
        if host > args.host_gb:
            print("[result]", json.dumps(dict(res, status=f"skipped: needs ~{host:.0f} GiB of host memory "
                                                         f"(--host-gb {args.host_gb:g})")), flush=True)
            continue
        if predicted is not None and time.time() + predicted * (steps + (not warm)) > args.deadline:
            print("[result]", json.dumps(dict(res, status=f"skipped: time budget (predicted {predicted:.0f} s "
                                                         f"per step)")), flush=True)
            continue
        batch = conversation(tokens, shape.vocab_size)
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            if not warm:
                train_step(engine, [batch], 1)
                warm = True
            stats = [train_step(engine, [batch], 1) for _ in range(steps)]
        except torch.OutOfMemoryError as e:
            print("[result]", json.dumps(dict(res, status="OOM", error=str(e).splitlines()[0][:200])), flush=True)
            for longer in args.size_list[i + 1:]:  # an engine interrupted mid-step is not stepped again
                print("[result]", json.dumps(dict(res, tokens=longer, status="not run: a shorter one ran out of "
                                                                             "GPU memory")), flush=True)
            return
        seconds = sum(s.seconds for s in stats) / len(stats)
        last = (tokens, seconds)
        peak = peak_flops(engine.device)
        print("[result]", json.dumps(dict(
            res, status="ok", steps=steps, seconds_per_step=seconds, tokens_per_s=tokens / seconds,
            mfu=flops / seconds / peak if peak else None, peak_tflops=peak / 1e12 if peak else None, loss=stats[-1].loss,
            peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))), flush=True)


# ----------------------------------------------------------------------------- driver
def _run_worker(args, shape: str, sizes: list[int], ratio: float, deadline: float, prior: str = "") -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", "--shape", shape, "--sizes", ",".join(map(str, sizes)),
           "--ratio", str(ratio), "--deadline", str(deadline), "--host-gb", str(args.host_gb), "--prior", prior]
    print(" ".join(cmd), flush=True)
    results, tail = [], []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    watchdog = threading.Timer(max(1.0, deadline - time.time() + 120), proc.kill)  # a step may overrun its prediction
    watchdog.start()
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-30:]
        if line.startswith(("[result]", "[setup]")):
            print(line.rstrip(), flush=True)
        if line.startswith("[result]"):
            results.append(json.loads(line.split("[result]", 1)[1]))
    code = proc.wait()
    watchdog.cancel()
    if code != 0 and len(results) < len(sizes):  # it died before reporting every size (host OOM kill: -9)
        results += [dict(shape=shape, tokens=t, status=f"worker exited ({code})", error="\n".join(tail)[-600:])
                    for t in sizes[len(results):]]
    return results


def _sizes(max_tokens: int) -> list[int]:
    sizes = list(STARTS)
    while sizes[-1] * 2 <= max_tokens:
        sizes.append(sizes[-1] * 2)
    return sizes


def run_shape(args, shape: str, deadline: float) -> list[dict]:
    """The shape's sizes in one worker, then once the size between the last that fitted and the first that
    did not (a fresh worker: the first one stopped at the OOM)."""
    ratio = optimizer_ratio(shape, args.optimizer_host_gb)
    results = _run_worker(args, shape, args.size_list or _sizes(args.max_tokens), ratio, deadline)
    fitted = [r for r in results if r["status"] == "ok"]
    failed = [r["tokens"] for r in results if r["status"] == "OOM" or r["status"].startswith("worker exited")]
    if fitted and failed and failed[0] > fitted[-1]["tokens"] and time.time() < deadline - 60:
        middle = (fitted[-1]["tokens"] + failed[0]) // 2 // 1024 * 1024
        if middle > fitted[-1]["tokens"]:
            results += _run_worker(args, shape, [middle], ratio, deadline,
                                   prior=f"{fitted[-1]['tokens']}:{fitted[-1]['seconds_per_step']}")
    return sorted(results, key=lambda r: r["tokens"])


def _cells(r: dict) -> str:
    """tokens/s, MFU, peak GPU memory and seconds per step of a finished size (blank where not measured)."""
    mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    peak = "" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.1f}"
    return f"{r['tokens_per_s']:.0f} | {mfu} | {peak} | {r['seconds_per_step']:.1f}"


def table(results: list[dict]) -> list[str]:
    """Markdown table lines, one row per shape and size."""
    lines = ["| shape | tokens | ZeRO (optimizer share on CPU) | status | tokens/s | MFU | peak GPU GiB | s/step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        measured = _cells(r) if r["status"] == "ok" else " | | | "
        lines.append(f"| {r['shape']} | {r['tokens'] / 1024:g}k | {r.get('zero', '')} ({r.get('optimizer_on_cpu', '')}) "
                     f"| {r['status']} | {measured} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1b,7b", help="comma-separated: 1b, 7b (Llama 2), 8b (Llama 3)")
    ap.add_argument("--sizes", dest="size_list", type=lambda s: [int(x) for x in s.split(",")],
                    help="token counts to run instead of 32k, 64k, 128k and doubling")
    ap.add_argument("--max-tokens", type=int, default=1 << 20, help="the longest size tried")
    ap.add_argument("--budget-s", type=float, default=450, help="wall-clock budget of the whole run")
    ap.add_argument("--host-gb", type=float, default=110, help="CPU memory the offloaded state may take (GiB)")
    ap.add_argument("--optimizer-host-gb", type=float, default=56,
                    help="CPU memory for the ZeRO-3 shapes' offloaded optimizer share (GiB)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: a tiny model on short conversations")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--ratio", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--prior", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.tiny:  # half the tiny optimizer in CPU memory: the partial offload of the ZeRO-3 plan runs too
        args.shapes, args.size_list = "tiny,tiny-zero3", args.size_list or [256, 512]
        args.optimizer_host_gb = OPTIMIZER_BYTES * SHAPES["tiny"].num_params() / 2 / 2**30
    start = time.time()
    shapes = args.shapes.split(",")
    results = []
    for i, shape in enumerate(shapes):
        shares = [BUDGET_SHARE[s] for s in shapes[i:]]
        deadline = time.time() + (args.budget_s - (time.time() - start)) * shares[0] / sum(shares)
        results += run_shape(args, shape, deadline)
    ok = [r for r in results if r["status"] == "ok"]
    head = ok[0] if ok else {}
    md = [f"# Long conversations, one {head.get('device', 'GPU')}, {head.get('date', '')}", "",
          "One conversation per step (5% prompt, 95% targets), random-init weights, bf16 (float32 on a CPU), the "
          "trainer's engine and "
          f"step; flags {head.get('flags', '')}; MFU against {head.get('peak_tflops') or 'the GPU peak (n/a)'} TFLOP/s "
          f"(model FLOPs, recompute not counted). Whole run {time.time() - start:.0f} s.", "", *table(results)]
    for shape in shapes:
        fits = [r["tokens"] for r in results if r["shape"] == shape and r["status"] == "ok"]
        md.append(f"\nLongest that fitted, {shape}: {max(fits) / 1024 if fits else 0:g}k tokens.")
    text = "\n".join(md)
    print(text, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_context.json").write_text(json.dumps(results, indent=1))
    (out / "long_context.md").write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
