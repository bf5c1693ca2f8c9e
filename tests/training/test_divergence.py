"""The divergence rule: non-finite steps, skipped updates, and finite blow-ups against the running median."""
import math

from ochat.training.divergence import MIN_BASELINE_STEPS, DivergenceGuard
from ochat.training.step import StepStats


def stats(loss, grad_norm=1.0, skipped=False):
    return StepStats(loss=loss, weight_sum=1.0, target_tokens=1, correct=0, tokens=1, sum_len_sq=1.0,
                     grad_norm=grad_norm, skipped=skipped, lr=1e-5, seconds=1.0, stop_requested=False)


def test_a_finite_loss_blow_up_is_caught_after_the_baseline_fills():
    guard = DivergenceGuard(max_skipped_steps=0, spike_factor=10)
    losses = [10.4, 9.8, 9.1, 8.7, 8.5]  # what --lr 1e3 gave before 2.05e7
    assert [guard.check(stats(x)) for x in losses] == [None] * MIN_BASELINE_STEPS
    assert guard.check(stats(60.0)) is None  # 7x the median of 9.1: a bump, not a blow-up
    why = guard.check(stats(2.05e7))
    assert why.startswith("the loss jumped to 2.05e+07, over 10 x the median of the last 6 steps (9.45;")


def test_the_gradient_norm_needs_the_squared_factor():
    guard = DivergenceGuard(max_skipped_steps=0, spike_factor=10)
    for _ in range(MIN_BASELINE_STEPS):
        guard.check(stats(2.0, grad_norm=0.5))
    assert guard.check(stats(2.0, grad_norm=40.0)) is None  # 80x: noisy, tolerated
    assert "gradient norm jumped to 60" in guard.check(stats(2.0, grad_norm=60.0))  # beyond 100 x 0.5


def test_a_spike_before_the_baseline_or_with_the_rule_off_passes():
    early = DivergenceGuard(max_skipped_steps=0, spike_factor=10)
    assert early.check(stats(1.0)) is None and early.check(stats(1e6)) is None
    off = DivergenceGuard(max_skipped_steps=0, spike_factor=0)
    assert all(off.check(stats(x)) is None for x in (1.0,) * 6 + (1e9,))


def test_non_finite_steps_and_skipped_updates():
    guard = DivergenceGuard(max_skipped_steps=1, spike_factor=10)
    assert guard.check(stats(math.nan, skipped=True)) is None  # the optimizer skipped it: tolerated once
    assert "2 update(s) in a row skipped" in guard.check(stats(math.nan, skipped=True))
    assert guard.check(stats(math.inf)) == "a non-finite loss or gradient norm"
