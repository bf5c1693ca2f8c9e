import math

import pytest

from ochat.training.schedule import lr_at


def test_warmup_then_cosine_to_min_ratio():
    lrs = [lr_at(s, 100, 10, 1e-3, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, 100, 10, 1e-3, 0.1) == pytest.approx(1e-4)
    assert lr_at(55, 100, 10, 1e-3, 0.1) == pytest.approx(1e-4 + 0.9e-3 * 0.5)


def test_no_warmup_and_one_step():
    assert lr_at(0, 1, 0, 2.0, 0.0) == pytest.approx(2.0)
    assert math.isfinite(lr_at(5, 1, 0, 2.0, 0.5))
