"""Loss normalisation of one optimizer step.

The loss of a step is sum(w * CE) over every target token of all ranks and micro-steps,
divided by the sum of their weights W. Each rank computes, per micro-step, the sum S_m = sum(w * CE)
of its own pack. DeepSpeed then averages gradients over the R ranks and divides each micro-step's
loss by the G accumulation steps (engine.backward scales by 1/G). Calling engine.backward on
S_m * loss_scale(W, R, G) with loss_scale = R * G / W gives, after both averagings,

    (1/R) * sum_ranks sum_m (1/G) * (R * G / W) * grad(S_m) = grad(sum of all S_m) / W

which does not depend on how conversations are packed, split over ranks or over micro-steps.

Sequence parallelism of N (DeepSpeed Ulysses): the N ranks of a group share one pack, each holding a slice
of its tokens, so rank r's S_m sums only the targets of its slice. Its backward still reaches the whole pack:
the all-to-all around attention carries each rank's loss gradient back to the tokens of the other ranks, so
the N ranks' parameter gradients add up to grad(the pack's sum). DeepSpeed then all-reduces the gradients
over all ranks (the sequence-data-parallel group) and divides by R (`grad_average_ranks`): under ZeRO
stages 0-2 by world_size / N (`dp_world_size / sequence_parallel_size` in its reduction: a sum within each
group, an average over the groups), under ZeRO-3 by world_size (its reduce-scatter averages over every
rank). With that R the formula above holds unchanged, the sum running over all ranks' slices:

    (1/R) * sum_all_ranks sum_m (1/G) * (R * G / W) * grad(S_rm) = grad(sum of all S_rm) / W

Expert parallelism (ochat.model.expert_parallel) changes where the sums of an expert's gradient are taken, not R:
ZeRO-2 sums an expert shard's gradient over its expert-data-parallel group instead of all ranks (that group's
shards together computed every rank's rows of those experts), and divides every bucket by the same R, with or
without sequence parallelism.
"""
import torch

from ochat.config.deepspeed import sequence_parallel_size, zero_stage


def grad_average_ranks(ds_config: dict, world_size: int) -> int:
    """R: what DeepSpeed (0.19) divides the all-reduced gradients by, for this DeepSpeed config.

    Without sequence parallelism, world_size. With `sequence_parallel_size` N: world_size / N under ZeRO
    stages 0-2; world_size under ZeRO-3, whose reduce-scatter (`reduce_scatter`, on by default, which
    ochat.config.deepspeed.load_deepspeed_config requires with sequence parallelism: off, ZeRO-3 divides
    small buckets by world_size / N and large ones by world_size) averages over every rank.
    """
    if zero_stage(ds_config) == 3:
        return world_size
    return world_size // sequence_parallel_size(ds_config)


def loss_scale(step_weight_sum: torch.Tensor | float, average_ranks: int, grad_accum: int) -> torch.Tensor:
    """Factor to multiply a micro-step's `weighted_loss` sum by before `engine.backward`.

    step_weight_sum: W, the sum of target weights over the whole step (all ranks, all micro-steps).
        A tensor stays where it is: the trainer passes the all-reduced W on the GPU, so nothing is
        read back to the host before the step's forward passes.
    average_ranks: R, what DeepSpeed divides the summed gradients by: the number of ranks, or of
        sequence-parallel groups (`grad_average_ranks`).
    grad_accum: G, micro-steps per optimizer step (DeepSpeed's backward divides the loss by G).

    Returns R * G / W (a float64 tensor like W), or 0 when W is 0: a step with no targets has zero
    gradients and still runs its collectives.
    """
    w = torch.as_tensor(step_weight_sum, dtype=torch.float64)
    return torch.where(w > 0, float(average_ranks * grad_accum) / w, torch.zeros_like(w))
