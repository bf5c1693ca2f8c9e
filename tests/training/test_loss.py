"""The step's gradient equals grad(sum w*CE)/sum w however the targets are split (math level)."""
import torch

from ochat.training.loss import grad_average_ranks, loss_scale


def _sums(w_head, x, labels, weights):
    ce = torch.nn.functional.cross_entropy(x @ w_head.t(), labels, reduction="none")
    return (weights * ce).sum()


def _simulated_deepspeed_grad(w0, splits, world, accum):
    """splits[r][m] = (x, labels, weights) for rank r, micro-step m. Mimics DeepSpeed: backward
    divides by accum, gradients are averaged over ranks."""
    total_w = sum(s[2].sum() for rank in splits for s in rank).item()  # the all-reduced step weight
    grads = []
    for rank in splits:
        w = w0.clone().requires_grad_(True)
        for x, y, wt in rank:
            (_sums(w, x, y, wt) * loss_scale(total_w, world, accum) / accum).backward()
        grads.append(w.grad)
    return torch.stack(grads).mean(0)


def _problem(seed, V, H, N):
    """A random lm_head w0 and N targets (x, y, weights, some 0); the step gradient grad(sum w*CE) / sum w."""
    torch.manual_seed(seed)
    w0 = torch.randn(V, H, dtype=torch.float64)
    x, y = torch.randn(N, H, dtype=torch.float64), torch.randint(0, V, (N,))
    wt = torch.rand(N, dtype=torch.float64) * (torch.rand(N) > 0.3)
    w = w0.clone().requires_grad_(True)
    (_sums(w, x, y, wt) / wt.sum()).backward()
    return w0, x, y, wt, w.grad


def test_gradient_invariant_to_packing_ranks_and_micro_steps():
    N = 24
    w0, x, y, wt, want = _problem(0, 11, 5, N)

    def part(a, b):
        return (x[a:b], y[a:b], wt[a:b])

    layouts = [
        ([[part(0, N)]], 1, 1),
        ([[part(0, 7)], [part(7, N)]], 2, 1),  # unequal packs over two ranks
        ([[part(0, 3), part(3, N)]], 1, 2),  # two micro-steps on one rank
        ([[part(0, 5), part(5, 6)], [part(6, 20), part(20, N)], [part(N, N), part(N, N)], [part(0, 0), part(0, 0)]], 4, 2),
    ]
    for splits, world, accum in layouts:
        got = _simulated_deepspeed_grad(w0, splits, world, accum)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_scale_values_and_zero_weight_step():
    assert loss_scale(0.0, 2, 4).item() == 0.0
    assert loss_scale(8.0, 2, 4).item() == 1.0


def test_scale_of_a_tensor_stays_a_tensor_and_is_finite_at_zero():
    w = torch.tensor(0.0, dtype=torch.float64)
    s = loss_scale(w, 8, 2)
    assert isinstance(s, torch.Tensor) and s.device == w.device and s.dtype == torch.float64
    assert torch.isfinite(s) and s.item() == 0.0
    loss = torch.tensor(3.5, requires_grad=True)
    (loss * s.float()).backward()  # a step without targets: zero gradient, not NaN
    assert loss.grad.item() == 0.0
    assert loss_scale(torch.tensor(12.0, dtype=torch.float64), 3, 4).item() == 1.0


def test_deepspeeds_gradient_divisor_under_sequence_parallelism():
    zero2, zero3 = {"zero_optimization": {"stage": 2}}, {"zero_optimization": {"stage": 3}}
    assert grad_average_ranks(zero2, 8) == grad_average_ranks(zero3, 8) == grad_average_ranks({}, 8) == 8
    assert grad_average_ranks(dict(zero2, sequence_parallel_size=4), 8) == 2  # summed within a group
    assert grad_average_ranks(dict(sequence_parallel_size=4), 8) == 2  # ZeRO off: the same reduction
    assert grad_average_ranks(dict(zero3, sequence_parallel_size=4), 8) == 8  # ZeRO-3 averages over all ranks


def test_sliced_packs_give_the_step_gradient_under_either_reduction():
    """World of 4 ranks = 2 sequence-parallel groups of 2, 2 micro-steps: each rank holds a slice of its group's
    pack. DeepSpeed sums the gradients of all ranks and divides by grad_average_ranks (2 under ZeRO-2, 4 under
    ZeRO-3): either way the step's gradient is grad(sum w*CE) / sum w."""
    w0, x, y, wt, want = _problem(1, 7, 4, 40)
    packs = [(0, 10), (10, 22), (22, 30), (30, 40)]  # group g's micro-step m trains pack 2m + g
    for stage in (2, 3):
        ranks = grad_average_ranks({"zero_optimization": {"stage": stage}, "sequence_parallel_size": 2}, 4)
        total = torch.zeros_like(w0)
        for rank in range(4):
            group, sp_rank = divmod(rank, 2)
            for m in range(2):
                a, b = packs[2 * m + group]
                lo, hi = a + sp_rank * (b - a) // 2, a + (sp_rank + 1) * (b - a) // 2  # this rank's slice
                wr = w0.clone().requires_grad_(True)
                (_sums(wr, x[lo:hi], y[lo:hi], wt[lo:hi]) * loss_scale(wt.sum().item(), ranks, 2) / 2).backward()
                total += wr.grad
        torch.testing.assert_close(total / ranks, want, rtol=1e-12, atol=1e-12)
