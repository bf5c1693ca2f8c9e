"""A leaner optimizer step for DeepSpeed's ZeRO stages 1 and 2, with the same result.

On one H200 (1.1B shape, 16k-token packs) DeepSpeed's ZeRO-2 step took 34 ms where AdamW itself took 9: its gradient
norm turns each of the ~200 gradient partitions into a float64 copy before taking its norm (a copy and a reduction
per tensor, ~600 launches and 20 GB of memory traffic), and clipping multiplies the float32 gradient partition in a
pass of its own before AdamW reads it again. `streamline` changes the two methods of the engine's ZeRO optimizer
that do this:

- the gradient norm: one `torch._foreach_norm` over the partitions, accumulating in float32 (the same norm: the
  square root of the sum of the per-tensor norms' squares, summed over the data-parallel ranks as before);
- the clip: the clip factor becomes torch's fused AdamW's `grad_scale` (the gradient divided by it inside the
  update's own pass; the attribute torch's GradScaler sets), instead of a multiplication before it.

Applied only where the step is the one these replace: `DeepSpeedZeroOptimizer` (stages 1-2), the optimizer on the
device, no expert-parallel groups (their norms are averaged over other groups), no fp16 loss scaling; the clip part
only with a fused torch AdamW. Anything else keeps DeepSpeed's step untouched.
"""
from __future__ import annotations

from types import MethodType

import torch


def streamline(zero_optimizer) -> list[str]:
    """Replace the gradient norm and clip of the engine's ZeRO stage 1-2 optimizer (module docstring) where they
    apply; returns what was replaced (empty: nothing, the optimizer is not one this applies to)."""
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:
        return []
    if (not isinstance(zero_optimizer, DeepSpeedZeroOptimizer) or zero_optimizer.cpu_offload
            or zero_optimizer.has_moe_layers or zero_optimizer.loss_scale != 1.0
            or getattr(zero_optimizer, "torch_autocast_gradscaler", None) is not None
            or getattr(zero_optimizer, "zenflow", False)
            or not all(hasattr(zero_optimizer, m) for m in ("get_grad_norm_direct", "unscale_and_clip_grads",
                                                              "_optimizer_step", "_model_parallel_all_reduce"))):
        return []
    zero_optimizer.get_grad_norm_direct = MethodType(_grad_norm, zero_optimizer)
    done = ["gradient norm (one foreach norm)"]
    inner = zero_optimizer.optimizer
    if isinstance(inner, (torch.optim.AdamW, torch.optim.Adam)) and inner.defaults.get("fused"):
        zero_optimizer.unscale_and_clip_grads = MethodType(_clip_in_update, zero_optimizer)
        zero_optimizer._optimizer_step = MethodType(_step_with_scale, zero_optimizer)
        done.append("clip inside the fused AdamW")
    return done


def _grad_norm(self, gradients, params, norm_type=2):
    """The global L2 norm of this rank's gradient partitions `gradients`, summed over the data-parallel group (what
    DeepSpeed's get_grad_norm_direct returns, for norm_type 2; an infinite or NaN norm masked to -1 as it does)."""
    from deepspeed import comm as dist
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace

    if float(norm_type) != 2.0:
        raise ValueError(f"ochat's ZeRO step computes L2 gradient norms only (asked: {norm_type})")
    grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
    if grads:
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        total = torch.stack(norms).double().pow(2).sum().float()
    else:
        total = torch.zeros((), dtype=torch.float32, device=self.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
    total = total.pow(0.5)
    mask_nan_or_inf_with_val_inplace(total, device=self.device)
    return total


def _clip_in_update(self, grad_groups_flat, total_norm):
    """DeepSpeed's clip factor (loss scale 1), left for the fused AdamW as its grad_scale instead of multiplied into
    the gradients."""
    if self.clip_grad <= 0.0:
        return
    # an invalid norm (masked to -1) clips as infinite, as DeepSpeed's does, without its host synchronisation
    norm = torch.where(torch.isfinite(total_norm) & (total_norm >= 0), total_norm, float("inf"))
    self.optimizer.grad_scale = torch.clamp((norm + 1e-6) / self.clip_grad, min=1.0).float()


def _step_with_scale(self, group_no):
    """DeepSpeed's step of one parameter group, with the grad_scale `_clip_in_update` left (if any) consumed."""
    try:
        type(self)._optimizer_step(self, group_no)
    finally:
        self.optimizer.grad_scale = None
