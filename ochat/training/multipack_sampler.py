"""Multipack distributed batch sampler: conversation lengths -> per-rank packs of <= C tokens.

A drop-in for the original multipack sampler (imoneoi/multipack_sampler): the same constructor
(`MultipackDistributedBatchSampler(batch_max_length, lengths, num_replicas=None, rank=None, seed=0)`),
`set_epoch`, `num_batches`, `generate_batches`, `efficiency`, and like it each batch is a numpy
int64 array of dataset indices. Usable alone: this module imports numpy and numba only (torch is
read, never imported, for the torch.distributed rank/world size). For `isinstance(x,
torch.utils.data.Sampler)` and the Hugging Face Trainer / TRL, see `multipack_adapters.py`.

    sampler = MultipackDistributedBatchSampler(16384, lengths, seed=0)
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
     0.05% of full. Sequences that do not fit are carried into the next group; nothing is dropped.
  5. Bins sorted by sum(len^2), R consecutive bins make a step (ranks of a step have nearly
     equal attention cost and tokens: the slowest rank sets the step time); a few
     capacity-respecting swaps polish each step. Step order and bin -> rank are shuffled.
  6. The last group uses ceil(bins / R) * R bins (fewer than R empty bins, only when it has
     fewer sequences than bins, all in the last step); if that does not fit, plain BFD bins
     are used and the last step's multi-sequence bins are split so a rank is left empty only
     when that step has fewer sequences than ranks.

Only the three loops that are O(n log C) per group are compiled (BFD, LPT + best fit, the
swaps), each for one signature (int64 arrays, ints), with no allocation or lists inside; the
per-group bookkeeping is vectorised numpy. That keeps numba's cold compile to a few seconds
(then cached on disk). Steps per epoch land within a fraction of a percent of the lower bound
ceil(sum(len) / (R*C)) on realistic data; see bench/sampler.py and bench/RESULTS.md.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Iterator

import numba
import numpy as np

__all__ = ["MultipackDistributedBatchSampler", "fill_empty_packs", "pack_epoch", "plan_stats"]

_GROUP_STEPS = 16  # steps' worth of tokens per packing group
_SMALL_DIV = 128  # after pure LPT: sequences shorter than C / 128 top bins up best-fit, longer go LPT
_MIN_GROUP_ITEMS = 4096  # at least this many sequences per group (matters for small R * C)
_EMPTY = np.zeros(0, np.int64)
_EMPTY.flags.writeable = False


# ----------------------------------------------------------------------------- kernels
# Every kernel takes int64 C-contiguous arrays and Python ints only (one compiled signature each)
# and allocates nothing: the caller owns the work arrays (see _Workspace).


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
def _seg_set(tree, size, leaf, count):
    """Set a leaf's count in the segment tree and update its ancestors' sums."""
    i = leaf + size
    tree[i] = count
    i >>= 1
    while i >= 1:
        tree[i] = tree[2 * i] + tree[2 * i + 1]
        i >>= 1


@numba.njit(cache=True)
def _fit(ls, B, capacity, small, open_bins, tree, size, head, nxt, load, hid, room, out):
    """Place items `ls` (sorted decreasing) into bins: out[j] = bin of item j, or -1 when it did
    not fit. Returns the number of bins.

    LPT phase: items >= `small` (and at least the B longest) go to the least-loaded of B bins
    (ties: lowest id; a min-heap of (load, id) in load/hid), which gives every bin the same mix
    of long sequences, hence nearly equal sum(len^2). Best-fit phase: the remaining items go to
    the bin with the smallest room that fits; bins with r tokens of room are kept on a stack
    head[r] and a segment tree over r finds that room in O(log C). When no bin fits, a new bin
    is opened if `open_bins` (with B = 0 and small > C: best-fit-decreasing), else -1.
    tree/head must be clean (zeros / -1) on entry and are left clean on exit.
    """
    n = ls.shape[0]
    for k in range(B):
        load[k] = 0
        hid[k] = k
    j = 0
    while j < n and (ls[j] >= small or j < B):  # the B longest: one per bin
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
    if j == n:
        return B
    # best-fit phase: bins on stacks by room (ids pushed in decreasing order -> pops lowest)
    for k in range(B):
        room[hid[k]] = capacity - load[k]
    for b in range(B - 1, -1, -1):
        r = room[b]
        if r > 0:
            nxt[b] = head[r]
            head[r] = b
            _seg_set(tree, size, r, tree[size + r] + 1)
    nbins = B
    while j < n:
        L = ls[j]
        r = _seg_find_first(tree, size, L)
        if r >= 0:
            b = head[r]
            head[r] = nxt[b]
            _seg_set(tree, size, r, tree[size + r] - 1)
            nr = r - L
        elif open_bins:
            b = nbins
            nbins += 1
            nr = capacity - L
        else:
            out[j] = -1
            j += 1
            continue
        out[j] = b
        room[b] = nr
        if nr > 0:
            nxt[b] = head[nr]
            head[nr] = b
            _seg_set(tree, size, nr, tree[size + nr] + 1)
        j += 1
    for b in range(nbins):  # clean the structures: every bin with room is on exactly one stack
        r = room[b]
        if r > 0:
            _seg_set(tree, size, r, tree[size + r] - 1)
            head[r] = -1
    return nbins


@numba.njit(cache=True)
def _balance_steps(items, offsets, bin_tok, bin_sq, lengths, R, capacity, max_rounds):
    """Per step (R consecutive bins of the CSR items/offsets), swap single items between the
    max- and min-sum(len^2) bins, in place.

    Each round picks the step's bin pair (max sq, min sq) and the swap (a from max, b from min,
    len a > len b) that brings their sq closest together while both stay within capacity; a
    step stops when no swap improves it. Bin sizes never change, so offsets stay valid.
    bin_tok/bin_sq (per bin) are updated with the swaps.
    """
    for s0 in range(0, bin_tok.shape[0], R):
        for _ in range(max_rounds):
            hi = s0
            lo = s0
            for k in range(s0, s0 + R):
                if bin_sq[k] > bin_sq[hi]:
                    hi = k
                if bin_sq[k] < bin_sq[lo]:
                    lo = k
            gap = bin_sq[hi] - bin_sq[lo]
            if gap <= 0:
                break
            best = gap
            ba = -1
            bb = -1
            for ia in range(offsets[hi], offsets[hi + 1]):
                la = lengths[items[ia]]
                for ib in range(offsets[lo], offsets[lo + 1]):
                    lb = lengths[items[ib]]
                    if la <= lb:
                        continue
                    if bin_tok[lo] + la - lb > capacity:
                        continue
                    new_gap = abs(gap - 2 * (la * la - lb * lb))
                    if new_gap < best:
                        best = new_gap
                        ba = ia
                        bb = ib
            if ba < 0:
                break
            la = lengths[items[ba]]
            lb = lengths[items[bb]]
            items[ba], items[bb] = items[bb], items[ba]
            bin_tok[hi] += lb - la
            bin_tok[lo] += la - lb
            bin_sq[hi] += lb * lb - la * la
            bin_sq[lo] += la * la - lb * lb


# ----------------------------------------------------------------------------- per-group bookkeeping (numpy)


@dataclass
class _Workspace:
    """Work arrays of the kernels, allocated once per epoch. tree/head are kept clean between calls."""

    size: int  # leaves of the room segment tree (a power of two > C)
    tree: np.ndarray
    head: np.ndarray
    nxt: np.ndarray
    bin_of: np.ndarray  # the group's best-fit-decreasing bins
    load: np.ndarray
    hid: np.ndarray
    room: np.ndarray
    out: np.ndarray

    @classmethod
    def allocate(cls, n: int, capacity: int, R: int) -> "_Workspace":
        size = 1 << capacity.bit_length()
        maxn = n + R + 1  # bins (BFD: <= n; LPT groups: <= n + R - 1)
        return cls(size, np.zeros(2 * size, np.int64), np.full(capacity + 1, -1, np.int64),
                   *(np.empty(maxn, np.int64) for _ in range(6)))


def _segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Exact int64 sums of values[offsets[k]:offsets[k+1]] for every k (empty segments give 0)."""
    cs = np.zeros(values.shape[0] + 1, np.int64)
    np.cumsum(values, out=cs[1:])
    return cs[offsets[1:]] - cs[offsets[:-1]]


def _bin_costs(lengths: np.ndarray, items: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, sum of len^2) of every bin of the CSR items/offsets."""
    item_lengths = lengths[items]
    return _segment_sums(item_lengths, offsets), _segment_sums(item_lengths ** 2, offsets)


def _csr_take(items: np.ndarray, offsets: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bins `order` (indices into the CSR items/offsets), in that order, as a new CSR."""
    sizes = np.diff(offsets)[order]
    new_off = np.zeros(order.shape[0] + 1, np.int64)
    np.cumsum(sizes, out=new_off[1:])
    src = np.repeat(offsets[:-1][order] - new_off[:-1], sizes) + np.arange(new_off[-1])
    return items[src], new_off


def _csr_from_bins(values: np.ndarray, bin_of: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR of values grouped by bin_of (>= 0), keeping their order within a bin."""
    order = np.argsort(bin_of, kind="stable")
    offsets = np.zeros(n_bins + 1, np.int64)
    np.cumsum(np.bincount(bin_of, minlength=n_bins), out=offsets[1:])
    return values[order], offsets


def _bfd_last_group(gs: np.ndarray, bin_of: np.ndarray, nb: int, lengths: np.ndarray,
                    R: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """The last group's plan when LPT does not fit it: its BFD bins, the fullest multiples of R
    first (each step's bins alike in sum(len^2)), then the tail step, whose multi-sequence bins
    are split so a rank is left empty only when that step has fewer sequences than ranks.
    Returns (items, offsets, whether there is such a tail step: it stays the epoch's last)."""
    items, off = _csr_from_bins(gs, bin_of, nb)
    tok, sq = _bin_costs(lengths, items, off)
    by_fill = np.argsort(-tok, kind="stable")
    full_n = (nb // R) * R
    head = by_fill[:full_n][np.argsort(sq[by_fill[:full_n]], kind="stable")]
    head_items, head_off = _csr_take(items, off, head)
    tail = [items[off[b]:off[b + 1]] for b in by_fill[full_n:]]
    if tail:
        tail += [_EMPTY] * (R - len(tail))
        fill_empty_packs(tail, lengths)
    tail_off = head_off[-1] + np.cumsum([0] + [len(t) for t in tail])
    return np.concatenate([head_items, *tail]), np.concatenate([head_off, tail_off[1:]]), bool(tail)


def fill_empty_packs(packs: list[np.ndarray], lengths: np.ndarray) -> None:
    """Give every empty pack one sequence, in place: each empty pack in turn takes the longest
    sequence of the pack with the most sequences (the first such), while one has two or more."""
    sizes = np.array([len(p) for p in packs], np.int64)
    for e in np.flatnonzero(sizes == 0):
        donor = int(np.argmax(sizes))
        if sizes[donor] < 2:
            return
        k = int(np.argmax(lengths[packs[donor]]))
        packs[e] = packs[donor][k:k + 1]
        packs[donor] = np.delete(packs[donor], k)
        sizes[e], sizes[donor] = 1, sizes[donor] - 1


def _lpt_group(ls: np.ndarray, B: int, capacity: int, ideal: int, ws: _Workspace) -> np.ndarray:
    """Bins of a group's items (ls sorted decreasing) in B bins; -1 = carried to the next group.
    Tries LPT/best-fit splits from most-LPT (best balance) to most-best-fit (tightest fill) and
    takes the first within 0.05% of the ideal token count, else the fullest."""
    slack = (B * capacity) // 2000
    best, best_kept = None, -1
    div = 0  # first pure LPT (balances best; fits when the bins have spare room), then C/_SMALL_DIV...
    while True:
        small = 1 if div == 0 else max(1, capacity // div)
        out = ws.out[:ls.shape[0]]
        _fit(ls, B, capacity, small, False, ws.tree, ws.size, ws.head, ws.nxt, ws.load, ws.hid, ws.room, out)
        kept = int(ls[out >= 0].sum())
        if kept > best_kept:
            best, best_kept = out.copy(), kept
        if kept >= ideal - slack or div == 4:
            return best
        div = _SMALL_DIV if div == 0 else div // 2


def _pack_groups(lengths: np.ndarray, perm: np.ndarray, keys: np.ndarray, C: int, R: int, drop_last: bool,
                 swap_rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps 2-6 of the module docstring. keys: uniform floats, consumed in order to shuffle
    steps within a group and bins within a step."""
    n = perm.shape[0]
    ws = _Workspace.allocate(n, C, R)
    group_tokens = _GROUP_STEPS * R * C
    cum = np.zeros(n + 1, np.int64)
    np.cumsum(lengths[perm], out=cum[1:])
    parts, sizes = [], []
    carry, pos, key_pos = _EMPTY, 0, 0
    while pos < n or carry.shape[0]:
        # ---- a group: carry + the next sequences up to group_tokens (and _MIN_GROUP_ITEMS)
        carry_tok = int(lengths[carry].sum())
        by_tokens = int(np.searchsorted(cum, cum[pos] + group_tokens - carry_tok, "left"))
        end = min(n, max(pos, by_tokens, pos + _MIN_GROUP_ITEMS - carry.shape[0]))
        tok = carry_tok + int(cum[end] - cum[pos])
        last = end >= n
        g = np.concatenate((carry, perm[pos:end]))
        pos = end
        gs = g[np.argsort(-lengths[g], kind="stable")]
        ls = lengths[gs]
        nb = _fit(ls, 0, C, C + 1, True, ws.tree, ws.size, ws.head, ws.nxt, ws.load, ws.hid, ws.room, ws.bin_of)
        # ---- B bins (from the token total / the BFD bin count), a multiple of R
        B = -(-nb // R) * R if last and not drop_last else (min(nb, tok // C) // R) * R
        if B == 0:
            if last:
                break  # drop_last and less than one full step left
            carry = g
            continue
        bin_of = _lpt_group(ls, B, C, min(tok, B * C), ws)
        fits = bin_of >= 0
        if last and not drop_last and not fits.all():
            items, offsets, partial = _bfd_last_group(gs, ws.bin_of[:gs.shape[0]], nb, lengths, R)
            carry = _EMPTY
            tok, sq = _bin_costs(lengths, items, offsets)
        else:
            carry = _EMPTY if last else gs[~fits]
            items, offsets = _csr_from_bins(gs[fits], bin_of[fits], B)
            # steps = R consecutive bins in decreasing sum(len^2) (empty bins, only possible in
            # the last group and then fewer than R of them, sort to the end: the last step)
            tok, sq = _bin_costs(lengths, items, offsets)
            nonempty = np.diff(offsets) > 0
            by_sq = np.argsort(-4 * sq - nonempty, kind="stable")
            items, offsets = _csr_take(items, offsets, by_sq)
            tok, sq = tok[by_sq], sq[by_sq]
            partial = not nonempty.all()  # the step with empty packs stays last
        n_steps = (offsets.shape[0] - 1) // R
        # ---- balance each step by swaps, then emit in shuffled step order / rank order
        if swap_rounds > 0 and R > 1:
            _balance_steps(items, offsets, tok, sq, lengths, R, C, swap_rounds)
        step_keys = keys[key_pos:key_pos + n_steps].copy()
        key_pos += n_steps
        if partial:
            step_keys[-1] = 2.0  # (keys are < 1) the last step stays last
        rank_keys = keys[key_pos:key_pos + n_steps * R].reshape(n_steps, R)
        key_pos += n_steps * R
        emit = np.argsort(step_keys, kind="stable")[:, None] * R + np.argsort(rank_keys, axis=1, kind="stable")
        items, offsets = _csr_take(items, offsets, emit.ravel())
        parts.append(items)
        sizes.append(np.diff(offsets))
    if not parts:
        return _EMPTY, np.zeros(1, np.int64)
    offsets = np.zeros(sum(s.shape[0] for s in sizes) + 1, np.int64)
    np.cumsum(np.concatenate(sizes), out=offsets[1:])
    return np.concatenate(parts), offsets


# ----------------------------------------------------------------------------- python API


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), 0x6D75])))


def pack_epoch(lengths: np.ndarray, batch_max_length: int, num_replicas: int, seed: int = 0, epoch: int = 0,
               drop_last: bool = False, swap_rounds: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Full plan of one epoch: (indices, offsets), pack of (step s, rank r) =
    indices[offsets[s*R + r] : offsets[s*R + r + 1]]. Lengths must be validated already."""
    lengths = np.require(lengths, np.int64, ["C", "W"])  # one compiled signature: no read-only arrays
    n = lengths.shape[0]
    R = int(num_replicas)
    rng = _epoch_rng(seed, epoch)
    perm = rng.permutation(n).astype(np.int64)
    # every step but the last has R non-empty packs: steps <= n // R + 1; keys per step: R + 1
    keys = rng.random((n // R + 1) * (R + 1))
    return _pack_groups(lengths, perm, keys, int(batch_max_length), R, bool(drop_last), int(swap_rounds))


def plan_stats(lengths: np.ndarray, indices: np.ndarray, offsets: np.ndarray, batch_max_length: int,
               num_replicas: int, quadratic_weight: float = 2e-5) -> dict:
    """Packing statistics of a plan (see MultipackDistributedBatchSampler.stats)."""
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    R = int(num_replicas)
    indices = np.asarray(indices, np.int64)
    tok, sq = _bin_costs(lengths, indices, np.asarray(offsets, np.int64))
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
        "packed_tokens": packed,
        "num_sequences": int(lengths.shape[0]),
        "packed_sequences": int(indices.shape[0]),
        "dropped_sequences": int(lengths.shape[0] - indices.shape[0]),
        "l2_lag_mean": float(lag.mean()),
        "l2_lag_max": float(lag.max()),
        "balance_mean": float(balance.mean()),  # modeled max-rank cost / mean-rank cost, per step
        "balance_max": float(balance.max()),
        "empty_packs": int((tok == 0).sum()),
    }


_SIGNATURE = "MultipackDistributedBatchSampler(batch_max_length, lengths, num_replicas=None, rank=None, seed=0)"


def _check_call(batch_max_length, lengths) -> tuple[int, np.ndarray]:
    """(batch_max_length as int, lengths as a 1-D array), or a TypeError that names the order."""
    try:
        budget = operator.index(batch_max_length)
    except TypeError:
        hint = (" (it looks like (lengths, batch_max_length), the other order)"
                if np.ndim(batch_max_length) == 1 and np.ndim(lengths) == 0 else "")
        raise TypeError(f"{_SIGNATURE}: batch_max_length must be an integer token budget, got "
                        f"{type(batch_max_length).__name__}{hint}; positional arguments follow the original "
                        f"multipack sampler's order, or pass batch_max_length=..., lengths=...") from None
    array = np.asarray(lengths)
    if array.ndim != 1:
        raise TypeError(f"{_SIGNATURE}: lengths must be a 1-D sequence of token counts, got "
                        f"{type(lengths).__name__} of shape {array.shape}; positional arguments follow the "
                        f"original multipack sampler's order, or pass batch_max_length=..., lengths=...")
    return budget, array


class MultipackDistributedBatchSampler:
    """Batch sampler yielding, for this rank, one numpy int64 array of dataset indices per micro-step.

    Args:
        batch_max_length: token budget C of one pack (one rank, one micro-step).
        lengths: token count of every sequence (1 <= length <= batch_max_length).
        num_replicas, rank: default to torch.distributed's world size / rank when it is
            initialised, else 1 / 0.
        seed: shuffling seed; the plan is a pure function of (lengths, C, seed, epoch, R).
        drop_last: like the original multipack sampler, drop the epoch's tail that does not
            fill whole steps (the last group keeps only full-budget steps). Off by default:
            every index appears exactly once.
        quadratic_weight: b/a of the modeled cost a*tokens + b*sum(len^2) used by stats()
            (2e-5 ~ a 7B Llama: 6*layers*hidden / (6*params)).

    The positional order is the original multipack sampler's; keyword calls work in any order.

    Guarantees: every index exactly once per epoch (unless drop_last), every pack <= C tokens,
    all ranks yield the same count, a pack is empty only in the last step and only when it
    has fewer sequences than ranks; a new order each epoch; ranks agree without communication.
    """

    def __new__(cls, *args, **kwargs):
        # S(lengths, batch_max_length=C) would otherwise fail with Python's "got multiple values
        # for argument" before __init__ runs, which does not say the expected order
        for position, name in enumerate(("batch_max_length", "lengths")):
            if len(args) > position and name in kwargs:
                raise TypeError(f"{_SIGNATURE}: {name} given both as positional argument {position + 1} and as a "
                                f"keyword; positional arguments follow the original multipack sampler's order "
                                f"(batch_max_length, lengths), or pass both as keywords")
        return super().__new__(cls)

    def __init__(self, batch_max_length: int, lengths, num_replicas: int | None = None, rank: int | None = None,
                 seed: int = 0, *, drop_last: bool = False, quadratic_weight: float = 2e-5):
        budget, lengths = _check_call(batch_max_length, lengths)
        if num_replicas is None or rank is None:
            dist_r, dist_rank = _dist_defaults()
            num_replicas = dist_r if num_replicas is None else num_replicas
            rank = dist_rank if rank is None else rank
        if lengths.size and not np.issubdtype(lengths.dtype, np.integer):
            if not np.all(np.equal(np.mod(lengths, 1), 0)):
                raise ValueError("lengths must be integers")
        self.lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        self.batch_max_length = budget
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
        # efficiency() as in the original: tokens packed / token slots, over the epochs iterated
        self.eff_total_used = 0
        self.eff_total_slots = 0
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    # -- plan
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan iteration yields (a new shuffle per epoch)."""
        self.epoch = int(epoch)

    def pack(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Compute one epoch's plan, uncached (plan() caches it); the layout of plan()."""
        return pack_epoch(self.lengths, self.batch_max_length, self.num_replicas, self.seed, epoch, self.drop_last)

    def plan(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(indices, offsets) of the whole epoch, all ranks: the pack of (step s, rank r) is
        indices[offsets[s*R + r] : offsets[s*R + r + 1]]. Cached for the latest epoch."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, *self.pack(epoch))
        return self._cache[1], self._cache[2]

    def all_rank_batches(self, epoch: int | None = None) -> list[list[list[int]]]:
        """The full plan as [step][rank] -> list of indices."""
        idx, off = self.plan(epoch)
        R = self.num_replicas
        S = (off.shape[0] - 1) // R
        return [[idx[off[s * R + r]:off[s * R + r + 1]].tolist() for r in range(R)] for s in range(S)]

    def generate_batches(self, set_stats: bool = False) -> list[np.ndarray]:
        """This rank's batches of the current epoch (int64 index arrays), as the original's
        generate_batches; set_stats=True adds the epoch to efficiency() (as iterating does)."""
        idx, off = self.plan()
        R, r = self.num_replicas, self.rank
        batches = [idx[off[s * R + r]:off[s * R + r + 1]].copy() for s in range((off.shape[0] - 1) // R)]
        if set_stats:
            st = self.stats()
            self.eff_total_used += st["packed_tokens"]
            self.eff_total_slots += st["num_batches"] * R * self.batch_max_length
        return batches

    def num_batches(self) -> int:
        """Batches per rank in the current epoch (the same on every rank)."""
        return (self.plan()[1].shape[0] - 1) // self.num_replicas

    def __len__(self) -> int:
        return self.num_batches()

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.generate_batches(set_stats=True))

    def efficiency(self) -> float:
        """Tokens packed / token slots (steps * num_replicas * batch_max_length), all ranks,
        summed over every epoch iterated so far, as the original's efficiency(); before the
        first iteration, the current epoch's plan."""
        if self.eff_total_slots == 0:
            return self.stats()["efficiency"]
        return self.eff_total_used / self.eff_total_slots

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
