"""Multipack distributed batch sampler: conversation lengths -> per-rank packs of <= C tokens.

Drop-in for the original multipack sampler (same constructor signature), usable alone:
this module imports numpy and numba only (torch is imported lazily, and only to read the
torch.distributed rank/world size when those are not given and it is initialised).

    sampler = MultipackDistributedBatchSampler(lengths, batch_max_length=16384, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for pack in loader: ...

Algorithm (per epoch; every rank computes the same full plan, then takes its share):
  1. Shuffle all indices with a PCG64 generator seeded by (seed, epoch): deterministic on any
     machine, a different order each epoch.
  2. Walk the shuffled order in groups of about 16 steps' worth of tokens (16 * R * C).
     Each group, plus the sequences carried over from the previous group, is packed into bins
     of capacity C with best-fit-decreasing (O(n log C): bins are indexed by remaining room).
  3. The fullest floor(B / R) * R bins of the group are kept; the sequences of the other,
     least-full bins are carried into the next group. The last group keeps everything, so no
     sequence is dropped; its last step may hold fewer than R bins, and then multi-sequence
     bins are split so a rank is left empty only when that step has fewer sequences than ranks.
  4. Kept bins are sorted by their attention cost sum(len^2) and cut into steps of R
     consecutive bins, so the ranks of a step have nearly equal sum(len^2) (and nearly equal
     tokens, since bins are nearly full): the slowest rank sets the step time. A few
     capacity-respecting item swaps then narrow each step's sum(len^2) range further.
     Step order within a group and the bin -> rank assignment are then shuffled.

Steps per epoch land within a fraction of a percent of the lower bound ceil(sum(len) / (R*C))
on realistic data; see bench/sampler.py and bench/RESULTS.md.
"""
from __future__ import annotations

import math
from typing import Iterator

import numba
import numpy as np

__all__ = ["MultipackDistributedBatchSampler", "pack_epoch", "plan_stats"]

_GROUP_STEPS = 16  # steps' worth of tokens per packing group
_MIN_GROUP_ITEMS = 4096  # at least this many sequences per group (matters for small R * C)


# ----------------------------------------------------------------------------- kernels


@numba.njit(cache=True)
def _seg_find_first(tree, size, lo):
    """Smallest leaf index >= lo whose count is > 0 in a count segment tree, or -1."""
    i = lo + size
    if tree[i] > 0:
        return lo
    while True:
        if (i & 1) == 0 and tree[i + 1] > 0:
            i = i + 1
            break
        i >>= 1
        if i <= 1:
            return -1
    while i < size:
        if tree[2 * i] > 0:
            i = 2 * i
        else:
            i = 2 * i + 1
    return i - size


@numba.njit(cache=True)
def _seg_add(tree, size, leaf, delta):
    i = leaf + size
    while i >= 1:
        tree[i] += delta
        i >>= 1


@numba.njit(cache=True)
def _bfd(lens, capacity, tree, size, head, nxt, bin_of, bin_room):
    """Best-fit-decreasing of `lens` (already sorted decreasing). Returns the bin count.

    Bins with r tokens of room are kept on a stack head[r]; a segment tree over r finds the
    smallest room >= len in O(log C). tree/head must be clean (zeros / -1) on entry and are
    left clean on exit.
    """
    nbins = 0
    for j in range(lens.shape[0]):
        L = lens[j]
        r = _seg_find_first(tree, size, L)
        if r < 0:
            b = nbins
            nbins += 1
            room = capacity - L
        else:
            b = head[r]
            head[r] = nxt[b]
            _seg_add(tree, size, r, -1)
            room = r - L
        bin_of[j] = b
        bin_room[b] = room
        if room > 0:
            nxt[b] = head[room]
            head[room] = b
            _seg_add(tree, size, room, 1)
    # clean up the structures for the next call: every bin with room is on exactly one stack
    for b in range(nbins):
        room = bin_room[b]
        if room > 0:
            _seg_add(tree, size, room, -1)
            head[room] = -1
    return nbins


@numba.njit(cache=True)
def _balance_step(bins_items, bins_tok, bins_sq, lens, capacity, max_rounds):
    """Swap single items between the max- and min-sum(len^2) bins of one step.

    bins_items: list of int64 arrays of sequence lengths' indices (into lens).
    Each round picks the bin pair (max sq, min sq) and the swap (a from max, b from min,
    len a > len b) that brings their sq closest together while both stay within capacity.
    Stops when no improving swap exists.
    """
    nb = len(bins_items)
    for _ in range(max_rounds):
        hi = 0
        lo = 0
        for k in range(nb):
            if bins_sq[k] > bins_sq[hi]:
                hi = k
            if bins_sq[k] < bins_sq[lo]:
                lo = k
        gap = bins_sq[hi] - bins_sq[lo]
        if gap <= 0:
            return
        A = bins_items[hi]
        B = bins_items[lo]
        best = gap
        ba = -1
        bb = -1
        for ia in range(A.shape[0]):
            la = lens[A[ia]]
            for ib in range(B.shape[0]):
                lb = lens[B[ib]]
                if la <= lb:
                    continue
                d = la - lb
                if bins_tok[lo] + d > capacity:
                    continue
                dsq = la * la - lb * lb
                new_gap = abs(gap - 2 * dsq)
                if new_gap < best:
                    best = new_gap
                    ba = ia
                    bb = ib
        if ba < 0:
            return
        ia_ = A[ba]
        ib_ = B[bb]
        la = lens[ia_]
        lb = lens[ib_]
        A[ba] = ib_
        B[bb] = ia_
        bins_tok[hi] += lb - la
        bins_tok[lo] += la - lb
        bins_sq[hi] += lb * lb - la * la
        bins_sq[lo] += la * la - lb * lb


@numba.njit(cache=True)
def _pack_epoch(lengths, perm, capacity, R, group_tokens, min_group_items, swap_rounds, shuffle_keys):
    """Pack a whole epoch. Returns (indices, bin_offsets): bin k = step k // R, rank k % R.

    shuffle_keys: float64 random keys, used to shuffle steps within a group and bins within a
    step (consumed in order, deterministically).
    """
    n = perm.shape[0]
    size = 1
    while size < capacity + 1:
        size *= 2
    tree = np.zeros(2 * size, np.int64)
    head = np.full(capacity + 1, -1, np.int64)
    maxn = n + 1
    nxt = np.empty(maxn, np.int64)
    bin_of = np.empty(maxn, np.int64)
    bin_room = np.empty(maxn, np.int64)

    out_idx = np.empty(n, np.int64)
    out_off = np.zeros(n + R + 2, np.int64)  # bin boundaries; bins <= n + R
    n_out = 0
    n_bins_out = 0
    key_pos = 0

    carry = np.empty(0, np.int64)
    pos = 0
    while pos < n or carry.shape[0] > 0:
        # ---- gather a group: carry + next items up to group_tokens
        tok = 0
        for j in range(carry.shape[0]):
            tok += lengths[carry[j]]
        end = pos
        while end < n and (tok < group_tokens or end - pos + carry.shape[0] < min_group_items):
            tok += lengths[perm[end]]
            end += 1
        last = end >= n
        g = np.empty(carry.shape[0] + end - pos, np.int64)
        g[: carry.shape[0]] = carry
        g[carry.shape[0]:] = perm[pos:end]
        pos = end
        # ---- best-fit-decreasing (stable sort on -len for determinism)
        gl = np.empty(g.shape[0], np.int64)
        for j in range(g.shape[0]):
            gl[j] = -lengths[g[j]]
        order = np.argsort(gl, kind="mergesort")
        gs = g[order]
        ls = np.empty(gs.shape[0], np.int64)
        for j in range(gs.shape[0]):
            ls[j] = lengths[gs[j]]
        nb = _bfd(ls, capacity, tree, size, head, nxt, bin_of, bin_room)
        # ---- bins as CSR
        cnt = np.zeros(nb + 1, np.int64)
        for j in range(gs.shape[0]):
            cnt[bin_of[j] + 1] += 1
        for b in range(nb):
            cnt[b + 1] += cnt[b]
        fill = cnt[:-1].copy()
        items = np.empty(gs.shape[0], np.int64)
        for j in range(gs.shape[0]):
            b = bin_of[j]
            items[fill[b]] = gs[j]
            fill[b] += 1
        btok = np.zeros(nb, np.int64)
        bsq = np.zeros(nb, np.int64)
        for b in range(nb):
            for j in range(cnt[b], cnt[b + 1]):
                L = lengths[items[j]]
                btok[b] += L
                bsq[b] += L * L
        # ---- keep the fullest multiple of R bins; carry the rest (unless last group)
        if last:
            keep_n = nb
        else:
            keep_n = (nb // R) * R
        by_fill = np.argsort(-btok, kind="mergesort")
        kept = by_fill[:keep_n]
        n_carry = 0
        for t in range(keep_n, nb):
            b = by_fill[t]
            n_carry += cnt[b + 1] - cnt[b]
        new_carry = np.empty(n_carry, np.int64)
        c = 0
        for t in range(keep_n, nb):
            b = by_fill[t]
            for j in range(cnt[b], cnt[b + 1]):
                new_carry[c] = items[j]
                c += 1
        carry = new_carry
        if keep_n == 0:
            continue
        # ---- pad the last partial step with empty bins
        n_steps = (keep_n + R - 1) // R
        tot_bins = n_steps * R
        # sort the full steps' bins by sq so consecutive R bins are alike; in the last group the
        # keep_n % R least-full bins (the epoch's tail) form the final, partial step
        full_n = (keep_n // R) * R
        ksq = np.empty(full_n, np.int64)
        for t in range(full_n):
            ksq[t] = bsq[kept[t]]
        head_part = kept[:full_n][np.argsort(ksq, kind="mergesort")]
        kept = np.concatenate((head_part, kept[full_n:]))
        # materialise bins as lists of item indices
        blist = []
        tok_l = np.zeros(tot_bins, np.int64)
        sq_l = np.zeros(tot_bins, np.int64)
        for t in range(tot_bins):
            if t < keep_n:
                b = kept[t]
                blist.append(items[cnt[b]:cnt[b + 1]].copy())
                tok_l[t] = btok[b]
                sq_l[t] = bsq[b]
            else:
                blist.append(np.empty(0, np.int64))
        # ---- last partial step: split multi-item bins into empty ones
        if tot_bins > keep_n:
            s0 = (n_steps - 1) * R
            while True:
                e = -1
                for t in range(s0, tot_bins):
                    if blist[t].shape[0] == 0:
                        e = t
                        break
                if e < 0:
                    break
                # the bin with the most items gives away its largest item
                m = -1
                for t in range(s0, tot_bins):
                    if blist[t].shape[0] > 1 and (m < 0 or blist[t].shape[0] > blist[m].shape[0]):
                        m = t
                if m < 0:
                    break
                arr = blist[m]
                k_best = 0
                for k in range(arr.shape[0]):
                    if lengths[arr[k]] > lengths[arr[k_best]]:
                        k_best = k
                moved = arr[k_best]
                rest = np.empty(arr.shape[0] - 1, np.int64)
                c = 0
                for k in range(arr.shape[0]):
                    if k != k_best:
                        rest[c] = arr[k]
                        c += 1
                blist[m] = rest
                one = np.empty(1, np.int64)
                one[0] = moved
                blist[e] = one
                L = lengths[moved]
                tok_l[m] -= L
                sq_l[m] -= L * L
                tok_l[e] = L
                sq_l[e] = L * L
        # ---- per step: balance by swaps, then emit in shuffled step order / rank order
        skeys = shuffle_keys[key_pos:key_pos + n_steps].copy()
        key_pos += n_steps
        if tot_bins > keep_n:
            skeys[n_steps - 1] = 2.0  # the partial step (with empty or split bins) stays last
        step_order = np.argsort(skeys, kind="mergesort")
        for si in range(n_steps):
            s = step_order[si]
            sub = blist[s * R:(s + 1) * R]
            st = tok_l[s * R:(s + 1) * R].copy()
            ss = sq_l[s * R:(s + 1) * R].copy()
            if swap_rounds > 0 and R > 1:
                _balance_step(sub, st, ss, lengths, capacity, swap_rounds)
            rkeys = shuffle_keys[key_pos:key_pos + R]
            key_pos += R
            rorder = np.argsort(rkeys, kind="mergesort")
            for r in range(R):
                arr = sub[rorder[r]]
                for k in range(arr.shape[0]):
                    out_idx[n_out] = arr[k]
                    n_out += 1
                n_bins_out += 1
                out_off[n_bins_out] = n_out
    return out_idx, out_off[: n_bins_out + 1]


@numba.njit(cache=True)
def _plan_costs(lengths, indices, offsets):
    nb = offsets.shape[0] - 1
    tok = np.zeros(nb, np.int64)
    sq = np.zeros(nb, np.int64)
    for b in range(nb):
        for j in range(offsets[b], offsets[b + 1]):
            L = lengths[indices[j]]
            tok[b] += L
            sq[b] += L * L
    return tok, sq


# ----------------------------------------------------------------------------- python API


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), 0x6D75])))


def pack_epoch(lengths: np.ndarray, batch_max_length: int, num_replicas: int, seed: int = 0, epoch: int = 0,
               swap_rounds: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Full plan of one epoch: (indices, offsets), pack of (step s, rank r) =
    indices[offsets[s*R + r] : offsets[s*R + r + 1]]. Lengths must be validated already."""
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    n = lengths.shape[0]
    R = int(num_replicas)
    C = int(batch_max_length)
    rng = _epoch_rng(seed, epoch)
    perm = rng.permutation(n).astype(np.int64)
    # every step but the last has R non-empty packs: steps <= n // R + 1; keys per step: R + 1
    n_keys = (n // R + 1) * (R + 1)
    keys = rng.random(n_keys)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(1, np.int64)
    group_tokens = _GROUP_STEPS * R * C
    return _pack_epoch(lengths, perm, C, R, group_tokens, _MIN_GROUP_ITEMS, int(swap_rounds), keys)


def plan_stats(lengths: np.ndarray, indices: np.ndarray, offsets: np.ndarray, batch_max_length: int,
               num_replicas: int, quadratic_weight: float = 2e-5) -> dict:
    """Packing statistics of a plan (see MultipackDistributedBatchSampler.stats)."""
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    R = int(num_replicas)
    tok, sq = _plan_costs(lengths, np.ascontiguousarray(indices, np.int64), np.ascontiguousarray(offsets, np.int64))
    S = tok.shape[0] // R if R else 0
    tok = tok[: S * R].reshape(S, R)
    sq = sq[: S * R].reshape(S, R).astype(np.float64)
    total = int(lengths.sum())
    packed = int(tok.sum())
    lower = math.ceil(total / (R * batch_max_length)) if total else 0
    if S:
        lag = np.sqrt(sq.max(1) - sq.min(1))
        cost = tok + quadratic_weight * sq
        balance = cost.max(1) / np.maximum(cost.mean(1), 1e-12)
    else:
        lag = balance = np.zeros(1)
    return {
        "num_batches": S,
        "lower_bound_batches": lower,
        "efficiency": packed / (S * R * batch_max_length) if S else 0.0,
        "num_sequences": int(lengths.shape[0]),
        "packed_sequences": int(indices.shape[0]),
        "dropped_sequences": int(lengths.shape[0] - indices.shape[0]),
        "l2_lag_mean": float(lag.mean()),
        "l2_lag_max": float(lag.max()),
        "balance_mean": float(balance.mean()),  # modeled max-rank cost / mean-rank cost, per step
        "balance_max": float(balance.max()),
        "empty_packs": int((tok == 0).sum()),
    }


class MultipackDistributedBatchSampler:
    """Batch sampler yielding, for this rank, one list of dataset indices per micro-step.

    Args:
        lengths: token count of every sequence (1 <= length <= batch_max_length).
        batch_max_length: token budget C of one pack (one rank, one micro-step).
        num_replicas, rank: default to torch.distributed's world size / rank when it is
            initialised, else 1 / 0.
        seed: shuffling seed; the plan is a pure function of (lengths, C, seed, epoch, R).
        drop_last: drop the epoch's last step when it is not full (fewer than R non-empty
            packs or under half the mean fill). Off by default: every index appears exactly once.
        quadratic_weight: b/a of the modeled cost a*tokens + b*sum(len^2) used by stats()
            (2e-5 ~ a 7B Llama: 6*layers*hidden / (6*params)).

    Guarantees: every index exactly once per epoch (unless drop_last), every pack <= C tokens,
    all ranks yield the same count, a pack is empty only in the last step and only when it
    has fewer sequences than ranks; a new order each epoch; ranks agree without communication.
    """

    def __init__(self, lengths, batch_max_length: int, num_replicas: int | None = None, rank: int | None = None,
                 seed: int = 0, drop_last: bool = False, quadratic_weight: float = 2e-5):
        if num_replicas is None or rank is None:
            dist_r, dist_rank = _dist_defaults()
            num_replicas = dist_r if num_replicas is None else num_replicas
            rank = dist_rank if rank is None else rank
        lengths = np.asarray(lengths)
        if lengths.ndim != 1:
            raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
        if lengths.size and not np.issubdtype(lengths.dtype, np.integer):
            if not np.all(np.equal(np.mod(lengths, 1), 0)):
                raise ValueError("lengths must be integers")
        self.lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        self.batch_max_length = int(batch_max_length)
        if self.batch_max_length < 1:
            raise ValueError(f"batch_max_length must be >= 1, got {batch_max_length}")
        bad = np.flatnonzero((self.lengths < 1) | (self.lengths > self.batch_max_length))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"sequence at index {i} has length {int(self.lengths[i])}, outside [1, batch_max_length="
                f"{self.batch_max_length}] ({bad.size} such sequence(s)); truncate or filter them first")
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"invalid rank {rank} for num_replicas {num_replicas}")
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.quadratic_weight = float(quadratic_weight)
        self.epoch = 0
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    # -- plan
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def plan(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(indices, offsets) of the whole epoch, all ranks: the pack of (step s, rank r) is
        indices[offsets[s*R + r] : offsets[s*R + r + 1]]. Cached for the latest epoch."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        idx, off = pack_epoch(self.lengths, self.batch_max_length, self.num_replicas, self.seed, epoch)
        if self.drop_last and off.shape[0] > 1:
            R = self.num_replicas
            S = (off.shape[0] - 1) // R
            last = off[(S - 1) * R:]
            last_tok = np.array([self.lengths[idx[last[r]:last[r + 1]]].sum() for r in range(R)])
            mean_fill = self.lengths.sum() / max(1, S * R)
            if (last_tok == 0).any() or last_tok.mean() < 0.5 * mean_fill:
                off = off[: (S - 1) * R + 1]
                idx = idx[: off[-1]]
        self._cache = (epoch, idx, off)
        return idx, off

    def all_rank_batches(self, epoch: int | None = None) -> list[list[list[int]]]:
        """The full plan as [step][rank] -> list of indices."""
        idx, off = self.plan(epoch)
        R = self.num_replicas
        S = (off.shape[0] - 1) // R
        return [[idx[off[s * R + r]:off[s * R + r + 1]].tolist() for r in range(R)] for s in range(S)]

    def num_batches(self) -> int:
        return (self.plan()[1].shape[0] - 1) // self.num_replicas

    def __len__(self) -> int:
        return self.num_batches()

    def __iter__(self) -> Iterator[list[int]]:
        idx, off = self.plan()
        R, r = self.num_replicas, self.rank
        for s in range((off.shape[0] - 1) // R):
            yield idx[off[s * R + r]:off[s * R + r + 1]].tolist()

    def stats(self) -> dict:
        """Statistics of the current epoch's plan, for logging: efficiency (tokens / (steps*R*C)),
        num_batches vs lower_bound_batches = ceil(sum(len) / (R*C)), l2_lag_mean/max (per step,
        sqrt(max_r sum(len^2) - min_r sum(len^2))), balance_mean/max (modeled slowest-rank cost
        over mean-rank cost, cost = tokens + quadratic_weight * sum(len^2)), dropped/empty counts."""
        idx, off = self.plan()
        return plan_stats(self.lengths, idx, off, self.batch_max_length, self.num_replicas, self.quadratic_weight)


def _dist_defaults() -> tuple[int, int]:
    """(world size, rank) from torch.distributed when initialised; (1, 0) otherwise.
    torch is imported only if the caller's process already imported it."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return 1, 0
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0
