"""The pre-selection rule: its optimum against brute force over all 2^C selections."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from backend.model.decision import decide, expected_toggles, preselect, tick_gain

EVEN = dict(wrong_tick_cost=1.0, missed_tick_cost=1.0)  # every toggle counts once
from backend.settings import Settings


def _brute_force(p: np.ndarray, a: float, b: float, lo: int, hi: int) -> float:
    """The smallest expected toggles over every selection of lo..hi labels of one task."""
    c = p.shape[0]
    best = np.inf
    for bits in itertools.product([False, True], repeat=c):
        s = np.array(bits)
        if lo <= s.sum() <= hi:
            best = min(best, float(expected_toggles(p, s, wrong_tick_cost=a, missed_tick_cost=b)))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_decision_matches_brute_force_on_small_cases(seed):
    rng = np.random.default_rng(seed)
    c = int(rng.integers(1, 9))
    # Probabilities spread over (0, 1), some piled at 0.5 and at the cost ratio (ties).
    p = rng.beta(0.6, 0.6, size=(3, c))
    p[0, : c // 2] = 0.5
    a, b = [(1.0, 1.0), (1.0, 3.0), (2.5, 1.0), (0.0, 1.0)][seed % 4]
    lo = int(rng.integers(0, c + 1)) if seed % 3 == 0 else 0
    hi = int(rng.integers(max(lo, 1), c + 1)) if seed % 2 == 0 else None
    chosen = decide(p, wrong_tick_cost=a, missed_tick_cost=b, min_labels=lo, max_labels=hi)
    assert chosen.shape == p.shape and chosen.dtype == bool
    for i in range(p.shape[0]):
        got = float(expected_toggles(p[i], chosen[i], wrong_tick_cost=a, missed_tick_cost=b))
        assert lo <= chosen[i].sum() <= (c if hi is None else hi)
        assert got == pytest.approx(_brute_force(p[i], a, b, lo, c if hi is None else hi), abs=1e-12)


def test_unit_costs_tick_above_one_half_and_never_cost_more_than_blank():
    p = torch.tensor([[0.9, 0.51, 0.5, 0.49, 0.0], [0.3, 0.2, 0.1, 0.4, 0.45]])
    chosen = decide(p, **EVEN)
    assert chosen.tolist() == [[True, True, False, False, False], [False] * 5]  # ties stay unticked
    blank = expected_toggles(p, np.zeros_like(chosen), **EVEN)
    assert (expected_toggles(p, chosen, **EVEN) <= blank).all()
    assert blank.tolist() == pytest.approx(p.sum(1).tolist())
    # One task as a [C] vector gives a [C] answer; gains are b p - a (1 - p).
    assert decide(p[0], **EVEN).tolist() == chosen[0].tolist()
    assert tick_gain(p[0], **EVEN).tolist() == pytest.approx((2 * p[0] - 1).tolist())


def test_costs_move_the_threshold_to_their_ratio_and_bounds_are_kept():
    p = np.array([0.2, 0.3, 0.6, 0.8])
    # a / (a + b) = 1 / 4: everything above 0.25 is ticked.
    assert decide(p, wrong_tick_cost=1.0, missed_tick_cost=3.0).tolist() == [False, True, True, True]
    assert decide(p, **EVEN, max_labels=1).tolist() == [False, False, False, True]
    assert decide(np.full(3, 0.01), **EVEN, min_labels=1).tolist() == [True, False, False]
    with pytest.raises(ValueError):
        decide(p, **EVEN, min_labels=3, max_labels=2)
    with pytest.raises(ValueError):
        decide(p, wrong_tick_cost=0.0, missed_tick_cost=0.0)


def test_costs_come_from_the_configuration():
    pre = Settings().backend.preannotation
    assert (pre.wrong_tick_cost, pre.missed_tick_cost) == (1.0, 1.0)
    p = np.array([[0.9, 0.7, 0.2], [0.1, 0.3, 0.2]])
    assert preselect(p, pre).tolist() == decide(p, **EVEN, max_labels=pre.max_labels).tolist()
    assert preselect(p, pre, multiple=False).tolist() == [[True, False, False], [False, True, False]]
    two = pre.model_copy(update={"max_labels": 1})
    assert preselect(p, two).tolist() == [[True, False, False], [False, False, False]]
