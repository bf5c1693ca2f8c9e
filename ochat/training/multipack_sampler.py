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
  2. Walk the shuffled order in groups of about 16 steps' worth of tokens (16 * R * C), plus
     the sequences carried over from the previous group.
  3. Best-fit-decreasing (O(n log C): bins indexed by remaining room) gives the group's bin
     count; B = that count (or floor(tokens / C)), rounded down to a multiple of R.
  4. The group is re-dealt into exactly B bins: sequences longer than a threshold go LPT-style
     (longest first, to the least-loaded bin), so every bin gets the same mix of long sequences
     and nearly equal sum(len^2); shorter ones go best-fit to top the bins up to C. The
     threshold starts above C (pure LPT), then C/128, doubling until the bins are within
     0.05% of full. Sequences
     that do not fit are carried into the next group; nothing is dropped.
  5. Bins sorted by sum(len^2), R consecutive bins make a step (ranks of a step have nearly
     equal attention cost and tokens: the slowest rank sets the step time); a few
     capacity-respecting swaps polish each step. Step order and bin -> rank are shuffled.
  6. The last group uses ceil(bins / R) * R bins (fewer than R empty bins, only when it has
     fewer sequences than bins, all in the last step); if that does not fit, plain BFD bins
     are used and the last step's multi-sequence bins are split so a rank is left empty only
     when that step has fewer sequences than ranks.

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
_SMALL_DIV = 128  # after pure LPT: sequences shorter than C / 128 top bins up best-fit, longer go LPT
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
def _lpt_bf(ls, B, capacity, small, tree, size, head, nxt):
    """Fill B bins with items `ls` (sorted decreasing); -1 = did not fit (carried).

    Items >= `small` go LPT-style to the least-loaded bin (ties: lowest id; a min-heap of
    (load, id)), which gives every bin the same mix of long sequences, hence nearly equal
    sum(len^2). The remaining short items go best-fit (smallest room that fits, via the
    room-indexed segment tree) to top the bins up to the budget.
    """
    load = np.zeros(B, np.int64)
    hid = np.arange(B)
    out = np.empty(ls.shape[0], np.int64)
    j = 0
    while j < ls.shape[0] and (ls[j] >= small or j < B):  # the B longest: one per bin
        L = ls[j]
        if load[0] + L > capacity:
            out[j] = -1
            j += 1
            continue
        out[j] = hid[0]
        load[0] += L
        i = 0
        while True:  # sift down
            a = 2 * i + 1
            if a >= B:
                break
            c = a
            b2 = a + 1
            if b2 < B and (load[b2] < load[a] or (load[b2] == load[a] and hid[b2] < hid[a])):
                c = b2
            if load[c] < load[i] or (load[c] == load[i] and hid[c] < hid[i]):
                load[i], load[c] = load[c], load[i]
                hid[i], hid[c] = hid[c], hid[i]
                i = c
            else:
                break
        j += 1
    if j == ls.shape[0]:
        return out
    # best-fit phase: bins on stacks by room (ids pushed in decreasing order -> pops lowest)
    room = np.empty(B, np.int64)
    for k in range(B):
        room[hid[k]] = capacity - load[k]
    for b in range(B - 1, -1, -1):
        r = room[b]
        if r > 0:
            nxt[b] = head[r]
            head[r] = b
            _seg_add(tree, size, r, 1)
    while j < ls.shape[0]:
        L = ls[j]
        r = _seg_find_first(tree, size, L)
        if r < 0:
            out[j] = -1
        else:
            b = head[r]
            head[r] = nxt[b]
            _seg_add(tree, size, r, -1)
            out[j] = b
            nr = r - L
            room[b] = nr
            if nr > 0:
                nxt[b] = head[nr]
                head[nr] = b
                _seg_add(tree, size, nr, 1)
        j += 1
    for b in range(B):  # clean the structures: every bin with room is on exactly one stack
        r = room[b]
        if r > 0:
            _seg_add(tree, size, r, -1)
            head[r] = -1
    return out


@numba.njit(cache=True)
def _pack_epoch(lengths, perm, capacity, R, group_tokens, min_group_items, swap_rounds, shuffle_keys, drop_last,
                small):
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
    maxn = n + R + 1  # bins (BFD: <= n; LPT groups: <= n + R - 1)
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
        # ---- main path: LPT into B bins (B from the token total / the BFD bin count), so every
        # bin of the group gets the same mix of long sequences and nearly the same fill;
        # sequences that do not fit are carried to the next group.
        if last and not drop_last:
            B = ((nb + R - 1) // R) * R
        else:
            B = (min(nb, tok // capacity) // R) * R
        if B == 0 and not last:
            carry = g
            continue
        if B == 0:
            break  # drop_last and less than one full step left
        # try LPT/best-fit splits from most-LPT (best balance) to most-best-fit (tightest fill);
        # take the first that keeps within `slack` of the ideal token count, else the fullest
        ideal = min(tok, B * capacity)
        slack = (B * capacity) // 2000
        best_kept = -1
        lpt_of = np.empty(0, np.int64)
        n_over = 0
        div = 0  # first pure LPT (balances best; fits when the bins have spare room), then C/small...
        while True:
            thr = 1 if div == 0 else max(1, capacity // div)
            cand = _lpt_bf(ls, B, capacity, thr, tree, size, head, nxt)
            kept_tok = 0
            c_over = 0
            for j in range(ls.shape[0]):
                if cand[j] >= 0:
                    kept_tok += ls[j]
                else:
                    c_over += 1
            if kept_tok > best_kept:
                best_kept = kept_tok
                lpt_of = cand
                n_over = c_over
            if kept_tok >= ideal - slack or div == 4:
                break
            div = small if div == 0 else div // 2
        if not (last and not drop_last and n_over > 0):
            cnt = np.zeros(B + 1, np.int64)
            new_carry = np.empty(n_over, np.int64)
            c = 0
            for j in range(gs.shape[0]):
                if lpt_of[j] >= 0:
                    cnt[lpt_of[j] + 1] += 1
                else:
                    new_carry[c] = gs[j]
                    c += 1
            carry = new_carry if not last else np.empty(0, np.int64)
            for b in range(B):
                cnt[b + 1] += cnt[b]
            fill = cnt[:-1].copy()
            items = np.empty(gs.shape[0] - n_over, np.int64)
            btok = np.zeros(B, np.int64)
            bsq = np.zeros(B, np.int64)
            for j in range(gs.shape[0]):
                b = lpt_of[j]
                if b >= 0:
                    items[fill[b]] = gs[j]
                    fill[b] += 1
                    btok[b] += ls[j]
                    bsq[b] += ls[j] * ls[j]
            # steps = R consecutive bins in decreasing sum(len^2) (empty bins, only possible in
            # the last group and then fewer than R of them, sort to the end: the last step)
            negsq = np.empty(B, np.int64)
            for b in range(B):
                negsq[b] = -bsq[b] * 4 - (1 if cnt[b + 1] > cnt[b] else 0)
            by_sq = np.argsort(negsq, kind="mergesort")
            n_steps = B // R
            blist = []
            tok_l = np.zeros(B, np.int64)
            sq_l = np.zeros(B, np.int64)
            has_empty = False
            for t in range(B):
                b = by_sq[t]
                blist.append(items[cnt[b]:cnt[b + 1]].copy())
                tok_l[t] = btok[b]
                sq_l[t] = bsq[b]
                if cnt[b + 1] == cnt[b]:
                    has_empty = True
            partial = has_empty
        else:
            blist, tok_l, sq_l, n_steps, partial, carry = _bfd_path(
                gs, ls, nb, bin_of, lengths, R, last)
        # ---- per step: balance by swaps, then emit in shuffled step order / rank order
        skeys = shuffle_keys[key_pos:key_pos + n_steps].copy()
        key_pos += n_steps
        if partial:
            skeys[n_steps - 1] = 2.0  # the step with empty packs stays last
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
    return out_idx[:n_out], out_off[: n_bins_out + 1]


@numba.njit(cache=True)
def _bfd_path(gs, ls, nb, bin_of, lengths, R, last):
    """Fallback (the last group when LPT does not fit): BFD bins; the tail step's bins split."""
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
    return blist, tok_l, sq_l, n_steps, tot_bins > keep_n, carry


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
               drop_last: bool = False, swap_rounds: int = 64) -> tuple[np.ndarray, np.ndarray]:
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
    return _pack_epoch(lengths, perm, C, R, group_tokens, _MIN_GROUP_ITEMS, int(swap_rounds), keys, bool(drop_last),
                       _SMALL_DIV)


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
        drop_last: like the original multipack sampler, drop the epoch's tail that does not
            fill whole steps (the last group keeps only full-budget steps). Off by default:
            every index appears exactly once.
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
        idx, off = pack_epoch(self.lengths, self.batch_max_length, self.num_replicas, self.seed, epoch,
                              self.drop_last)
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
