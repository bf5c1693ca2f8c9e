"""Weighted linear cross-entropy: hidden states x lm_head -> sums for the weighted loss.

The trainer's loss is `sum(w * CE) / sum(w)` over all target tokens of a whole optimizer step
(all ranks and micro-steps), so this returns sums, never a mean: the caller normalises.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F


class LossSums(NamedTuple):
    """Sums over the tokens of one pack. Only `weighted_loss` carries a gradient."""

    weighted_loss: torch.Tensor  # sum(w * CE), float32 scalar
    weight: torch.Tensor  # sum(w), float32 scalar
    correct: torch.Tensor  # number of tokens with w > 0 whose argmax equals the label, float32 scalar
    targets: torch.Tensor  # number of tokens with w > 0, float32 scalar


def weighted_linear_cross_entropy_reference(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, label_weights: torch.Tensor
) -> LossSums:
    """Plain definition: full float32 logits `hidden [T, H] @ lm_head_weight[V, H].T`, then weighted CE.

    Tokens with weight 0 contribute nothing (their label may be anything, e.g. -100).
    """
    logits = (hidden @ lm_head_weight.t()).float()
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


def weighted_linear_cross_entropy(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, label_weights: torch.Tensor
) -> LossSums:
    """Weighted CE sums of `hidden @ lm_head_weight.T` against labels; the fastest implementation available."""
    return weighted_linear_cross_entropy_reference(hidden, lm_head_weight, labels, label_weights)
