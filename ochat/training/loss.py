"""Loss normalisation of one optimizer step.

DESIGN.md: the loss of a step is sum(w * CE) over every target token of all ranks and micro-steps,
divided by the sum of their weights W. Each rank computes, per micro-step, the sum S_m = sum(w * CE)
of its own pack. DeepSpeed then averages gradients over the R ranks and divides each micro-step's
loss by the G accumulation steps (engine.backward scales by 1/G). Calling engine.backward on
S_m * loss_scale(W, R, G) with loss_scale = R * G / W gives, after both averagings,

    (1/R) * sum_ranks sum_m (1/G) * (R * G / W) * grad(S_m) = grad(sum of all S_m) / W

which does not depend on how conversations are packed, split over ranks or over micro-steps.
"""
import torch


def loss_scale(step_weight_sum: torch.Tensor | float, world_size: int, grad_accum: int,
               ds_scales_by_grad_accum: bool = True) -> torch.Tensor:
    """Factor to multiply a micro-step's `weighted_loss` sum by before `engine.backward`.

    step_weight_sum: W, the sum of target weights over the whole step (all ranks, all micro-steps).
        A tensor stays where it is: the trainer passes the all-reduced W on the GPU, so nothing is
        read back to the host before the step's forward passes.
    world_size: R, ranks that DeepSpeed averages gradients over.
    grad_accum: G, micro-steps per optimizer step.
    ds_scales_by_grad_accum: whether backward divides the loss by G (DeepSpeed does by default).

    Returns R * G / W (a float64 tensor like W), or 0 when W is 0: a step with no targets has zero
    gradients and still runs its collectives.
    """
    w = torch.as_tensor(step_weight_sum, dtype=torch.float64)
    g = grad_accum if ds_scales_by_grad_accum else 1
    return torch.where(w > 0, float(world_size * g) / w, torch.zeros_like(w))
