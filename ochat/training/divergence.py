"""When training has diverged: the rule that stops a run before it saves a blown-up state.

A step diverged when
- its loss or gradient norm is not finite and the optimizer did not skip the update, or more than
  --max-skipped-steps updates in a row were skipped for a non-finite gradient; or
- its loss exceeds F times, or its gradient norm F^2 times, the median of the last BASELINE_STEPS finite steps
  (once MIN_BASELINE_STEPS of them were seen), F = --spike-factor (default 10; 0: off): a loss spike or a
  gradient explosion. Gradient norms vary more than losses from step to step (single steps 3-5x the median
  are common in healthy runs), hence the wider bound. With --lr far too high the loss climbs by orders of
  magnitude within a few steps while staying finite.
A diverged step raises before anything is saved after it; its message names the newest good state.
"""
from __future__ import annotations

import math
from collections import deque
from statistics import median

from ochat.training.step import StepStats

BASELINE_STEPS = 20
MIN_BASELINE_STEPS = 5


class DivergenceGuard:
    """Watches each step's loss and gradient norm; `check` returns why a step diverged, or None."""

    def __init__(self, max_skipped_steps: int, spike_factor: float):
        self.max_skipped, self.factor = max_skipped_steps, spike_factor
        self.skipped_in_row = 0
        self.losses: deque[float] = deque(maxlen=BASELINE_STEPS)
        self.grad_norms: deque[float] = deque(maxlen=BASELINE_STEPS)

    def check(self, stats: StepStats) -> str | None:
        """Why this step diverged (one clause), or None; a good step joins the baseline."""
        self.skipped_in_row = self.skipped_in_row + 1 if stats.skipped else 0
        finite = math.isfinite(stats.loss) and math.isfinite(stats.grad_norm)
        if stats.skipped and self.skipped_in_row > self.max_skipped:
            return f"{self.skipped_in_row} update(s) in a row skipped for a non-finite gradient"
        if not finite:
            return None if stats.skipped else "a non-finite loss or gradient norm"
        if self.factor and len(self.losses) >= MIN_BASELINE_STEPS:
            for name, value, seen, bound in (("loss", stats.loss, self.losses, self.factor),
                                             ("gradient norm", stats.grad_norm, self.grad_norms, self.factor ** 2)):
                baseline = median(seen)
                if value > bound * baseline > 0:
                    return (f"the {name} jumped to {value:.4g}, over {bound:g} x the median of the last "
                            f"{len(seen)} steps ({baseline:.4g}; --spike-factor {self.factor:g})")
        self.losses.append(stats.loss)
        self.grad_norms.append(stats.grad_norm)
        return None
