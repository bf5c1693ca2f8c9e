"""Weighted linear cross-entropy: hidden states x lm_head -> sums for the weighted loss.

Fused path (Liger-style): the tokens are processed in chunks, so the `[tokens, vocab]` logits
are never held whole. For each chunk the forward computes the logits with one matmul, a Triton
kernel (CUDA) or a few PyTorch ops (CPU) turns them in place into `w * (softmax - onehot)` while
computing log-sum-exp, loss and argmax, then `grad_hidden[chunk] = g @ W` and `grad_W += g.T @ h`
(float32 accumulator). Backward only scales the stored gradients by grad_output. On the CPU path
weight-0 rows are dropped before the matmul; on CUDA the model passes only target rows
(`target_index`, computed by the collate on the CPU: no host sync), and weight-0 rows that still
arrive get zero loss and zero gradient.

Final-logit soft-capping (Gemma 2, `softcap=c`): the loss is taken on `c * tanh(logits / c)`, inside the
chunk (forward and gradient, `d/dx = 1 - tanh^2(x / c)`), so it costs no extra pass over the logits.

Trained token rows (LoRA's --lora-trainable-tokens, `rows=(ids, values)`): the frozen weight with its rows `ids`
replaced by `values` (`replace_rows`); the fused path computes the gradient of those rows alone
(`grad_rows += g[:, ids].T @ h`), never the full [V, H] weight gradient, at the cost of one transient copy of the
weight during the loss.

The trainer's loss is `sum(w * CE) / sum(w)` over all target tokens of a whole optimizer step
(all ranks and micro-steps), so this returns sums, never a mean: the caller normalises.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ochat.kernels.fused import fused_enabled

try:
    import triton
    import triton.language as tl

    from ochat.kernels.triton_math import tanh
except ImportError:  # the chunked PyTorch path still works
    triton = None


class LossSums(NamedTuple):
    """Sums over the tokens of one pack. Only `weighted_loss` carries a gradient."""

    weighted_loss: torch.Tensor  # sum(w * CE), float32 scalar
    weight: torch.Tensor  # sum(w), float32 scalar
    correct: torch.Tensor  # number of tokens with w > 0 whose argmax equals the label, float32 scalar
    targets: torch.Tensor  # number of tokens with w > 0, float32 scalar
    aux_loss: torch.Tensor | None = None  # a model's auxiliary loss, a sum like weighted_loss (ochat.model.experts)
    expert_tokens: torch.Tensor | None = None  # an expert model's tokens per expert [expert layers, E], no gradient


def soft_cap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """`softcap * tanh(logits / softcap)` (Gemma 2's final-logit soft-capping); the logits unchanged when None."""
    if softcap is None:
        return logits
    return torch.tanh(logits / softcap) * softcap


Rows = tuple[torch.Tensor, torch.Tensor]  # (ids [n], values [n, H]): trained rows of a frozen weight [V, H]


def replace_rows(weight: torch.Tensor, rows: Rows | None) -> torch.Tensor:
    """`weight` with its rows `ids` replaced by `values` (cast to its dtype), differentiable w.r.t. the values only;
    `weight` itself when `rows` is None."""
    if rows is None:
        return weight
    ids, values = rows
    return weight.detach().index_copy(0, ids, values.to(weight.dtype))


def weighted_linear_cross_entropy_reference(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, label_weights: torch.Tensor,
    softcap: float | None = None, rows: Rows | None = None,
) -> LossSums:
    """Plain definition: full logits `hidden [T, H] @ lm_head_weight[V, H].T` (float32 at least, soft-capped
    when `softcap` is given; `rows` replaced, `replace_rows`), then weighted CE.

    Tokens with weight 0 contribute nothing (their label may be anything, e.g. -100).
    """
    logits = hidden @ replace_rows(lm_head_weight, rows).t()
    logits = soft_cap(logits if logits.dtype == torch.float64 else logits.float(), softcap)
    is_target = label_weights > 0
    safe_labels = torch.where(is_target, labels, torch.zeros_like(labels))
    ce = F.cross_entropy(logits, safe_labels, reduction="none")
    w = label_weights.float()
    correct = ((logits.argmax(-1) == safe_labels) & is_target).sum().float()
    return LossSums(
        weighted_loss=(w * ce).sum(),
        weight=w.sum(),
        correct=correct,
        targets=is_target.sum().float(),
    )


_CHUNK_ELEMENTS = 64 * 1024 * 1024  # logits elements per chunk (128 MiB in bf16)


def _chunk_rows(n: int, vocab: int) -> int:
    rows = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    rows = 1 << int(math.log2(rows))  # a power of two keeps matmul shapes friendly
    return max(1, min(n, rows))


if triton is not None:

    @triton.jit
    def _ce_chunk_kernel(
        logits_ptr, stride, labels_ptr, weights_ptr, loss_ptr, correct_ptr, V, cap,
        BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr, SOFTCAP: tl.constexpr,
    ):
        """One row of logits: loss = w * (lse - x[label]), argmax == label, and in place g = w * (softmax - onehot).

        With SOFTCAP, x is `cap * tanh(logits / cap)` and g is multiplied by its derivative `1 - tanh^2`."""
        row = tl.program_id(0).to(tl.int64)
        ptr = logits_ptr + row * stride
        w = tl.load(weights_ptr + row).to(tl.float32)
        label = tl.load(labels_ptr + row).to(tl.int32)
        is_t = w > 0
        label = tl.where(is_t, label, 0)
        m = float("-inf")
        s = 0.0
        best = float("-inf")
        best_idx = 0
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            if SOFTCAP:
                x = tl.where(cols < V, cap * tanh(x / cap), float("-inf"))
            bmax = tl.max(x, 0)
            bidx = tl.min(tl.where(x == bmax, cols, V), 0)
            take = bmax > best
            best_idx = tl.where(take, bidx, best_idx)
            best = tl.where(take, bmax, best)
            m_new = tl.maximum(m, bmax)
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        x_label = tl.load(ptr + label).to(tl.float32)
        if SOFTCAP:
            x_label = cap * tanh(x_label / cap)
        tl.store(loss_ptr + row, tl.where(is_t, w * (lse - x_label), 0.0))
        tl.store(correct_ptr + row, tl.where(is_t & (best_idx == label), 1.0, 0.0))
        if WRITE_GRAD:
            for off in range(0, V, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                mask = cols < V
                x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
                if SOFTCAP:
                    t = tanh(x / cap)
                    g = (tl.exp(cap * t - lse) - tl.where(cols == label, 1.0, 0.0)) * (1.0 - t * t)
                else:
                    g = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
                g = tl.where(is_t, g * w, 0.0)
                tl.store(ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def _chunk_triton(logits, labels, weights, write_grad, softcap):
    """In place on logits [C, V] (contiguous); returns per-row weighted loss and correct flags (float32)."""
    c, v = logits.shape
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    correct = torch.empty(c, dtype=torch.float32, device=logits.device)
    block = min(8192, triton.next_power_of_2(v))
    _ce_chunk_kernel[(c,)](
        logits, logits.stride(0), labels, weights, loss, correct, v, float(softcap or 1.0),
        BLOCK=block, WRITE_GRAD=write_grad, SOFTCAP=softcap is not None, num_warps=8 if block >= 4096 else 4,
    )
    return loss, correct


def _chunk_torch(logits, labels, weights, write_grad, softcap):
    """Same as the Triton kernel in PyTorch: float32 math, gradient written into logits in place (a scratch chunk:
    overwritten whether or not the gradient is asked for). In place where it can be: on a CPU each fresh
    [rows, V] temporary costs more than the arithmetic on it."""
    x = logits.float()  # logits itself when float32
    if softcap is not None:
        t = torch.tanh(x / softcap)
        x = t * softcap
    is_t = weights > 0
    safe = torch.where(is_t, labels, torch.zeros_like(labels))
    x_label = x.gather(1, safe[:, None]).squeeze(1)
    x_max, argmax = x.max(dim=-1)  # the first maximal index, as argmax
    p = x.sub_(x_max[:, None]).exp_()  # x is logits or a temporary of ours
    total = p.sum(-1)
    lse = x_max + total.log()
    w = weights.float()
    loss = torch.where(is_t, w * (lse - x_label), torch.zeros_like(lse))
    correct = ((argmax == safe) & is_t).float()
    if write_grad:
        g = p.div_(total[:, None])
        g[torch.arange(len(safe), device=g.device), safe] -= 1.0
        g *= torch.where(is_t, w, torch.zeros_like(w))[:, None]
        if softcap is not None:
            g *= 1.0 - t * t
        if g is not logits:
            logits.copy_(g)
    return loss, correct


def _fused_forward(hidden, weight, labels, label_weights, need_grad_h, need_grad_w, use_triton, softcap,
                   grad_rows=None, grad_w_dtype=None):
    """Chunked loss sums, plus gradients of sum(w * CE) w.r.t. hidden and weight (or None), the latter in
    `grad_w_dtype` (default: the weight's); with `grad_rows` (ids [n]) the weight's gradient is that of those rows
    alone, [n, H]."""
    n, h = hidden.shape
    v = weight.shape[0]
    write_grad = need_grad_h or need_grad_w
    grad_h = torch.zeros_like(hidden) if need_grad_h else None
    grad_shape = weight.shape if grad_rows is None else (len(grad_rows), h)
    grad_w32 = torch.zeros(grad_shape, dtype=torch.float32, device=weight.device) if need_grad_w else None
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    correct_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    rows = _chunk_rows(n, v)
    chunk_fn = _chunk_triton if use_triton else _chunk_torch
    for start in range(0, n, rows):
        h_c = hidden[start:start + rows]
        logits = h_c @ weight.t()  # [C, V] in the input dtype (float32 accumulation inside the matmul)
        loss, correct = chunk_fn(logits, labels[start:start + rows], label_weights[start:start + rows], write_grad,
                                 softcap)
        loss_sum += loss.sum()
        correct_sum += correct.sum()
        if need_grad_h:
            torch.mm(logits, weight, out=grad_h[start:start + rows])
        if need_grad_w:
            g = logits if grad_rows is None else logits[:, grad_rows]
            if grad_w32.dtype == g.dtype:
                grad_w32.addmm_(g.t(), h_c)
            else:
                grad_w32 += g.t() @ h_c
        del logits
    grad_w = None
    if need_grad_w:
        grad_w = grad_w32.to(grad_w_dtype or weight.dtype)
    return loss_sum, correct_sum, grad_h, grad_w


class _FusedLinearCE(torch.autograd.Function):
    """Loss sums of `hidden @ weight.T`; with `row_ids`, `weight` already holds `row_values` in those rows (a
    detached copy) and the weight's gradient goes to `row_values`."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, label_weights, use_triton, softcap, row_values=None, row_ids=None):
        ctx.rows = row_values is not None
        loss, correct, grad_h, grad_w = _fused_forward(
            hidden, weight, labels, label_weights, ctx.needs_input_grad[0],
            ctx.needs_input_grad[6] if ctx.rows else ctx.needs_input_grad[1], use_triton, softcap,
            grad_rows=row_ids, grad_w_dtype=row_values.dtype if ctx.rows else None,
        )
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w * grad_loss.to(grad_w.dtype)
        if ctx.rows:
            return grad_h, None, None, None, None, None, grad_w, None
        return grad_h, grad_w, None, None, None, None, None, None


def weighted_linear_cross_entropy_fused(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, label_weights: torch.Tensor,
    use_triton: bool | None = None, softcap: float | None = None, rows: Rows | None = None,
) -> LossSums:
    """Chunked, memory-bounded version of the reference (Triton on CUDA unless use_triton=False). With `rows` the
    weight must be frozen: only the rows' values get a gradient."""
    if use_triton is None:
        use_triton = triton is not None and hidden.is_cuda
    labels = labels.contiguous()
    label_weights = label_weights.contiguous()
    is_target = label_weights > 0
    if not hidden.is_cuda:
        # No device to keep busy: drop weight-0 rows before the matmul (costs a host sync on CUDA).
        keep = is_target.nonzero().squeeze(1)
        hidden, labels, label_weights = hidden[keep], labels[keep], label_weights[keep]
    hidden = hidden.contiguous()
    row_values = row_ids = None
    if rows is not None:
        row_ids, row_values = rows
        lm_head_weight = replace_rows(lm_head_weight, (row_ids, row_values.detach()))
    if not torch.is_grad_enabled():
        hidden, lm_head_weight = hidden.detach(), lm_head_weight.detach()
        row_values = None if row_values is None else row_values.detach()
    loss, correct = _FusedLinearCE.apply(hidden, lm_head_weight, labels, label_weights, use_triton, softcap,
                                         row_values, row_ids)
    return LossSums(
        weighted_loss=loss,
        weight=label_weights.float().sum(),
        correct=correct,
        targets=is_target.sum().float(),
    )


def weighted_linear_cross_entropy(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, label_weights: torch.Tensor,
    softcap: float | None = None, rows: Rows | None = None,
) -> LossSums:
    """Weighted CE sums of `hidden @ lm_head_weight.T` (soft-capped when `softcap` is given; the frozen weight's
    rows `ids` replaced by the trained `values` when `rows` is given) against labels; the fastest implementation
    available.

    Fused and chunked (never the full logits) unless switched off (`ochat.kernels.fused`), then the reference.
    """
    if fused_enabled("linear_ce"):
        return weighted_linear_cross_entropy_fused(hidden, lm_head_weight, labels, label_weights, softcap=softcap,
                                                   rows=rows)
    return weighted_linear_cross_entropy_reference(hidden, lm_head_weight, labels, label_weights, softcap, rows)
