"""Where the real trainer's step time goes, against the bare model step on the same packs (one GPU).

    python bench/train_profile.py --out $OUT [--shape 1b] [--steps 40] [--variants zero2,zero2_no_overlap,zero1,zero0]
        [-- more trainer flags, e.g. --gradient-checkpointing]

Makes bench/train_run.py's model and synthetic dataset, then, each in a fresh process:
  harness    PackedCausalLM in bf16 + fused torch AdamW on the bf16 weights (no master copy), forward and backward
             of the same packs the trainer draws (ochat.training.packs.PackPlan, seed 0), one step per pack: the
             figure bench/throughput.py reports
  VARIANT    `ochat.training.train` in one process (no launcher) with a DeepSpeed config: zero2 (shipped), zero2
             without overlap_comm, zero1, zero0 (DeepSpeed's bf16 optimizer: fp32 master weights and gradients),
             zero2_bf16_master (the shipped config with --master-dtype bf16: bf16 master weights, gradients, moments);
             zero2_deepspeed_step, zero2_bf16_master_deepspeed_step: those with DeepSpeed's own ZeRO step (without
             ochat.training.zero_step's gradient norm and clip);
             each also as VARIANT_no_check: bf16.check_grad_overflow off (no inf/nan scan of every gradient)
Each reports wall-clock tokens/s/GPU over the steps after the first 11 but the last 5 (data loading and logging
included), one step under torch.profiler split by kernel category (bench/throughput.py's) with the idle rest, and
over the last 5 steps the time of each phase (forward, backward, optimizer step, the rest of the step) with the GPU
synchronised between phases. Writes train_profile.json, train_profile.md, profile_VARIANT.txt (with the profiled
step's phases broken down: kernels, launches, CPU ops) and trace_VARIANT.json.gz (its chrome trace) into --out;
prints the table last.
"""
import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import train_run  # noqa: E402  same folder: the model and the dataset
from throughput import PEAK, profile_categories  # noqa: E402

WARMUP = 10
PHASE_PREFIX = "phase."  # the record_function names of the timed phases in the profiled step
PHASE_STEPS = 5  # the last steps: each phase (forward, backward, optimizer step) timed between synchronisations
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()

NO_CHECK = {"bf16": {"check_grad_overflow": False}}  # no per-gradient inf/nan scan before the optimizer step
VARIANTS = {  # DeepSpeed config sections replaced in the shipped zero2.json
    "zero2": {},  # the shipped config, as users run it
    "zero2_no_overlap": {"zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                                               "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}},
    "zero1": {"zero_optimization": {"stage": 1}},
    "zero0": {"zero_optimization": {"stage": 0}},
}
VARIANTS.update({f"{name}_no_check": dict(sections, **NO_CHECK) for name, sections in list(VARIANTS.items())})
VARIANT_FLAGS = {"zero2_bf16_master": ["--master-dtype", "bf16"]}  # the shipped config with these trainer flags
VARIANTS.update({name: {} for name in VARIANT_FLAGS})
DEEPSPEED_STEP = {"zero2_deepspeed_step": [], "zero2_bf16_master_deepspeed_step": ["--master-dtype", "bf16"]}
VARIANTS.update({name: {} for name in DEEPSPEED_STEP})  # DeepSpeed's own ZeRO step (ochat.training.zero_step off)
VARIANT_FLAGS.update(DEEPSPEED_STEP)


class StepClock:
    """Wall-clock of the steps after WARMUP + 1 but the last PHASE_STEPS, one profiled step (step WARMUP + 1), and
    the phases of the last PHASE_STEPS steps (`phase` wraps a method)."""

    def __init__(self, out_dir: Path, tag: str, steps: int):
        self.out_dir, self.tag, self.steps = out_dir, tag, steps
        self.n, self.times, self.tokens, self.profile = 0, [], [], None
        self.last = 0.0  # end of the previous step
        self.phases: dict[str, float] = {}

    def run(self, fn, tokens: int):
        self.n += 1
        if self.n == WARMUP + 1:  # profiled, and not timed
            from torch.profiler import ProfilerActivity, profile
            sync()
            t0 = time.perf_counter()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
            with profile(activities=activities) as prof:
                out = fn()
                sync()
            wall = time.perf_counter() - t0
            averages = prof.key_averages()
            (self.out_dir / f"profile_{self.tag}.txt").write_text(
                averages.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70) + "\n\n"
                + averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70) + "\n\n"
                + phase_breakdown(prof))
            with gzip.open(self.out_dir / f"trace_{self.tag}.json.gz", "wt") as fh:
                prof.export_chrome_trace("/tmp/ochat_trace.json")
                fh.write(Path("/tmp/ochat_trace.json").read_text())
            self.profile = dict(wall_seconds=wall, seconds_by_category=profile_categories(prof, wall))
            self.last = time.perf_counter()
            return out
        if self.in_phases():
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            self.phases["step"] = self.phases.get("step", 0.0) + time.perf_counter() - t0
            return out
        out = fn()
        if self.timed():  # from the end of the previous step: data loading and logging count
            sync()
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.tokens.append(tokens)
            self.last = now
        return out

    def timed(self) -> bool:
        """Whether the current step is timed."""
        return WARMUP + 1 < self.n <= self.steps - PHASE_STEPS

    def in_phases(self) -> bool:
        return self.n > self.steps - PHASE_STEPS

    def phase(self, owner, name: str, label: str) -> None:
        """Time `owner.name` (a method) as phase `label` during the last PHASE_STEPS steps."""
        method = getattr(owner, name)

        def timed(*args, **kwargs):
            if self.n == WARMUP + 1:  # the profiled step: named and synchronised, for phase_breakdown
                sync()
                with torch.profiler.record_function(PHASE_PREFIX + label):
                    out = method(*args, **kwargs)
                    sync()
                return out
            if not self.in_phases():
                return method(*args, **kwargs)
            sync()
            t0 = time.perf_counter()
            out = method(*args, **kwargs)
            sync()
            self.phases[label] = self.phases.get(label, 0.0) + time.perf_counter() - t0
            return out
        setattr(owner, name, timed)

    def result(self, config, sum_len_sq: float) -> dict:
        from ochat.training.metrics import step_flops
        seconds, tokens = sum(self.times), sum(self.tokens)
        phases = {k: v / PHASE_STEPS for k, v in self.phases.items()}
        phases["rest"] = phases.get("step", 0.0) - sum(v for k, v in phases.items() if k != "step")
        return dict(steps=len(self.times), tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds,
                    mfu=step_flops(config, tokens, sum_len_sq) / seconds / PEAK,
                    peak_gib=torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else 0.0,
                    profile=self.profile, phase_seconds=phases)


def phase_breakdown(prof) -> str:
    """Per phase of the profiled step (its record_function window): wall ms, GPU kernel ms and launches inside it,
    the top kernels and the top CPU ops by self time, so that the gap between two runs' phases can be named."""
    from torch.autograd import DeviceType
    events = list(prof.events())
    windows = [(e.name[len(PHASE_PREFIX):], e.time_range.start, e.time_range.end) for e in events
               if e.name.startswith(PHASE_PREFIX) and e.device_type == DeviceType.CPU]
    lines = []
    for label, start, end in windows:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA and start <= e.time_range.start < end
                   and not getattr(e, "is_user_annotation", False)]  # the GPU-side copies of record_function names
        cpu = [e for e in events if e.device_type == DeviceType.CPU and start <= e.time_range.start < end
               and not e.name.startswith(PHASE_PREFIX)]
        by_kernel, by_cpu = {}, {}
        for e in kernels:
            n, t = by_kernel.get(e.name[:90], (0, 0.0))
            by_kernel[e.name[:90]] = (n + 1, t + e.time_range.elapsed_us())
        for e in cpu:
            n, t = by_cpu.get(e.name[:90], (0, 0.0))
            by_cpu[e.name[:90]] = (n + 1, t + e.self_cpu_time_total)
        gpu_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
        lines.append(f"== phase {label}: wall {(end - start) / 1e3:.1f} ms (CPU window), kernels {len(kernels)}, "
                     f"kernel time {gpu_ms:.1f} ms")
        for name, (n, t) in sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:15]:
            lines.append(f"  gpu {t / 1e3:8.2f} ms {n:5d}x  {name}")
        for name, (n, t) in sorted(by_cpu.items(), key=lambda kv: -kv[1][1])[:15]:
            lines.append(f"  cpu {t / 1e3:8.2f} ms {n:5d}x  {name}")
    return "\n".join(lines) + "\n"


def _sum_len_sq(micro_batches) -> float:
    return sum(float((b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).double().pow(2).sum()) for b in micro_batches)


def child_harness(a) -> dict:
    from ochat.data import open_dataset
    from ochat.model import ModelTransforms, PackedCausalLM, apply_transforms
    from ochat.training.packs import PackPlan
    from ochat.training.step import forward_loss

    ds = open_dataset(a.data, "train")
    plan = PackPlan(ds, a.batch_max_len, world_size=1, rank=0, grad_accum=1, seed=0, filler_token=ds.meta["eot_token_id"])
    model = PackedCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, device=DEVICE)
    apply_transforms(model, ModelTransforms(recompute=1.0 if "--gradient-checkpointing" in a.extra else 0.0))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=DEVICE.type == "cuda")
    clock, sum_len_sq = StepClock(Path(a.out), "harness", a.steps), 0.0
    clock.phase(model, "forward", "forward")
    clock.phase(torch.Tensor, "backward", "backward")
    clock.phase(opt, "step", "optimizer")

    def one(micro_batches):
        for b in micro_batches:
            out = forward_loss(model, b, DEVICE)
            (out.weighted_loss / out.weight.clamp_min(1.0)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i, micro_batches in enumerate(plan.steps(0, pin_memory=DEVICE.type == "cuda")):
        if i == a.steps:
            break
        clock.run(lambda: one(micro_batches), sum(b["input_ids"].numel() for b in micro_batches))
        if clock.timed():
            sum_len_sq += _sum_len_sq(micro_batches)
    return clock.result(model.config, sum_len_sq)


def child_trainer(a) -> dict:
    from ochat.training import train as trainer

    from deepspeed.runtime.engine import DeepSpeedEngine

    clock, acc = StepClock(Path(a.out), a.variant, a.steps), dict(sum_len_sq=0.0, config=None)
    for name, label in (("forward", "forward"), ("backward", "backward"), ("step", "optimizer")):
        clock.phase(DeepSpeedEngine, name, label)
    original = trainer.train_step

    def timed_step(engine, micro_batches, *args, **kwargs):
        acc["config"] = engine.module.config
        out = clock.run(lambda: original(engine, micro_batches, *args, **kwargs),
                        sum(b["input_ids"].numel() for b in micro_batches))
        if clock.timed():
            acc["sum_len_sq"] += _sum_len_sq(micro_batches)
        return out

    trainer.train_step = timed_step
    if a.variant in DEEPSPEED_STEP:
        from ochat.training import zero_step
        zero_step.streamline = lambda zero_optimizer: []
    argv = ["--model-path", a.model, "--data-path", a.data, "--save-path", os.path.join(a.out, "run_" + a.variant),
            "--epochs", "1", "--max-steps", str(a.steps), "--batch-max-len", str(a.batch_max_len), "--lr", "3e-4",
            "--lr-warmup-steps", "5", "--log-every", "10", "--eval-every", "0", "--no-save", "--overwrite",
            "--skip-self-check", *VARIANT_FLAGS.get(a.variant, []), *a.extra]
    if VARIANTS[a.variant]:
        ds_config = json.load(open(BENCH.parent / "ochat/config/deepspeed/zero2.json"))
        for section, value in VARIANTS[a.variant].items():
            ds_config[section] = dict(ds_config.get(section, {}), **value)
        path = os.path.join(a.out, f"ds_{a.variant}.json")
        json.dump(ds_config, open(path, "w"))
        argv += ["--deepspeed-config", path]
    trainer.train(trainer.parse_args(argv))
    return clock.result(acc["config"], acc["sum_len_sq"])


def table(results: dict) -> list[str]:
    base = results.get("harness", {}).get("tokens_per_s")
    cats = ("GEMMs", "attention", "optimizer", "other", "idle")
    phases = ("forward", "backward", "optimizer", "rest")
    lines = ["| run | tokens/s/GPU | MFU (790) | / harness | peak GiB | profiled step ms: " + ", ".join(cats)
             + " | synchronised phases ms: " + ", ".join(phases) + " |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][-120:]} | | | | | |")
            continue
        prof = r["profile"]["seconds_by_category"] if r.get("profile") else {}
        split = ", ".join(f"{1e3 * prof.get(c, 0):.0f}" for c in cats) + f" (of {1e3 * r['profile']['wall_seconds']:.0f})"
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | "
                     f"{r['tokens_per_s'] / base if base else float('nan'):.3f} | {r['peak_gib']:.1f} | {split} | "
                     + ", ".join(f"{1e3 * r['phase_seconds'].get(p, 0):.0f}" for p in phases) + " |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--work-dir", default="/tmp/ochat_train_profile")
    p.add_argument("--shape", choices=sorted(train_run.SHAPES), default="1b")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-max-len", type=int, default=16384)
    p.add_argument("--conversations", type=int, default=3000)
    p.add_argument("--variants", default="zero2,zero2_no_overlap,zero1,zero0")
    p.add_argument("--child", choices=["harness", *VARIANTS], help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="more trainer flags after --")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    a.data, a.model = os.path.join(a.work_dir, "data"), os.path.join(a.work_dir, f"model_{a.shape}")
    if a.child:
        a.variant = a.child
        result = child_harness(a) if a.child == "harness" else child_trainer(a)
        Path(a.out, f"result_{a.child}.json").write_text(json.dumps(result))
        return
    if not os.path.exists(os.path.join(a.data, "meta.json")):
        train_run.make_dataset(a.data, a.conversations)
    if not os.path.exists(os.path.join(a.model, "config.json")):
        train_run.make_model(a.model, a.shape)
    results = {}
    for name in ["harness", *a.variants.split(",")]:
        cmd = [sys.executable, __file__, "--out", a.out, "--work-dir", a.work_dir, "--shape", a.shape, "--steps",
               str(a.steps), "--batch-max-len", str(a.batch_max_len), "--child", name, "--", *a.extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        Path(a.out, f"log_{name}.txt").write_text(proc.stdout + proc.stderr)
        result_file = Path(a.out, f"result_{name}.json")
        results[name] = (json.loads(result_file.read_text()) if proc.returncode == 0 and result_file.exists()
                         else {"error": (proc.stderr or proc.stdout).strip()[-400:]})
        r = results[name]
        print(f"[{name}] " + (f"{r['tokens_per_s']:.0f} tok/s" if "error" not in r else "failed"), flush=True)
    lines = table(results)
    Path(a.out, "train_profile.json").write_text(json.dumps(dict(args=vars(a), results=results), indent=1))
    Path(a.out, "train_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
