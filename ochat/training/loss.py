"""Loss normalisation of one optimizer step.

DESIGN.md: the loss of a step is sum(w * CE) over every target token of all ranks and micro-steps,
divided by the sum of their weights W. Each rank computes, per micro-step, the sum S_m = sum(w * CE)
of its own pack. DeepSpeed then averages gradients over the R ranks and divides each micro-step's
loss by the G accumulation steps (engine.backward scales by 1/G). Calling engine.backward on
S_m * loss_scale(W, R, G) with loss_scale = R * G / W gives, after both averagings,

    (1/R) * sum_ranks sum_m (1/G) * (R * G / W) * grad(S_m) = grad(sum of all S_m) / W

which does not depend on how conversations are packed, split over ranks or over micro-steps.
"""


def loss_scale(step_weight_sum, world_size, grad_accum, ds_scales_by_grad_accum=True):
    """Factor to multiply a micro-step's `weighted_loss` sum by before `engine.backward`.

    step_weight_sum: W, the sum of target weights over the whole step (all ranks, all micro-steps).
    world_size: R, ranks that DeepSpeed averages gradients over.
    grad_accum: G, micro-steps per optimizer step.
    ds_scales_by_grad_accum: whether backward divides the loss by G (DeepSpeed does by default).
    """
    if step_weight_sum <= 0:
        return 0.0  # a step with no targets: zero gradients, the step still runs its collectives
    g = grad_accum if ds_scales_by_grad_accum else 1
    return float(world_size) * g / float(step_weight_sum)
