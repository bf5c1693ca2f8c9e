"""--gradient-checkpointing auto: the fraction chosen from a fully checkpointed step's peak and one layer's activations
(which step is measured, the second, once the optimizer's states exist, needs a GPU: checked on an H100, see
bench/RESULTS.md)."""
import pytest

from ochat.model.recompute import MEMORY_BUDGET, recompute_fraction

GiB = 2**30


@pytest.mark.parametrize("peak, layer, expect", [
    (40 * GiB, 1 * GiB, 0.0),        # room for all 32 layers' activations: nothing recomputed
    (60 * GiB, 2 * GiB, 26 / 32),    # room for 6 layers (72 GiB budget)
    (71.9 * GiB, 1 * GiB, 1.0),      # no room: every layer
    (75 * GiB, 1 * GiB, 1.0),        # the measured step is already above the budget: every layer, nothing to gain
])
def test_fraction_keeps_as_many_layers_as_fit(peak, layer, expect):
    capacity = 80 * GiB
    fraction = recompute_fraction(peak, capacity, layer, 32)
    assert fraction == pytest.approx(expect)
    kept = round((1 - fraction) * 32)
    assert peak + kept * layer <= max(MEMORY_BUDGET * capacity, peak)
