"""Trainer benchmark: the real `deepspeed --module ochat.training.train` on the 1.1B (or 7B) LLaMA shape.

    python bench/train_run.py --work-dir /tmp/bench --steps 300 [--num-gpus 1] [--batch-max-len 16384]
    python bench/train_run.py --shape 7b --num-gpus 2 --steps 40 -- --deepspeed-config zero3 --gradient-checkpointing
    python bench/train_run.py --num-gpus 2 --batch-max-len 16384 --conversation-lengths 8192,32768 \
        --conversations 80 --steps 30 -- --sequence-parallel 2    # long conversations shared by 2 GPUs

Makes a random-init 1.1B LLaMA (22 layers, hidden 2048, intermediate 5632, GQA 32/4, vocab 32002; or Llama 2 7B)
and a synthetic pre-tokenized dataset with heavy-tailed conversation lengths (log-normal, 32..4096
tokens) whose tokens follow a fixed random successor table nine times in ten (a bigram chain: at lr 3e-4 the 1.1B
model leaves the ln(vocab) plateau after about 110 steps and ends near the chain's entropy floor of 1.36),
then trains with ZeRO-2, bf16, and reports tokens/s/GPU, MFU, peak memory and the loss curve.
"""
import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import throughput  # same folder: the benchmark model shapes


def make_dataset(out_dir, n, seed=0, vocab=32000, eot=32000, max_len=4096, follow=0.9, uniform_lengths=None):
    """Synthetic conversations of a bigram chain: each next token is a fixed random successor of the current one
    with probability `follow`, else uniform; the last 70% of each conversation a weight-1 target; written with
    ochat.data.write_dataset. Lengths: log-normal capped at `max_len`, or uniform in `uniform_lengths` (lo, hi)."""
    from ochat.assets import LLAMA2_TOKENIZER
    from ochat.data import write_dataset

    rng = np.random.default_rng(seed)
    if uniform_lengths:
        lengths = rng.integers(uniform_lengths[0], uniform_lengths[1] + 1, n)
        max_len = int(uniform_lengths[1])
    else:
        lengths = np.clip(rng.lognormal(6.6, 0.9, n), 32, max_len).astype(np.int64)
    successor = rng.permutation(np.arange(3, vocab, dtype=np.int32))
    successor = np.concatenate([np.full(3, 3, np.int32), successor])  # ids 0-2 (specials) never occur mid-chain

    def conversations(lens):
        for L in lens:
            t = np.empty(L, np.int32)
            jumps = rng.random(L) >= follow
            randoms = rng.integers(3, vocab, L, dtype=np.int32)
            t[0] = randoms[0]
            for i in range(1, L):
                t[i] = randoms[i] if jumps[i] else successor[t[i - 1]]
            t[0], t[-1] = 1, eot
            w = np.zeros(L, np.float32)
            w[int(L * 0.3):] = 1.0
            yield t, w

    meta = {"model_type": "openchat_v3.2", "tokenizer": str(LLAMA2_TOKENIZER), "vocab_size": 32001,
            "eot_token": "<|end_of_turn|>", "eot_token_id": eot, "bos_token_id": 1, "eos_token_id": 2,
            "max_length": max_len, "synthetic": True}
    return write_dataset(out_dir, conversations(lengths), conversations(lengths[:64]), meta=meta)


SHAPES = {k: throughput.SHAPES[k] for k in ("1b", "7b")}  # random init, vocab 32002 (Llama 2 + OpenChat's tokens)
SHAPES["8b"] = throughput.SHAPES["8b"]  # Llama 3 8B's shape, its 128,256-row vocabulary (the data uses 32,001 of it)
SHAPES["tiny"] = dataclasses.replace(throughput.SHAPES["tiny"], vocab_size=32002)  # CPU smoke runs


def make_model(out_dir, shape):
    import torch

    from ochat.assets import LLAMA2_TOKENIZER
    from ochat.config import get_model_type
    from ochat.data import load_tokenizer, save_serving_tokenizer
    from ochat.model.decoder import PackedCausalLM
    torch.manual_seed(0)
    m = PackedCausalLM.from_config(SHAPES[shape], dtype=torch.bfloat16, device="cuda" if torch.cuda.is_available() else "cpu")
    m.reset_parameters()
    m.save_pretrained(out_dir)
    model_type = get_model_type("openchat_v3.2")
    save_serving_tokenizer(load_tokenizer(LLAMA2_TOKENIZER, model_type), model_type, out_dir)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work-dir", default="/tmp/ochat_bench")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--num-gpus", type=int, default=1)
    p.add_argument("--batch-max-len", type=int, default=16384)
    p.add_argument("--conversations", type=int, default=8000)
    p.add_argument("--conversation-lengths", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                   metavar="MIN,MAX", help="uniform conversation lengths in [MIN, MAX] (default: log-normal, <= 4096)")
    p.add_argument("--out", default=None, help="folder for the log and the summary json (default: --work-dir)")
    p.add_argument("extra", nargs="*", help="more trainer flags after --")
    a = p.parse_args()
    data, model, out = (os.path.join(a.work_dir, d) for d in ("data", f"model_{a.shape}", "out"))
    meta = make_dataset(data, a.conversations, uniform_lengths=a.conversation_lengths)
    print("dataset", json.dumps(meta["length_stats"]), flush=True)
    if not os.path.exists(os.path.join(model, "config.json")):  # a second run in the same work dir reuses it
        make_model(model, a.shape)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(a.num_gpus), "--module", "ochat.training.train", "--model-path", model,
           "--data-path", data, "--save-path", out, "--epochs", "1", "--max-steps", str(a.steps),
           "--batch-max-len", str(a.batch_max_len), "--lr", "3e-4", "--lr-warmup-steps", "20", "--log-every", "10",
           "--eval-every", "0", "--no-save", "--overwrite", *a.extra]
    print(" ".join(cmd), flush=True)
    log_dir = a.out or a.work_dir
    os.makedirs(log_dir, exist_ok=True)
    log_file = os.path.join(log_dir, "train_log.txt")  # written as the run goes: a run cut short keeps its log
    with open(log_file, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    log = open(log_file).read()
    print("\n".join(l for l in log.splitlines() if l.startswith("[ochat]") or "rror" in l)[-8000:], flush=True)
    metrics_file = os.path.join(out, "metrics.jsonl")
    rows = [m for m in map(json.loads, open(metrics_file)) if "loss" in m] if os.path.exists(metrics_file) else []
    steady = [r for r in rows if r["step"] > 20]
    summary = {"returncode": proc.returncode, "steps": rows[-1]["step"] if rows else 0,
               "tokens_per_s_per_gpu_mean": float(np.mean([r["tokens_per_s_per_gpu"] for r in steady])) if steady else None,
               "mfu_mean": float(np.mean([r["mfu"] for r in steady])) if steady and steady[0]["mfu"] else None,
               "loss_curve": [(r["step"], r["loss"]) for r in rows],
               "peak_memory": (re.findall(r"peak GPU memory ([0-9.]+ GiB)", log) or [None])[-1]}
    print(json.dumps(summary), flush=True)
    if os.path.exists(metrics_file):
        shutil.copy(metrics_file, os.path.join(log_dir, "metrics.jsonl"))
    with open(os.path.join(log_dir, "train_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
