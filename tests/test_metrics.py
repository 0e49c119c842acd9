"""tau, alpha and per-position acceptance from hand-built acceptance traces."""
import math

import pytest

from quasar_bench.metrics import acceptance_from_trace, alpha, tau


def test_ar_trace():
    t, a, p = acceptance_from_trace([(0, 0)] * 7)
    assert t == 1.0 and math.isnan(a) and p == []


def test_mixed_trace_by_hand():
    # step 1: 5 drafted, 2 accepted -> positions 1,2 accepted, 3 tried and rejected
    # step 2: 5 drafted, 5 accepted -> positions 1..5 accepted
    # step 3: 3 drafted, 0 accepted -> position 1 tried and rejected
    t, a, p = acceptance_from_trace([(5, 2), (5, 5), (3, 0)])
    assert t == pytest.approx((3 + 6 + 1) / 3)
    assert a == pytest.approx(7 / 13)
    # p1: tried 3, accepted 2; p2: 2/2; p3: tried 2 (steps 1, 2), accepted 1; p4, p5: 1/1
    assert p == pytest.approx([2 / 3, 1.0, 0.5, 1.0, 1.0])


def test_geometric_pattern():
    t, a, p = acceptance_from_trace([(4, 4)] * 3 + [(4, 0)])
    assert t == pytest.approx((5 * 3 + 1) / 4)
    assert p[0] == pytest.approx(0.75) and p[1:] == [1.0, 1.0, 1.0]


def test_invalid_trace():
    with pytest.raises(ValueError):
        acceptance_from_trace([(2, 3)])
    assert math.isnan(tau(0, 0)) and math.isnan(alpha(0, 0))
