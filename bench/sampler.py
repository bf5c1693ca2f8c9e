"""Benchmark of the multipack sampler against the earlier packing algorithms.

    python bench/sampler.py            # full table (a few minutes on 2 cores) -> stdout (markdown)
    python bench/sampler.py --quick    # smaller synthetic sets
    python bench/sampler.py --compile  # only numba's cold-start compile time

Compared, on the same shuffled order per epoch:
  - ochat: ochat.training.multipack_sampler (BFD groups, LPT + best fit, sum(len^2)-sorted steps, swaps).
  - interleaved: DistributedSampler-style split (rank r takes shuffled[r::R]), each rank
    greedily packs its stream in order (next-fit); ranks with fewer packs get empty ones.
  - ffd-bsearch: the original multipack sampler (imoneoi/multipack_sampler), reimplemented from
    its description: per step, binary-search the longest prefix of the remaining shuffled
    sequences that first-fit-decreasing fits into R bins of C; rank r takes bin r; the tail that
    cannot fill R bins is dropped.
  - lpt-bsearch: the OpenChat variant: same binary search, but the check/assignment is LPT
    (longest processing time first: each sequence, longest first, goes to the least-loaded of
    R bins; feasible if no bin exceeds C); tail dropped.
Metrics: steps vs lower bound ceil(sum(len)/(R*C)); efficiency = packed tokens / (steps*R*C);
dropped sequences; L^2 lag = sqrt(max_r sum(len^2) - min_r sum(len^2)) per step (mean);
modeled balance = slowest-rank cost / mean-rank cost, cost = tokens + 2e-5*sum(len^2); time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ochat.training.multipack_sampler import _epoch_rng, pack_epoch, plan_stats  # noqa: E402

# ----------------------------------------------------------------------------- baselines


@numba.njit(cache=True)
def _ffd_fits(a, c, n):
    a = np.sort(a)[::-1]
    bins = np.zeros(n, np.int64)
    for x in a:
        placed = False
        for i in range(n):
            if bins[i] + x <= c:
                bins[i] += x
                placed = True
                break
        if not placed:
            return False
    return True


@numba.njit(cache=True)
def _ffd_assign(a, c, n):
    order = np.argsort(-a, kind="mergesort")
    bins = np.zeros(n, np.int64)
    where = np.empty(a.shape[0], np.int64)
    for j in order:
        for i in range(n):
            if bins[i] + a[j] <= c:
                bins[i] += a[j]
                where[j] = i
                break
    return where


@numba.njit(cache=True)
def _lpt_fits(a, c, n):
    a = np.sort(a)[::-1]
    bins = np.zeros(n, np.int64)
    for x in a:
        k = np.argmin(bins)
        bins[k] += x
        if bins[k] > c:
            return False
    return True


@numba.njit(cache=True)
def _lpt_assign(a, c, n):
    order = np.argsort(-a, kind="mergesort")
    bins = np.zeros(n, np.int64)
    where = np.empty(a.shape[0], np.int64)
    for j in order:
        k = np.argmin(bins)
        bins[k] += a[j]
        where[j] = k
    return where


@numba.njit(cache=True)
def _bsearch_allocate(lens_perm, c, n, use_lpt):
    """Returns (bin id per position in the permuted order or -1 if dropped, number of steps)."""
    m = lens_perm.shape[0]
    cums = np.cumsum(lens_perm)
    out = np.full(m, -1, np.int64)
    start = 0
    s = 0
    step = 0
    while start < m:
        lo = 1
        hi = 1 + np.searchsorted(cums[start:], s + c * n, "right")
        hi = min(hi, m - start + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ok = _lpt_fits(lens_perm[start:start + mid], c, n) if use_lpt else _ffd_fits(lens_perm[start:start + mid], c, n)
            if ok:
                lo = mid
            else:
                hi = mid
        if use_lpt:
            if lo < n:
                break
            w = _lpt_assign(lens_perm[start:start + lo], c, n)
        else:
            w = _ffd_assign(lens_perm[start:start + lo], c, n)
            if w.max() + 1 < n:
                break
        for j in range(lo):
            out[start + j] = step * n + w[j]
        start += lo
        s = cums[start - 1]
        step += 1
    return out, step


def plan_from_bins(perm, bin_id, n_bins):
    keep = bin_id >= 0
    idx = perm[keep]
    b = bin_id[keep]
    order = np.argsort(b, kind="stable")
    idx = idx[order]
    off = np.zeros(n_bins + 1, np.int64)
    np.add.at(off, b + 1, 1)
    return idx, np.cumsum(off)


def baseline_bsearch(lengths, C, R, seed, epoch, use_lpt):
    perm = _epoch_rng(seed, epoch).permutation(len(lengths)).astype(np.int64)
    bid, steps = _bsearch_allocate(lengths[perm], C, R, use_lpt)
    return plan_from_bins(perm, bid, steps * R)


def baseline_interleaved(lengths, C, R, seed, epoch):
    perm = _epoch_rng(seed, epoch).permutation(len(lengths)).astype(np.int64)
    per_rank = []
    for r in range(R):
        mine = perm[r::R]
        cs = np.cumsum(lengths[mine])
        # next-fit: greedy, new pack when the next sequence does not fit
        packs, start, used_before = [], 0, 0
        bnd = []
        while start < len(mine):
            end = np.searchsorted(cs, used_before + C, "right")
            bnd.append((start, end))
            used_before = cs[end - 1]
            start = end
        per_rank.append([mine[a:b] for a, b in bnd])
    S = max(len(p) for p in per_rank)
    parts, off = [], [0]
    for s in range(S):
        for r in range(R):
            x = per_rank[r][s] if s < len(per_rank[r]) else np.zeros(0, np.int64)
            parts.append(x)
            off.append(off[-1] + len(x))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64), np.asarray(off)


# ----------------------------------------------------------------------------- data


def sample_lengths(ctx):
    """The bundled ShareGPT sample, tokenized with the Llama 2 SentencePiece model; ~ the
    openchat_v3.2 template overhead (BOS + ~5 tokens of role prefix/end-of-turn per turn);
    truncated at ctx."""
    import sentencepiece as spm

    from ochat.assets import LLAMA2_TOKENIZER, SHAREGPT_SAMPLE

    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))
    data = json.loads(SHAREGPT_SAMPLE.read_text())
    out = []
    for rec in data:
        turns = rec.get("conversations") or rec.get("items") or []
        ids = sp.encode([t["value"] for t in turns])
        out.append(1 + sum(len(x) + 5 for x in ids))
    return np.minimum(np.asarray(out, np.int64), ctx)


def lognormal_lengths(n, ctx, seed=0):
    """Heavy-tailed: log-normal with median = ctx (sigma 1.2), capped at ctx: ~half at the cap."""
    rng = np.random.default_rng(seed)
    return np.clip(np.exp(rng.normal(math.log(ctx), 1.2, n)), 1, ctx).astype(np.int64)


# ----------------------------------------------------------------------------- main


def run_one(name, fn, lengths, C, R):
    t = time.perf_counter()
    idx, off = fn()
    dt = time.perf_counter() - t
    st = plan_stats(lengths, idx, off, C, R)
    return dict(method=name, steps=st["num_batches"], lb=st["lower_bound_batches"], eff=st["efficiency"],
                dropped=st["dropped_sequences"], lag=st["l2_lag_mean"], bal=st["balance_mean"], t=dt)


def warm():
    L = lognormal_lengths(3000, 512)
    pack_epoch(L, 4096, 4)
    baseline_bsearch(L, 4096, 4, 0, 0, False)
    baseline_bsearch(L, 4096, 4, 0, 0, True)


def compile_time(repeats=3):
    """Import + first use of the sampler in a fresh process: with an empty numba cache dir (cold
    compile), then with the cache that run wrote. Returns (cold, cached) seconds per repeat."""
    code = ("import time,numpy as np;t=time.perf_counter();"
            "from ochat.training.multipack_sampler import MultipackDistributedBatchSampler as S;"
            "S(16,np.array([3,5,7,2]*50),num_replicas=2,rank=0).generate_batches();print(time.perf_counter()-t)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as d:
            env["NUMBA_CACHE_DIR"] = d
            runs.append(tuple(float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                                   text=True, check=True).stdout) for _ in range(2)))
    return runs


def print_compile_time():
    runs = compile_time()
    cold, cached = (sorted(x) for x in zip(*runs))
    print(f"- numba: import + first use {np.median(cold):.1f} s with a cold cache (runs: "
          f"{', '.join(f'{x:.1f}' for x in cold)}); {np.median(cached):.1f} s with the on-disk cache")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=200_000, help="synthetic set size for the comparison")
    ap.add_argument("--compile", action="store_true", help="only measure numba's compile time (cold / cached)")
    args = ap.parse_args()
    if args.compile:
        print_compile_time()
        return
    n = 20_000 if args.quick else args.n
    warm()
    print(f"numba {numba.__version__}, numpy {np.__version__}, {os.cpu_count()} CPU cores\n")
    rows = []
    for ctx, per in ((4096, 8), (2048, 16)):
        C = ctx * per
        sets = {
            "sample": sample_lengths(ctx),
            "sample x400 (bootstrap)": None,
            f"lognormal {n // 1000}k": lognormal_lengths(n, ctx),
        }
        sets["sample x400 (bootstrap)"] = np.random.default_rng(1).choice(sets["sample"], 400 * len(sets["sample"]))
        for dname, L in sets.items():
            print(f"\n### {dname}, budget {per} x {ctx} = {C} tokens per rank "
                  f"(n={len(L):,}, mean {L.mean():.0f}, {100 * (L == ctx).mean():.0f}% at the cap)\n")
            print("| ranks | method | steps (lower bound) | efficiency | dropped seqs | L^2 lag mean | balance | time s |")
            print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
            for R in (1, 8, 64, 512):
                meths = [
                    ("ochat", lambda: pack_epoch(L, C, R, 0, 0)),
                    ("interleaved", lambda: baseline_interleaved(L, C, R, 0, 0)),
                    ("ffd-bsearch", lambda: baseline_bsearch(L, C, R, 0, 0, False)),
                    ("lpt-bsearch", lambda: baseline_bsearch(L, C, R, 0, 0, True)),
                ]
                for mname, fn in meths:
                    r = run_one(mname, fn, L, C, R)
                    rows.append(dict(r, data=dname, ctx=ctx, R=R))
                    print(f"| {R} | {mname} | {r['steps']} ({r['lb']}) | {r['eff']:.4f} | {r['dropped']} | "
                          f"{r['lag']:.0f} | {r['bal']:.4f} | {r['t']:.3f} |", flush=True)
    # headline timing: 1M sequences, 512 ranks
    print("\n### ochat packing time, 1,000,000 sequences, 512 ranks (median of 3 epochs)\n")
    for ctx, per in ((4096, 8), (2048, 16)):
        L = lognormal_lengths(1_000_000, ctx, seed=2)
        ts = []
        for e in range(3):
            t = time.perf_counter()
            idx, off = pack_epoch(L, ctx * per, 512, 0, e)
            ts.append(time.perf_counter() - t)
        st = plan_stats(L, idx, off, ctx * per, 512)
        print(f"- {per} x {ctx}: {np.median(ts):.2f} s; steps {st['num_batches']} (lower bound "
              f"{st['lower_bound_batches']}), efficiency {st['efficiency']:.4f}, dropped {st['dropped_sequences']}")
    print_compile_time()


if __name__ == "__main__":
    main()
