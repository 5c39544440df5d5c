"""Calibration from partial labels: miscalibration mapped back, planted observation rates
recovered, rare labels shrunk towards the shared map, zero-shot calibration from data."""

from __future__ import annotations

import pytest
import torch

from backend.model.calibration import (Calibration, best_bin_rate, elkan_noto_rate, expected_calibration_error,
                                       fit_calibration, fit_options, fit_zero_shot_calibration)
from backend.settings import Settings

FIT = fit_options(Settings().calibration)  # configs/default.yaml
BINS = Settings().bench.ece_bins

NAMES = ["a", "b", "c", "d"]


def _synthetic(n=4000, C=4, seed=0):
    """True logits, labels drawn from them, and a miscalibrated score (too sharp, shifted,
    differently per label)."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(n, C, generator=g) * 2.5 - 1.0
    y = torch.bernoulli(torch.sigmoid(true), generator=g)
    slope = torch.tensor([3.0, 0.5, 2.0, 1.5])[:C]
    shift = torch.tensor([2.0, -1.0, 0.0, 3.0])[:C]
    return true, y, true * slope + shift, g


def test_a_known_miscalibration_is_mapped_back():
    _, y, scores, _ = _synthetic()
    assert expected_calibration_error(torch.sigmoid(scores), y, bins=BINS) > 0.08
    cal = fit_calibration(scores, y, NAMES, fixed_rate=1.0, **FIT)
    assert expected_calibration_error(cal.probabilities(scores, NAMES), y, bins=BINS) < 0.02
    # Held-out images of the same distribution: still calibrated (not an in-sample artefact).
    _, y2, scores2, _ = _synthetic(seed=1)
    assert expected_calibration_error(cal.probabilities(scores2, NAMES), y2, bins=BINS) < 0.02


@pytest.mark.parametrize("rate", [0.3, 0.6])
def test_a_planted_observation_rate_is_recovered(rate):
    """Annotators choose each present label with probability ``rate``: the fit recovers the
    rate per label and calibrates against the *true* labels, seeing only the chosen ones."""
    _, y, scores, g = _synthetic(n=8000)
    observed = y * torch.bernoulli(torch.full_like(y, rate), generator=g)
    cal = fit_calibration(scores, observed, NAMES, **FIT)
    assert abs(cal.shared_rate - rate) < 0.03, cal.shared_rate  # the pooled rate
    assert all(abs(c - rate) < 0.06 for c in cal.rate), cal.rate
    assert expected_calibration_error(cal.probabilities(scores, NAMES), y, bins=BINS) < 0.02
    # Reading the observed labels as complete truth would be badly miscalibrated ...
    naive = fit_calibration(scores, observed, NAMES, fixed_rate=1.0, **FIT)
    assert expected_calibration_error(naive.probabilities(scores, NAMES), y, bins=BINS) > 0.05
    # ... and Elkan–Noto's E[g | o = 1] is biased low when positives are not separable,
    # which is why it only initialises the joint fit.
    assert (elkan_noto_rate(scores, observed) < rate - 0.05).all()


def _single_positive(observed_from, y, g):
    """One chosen label per image with a present label, picked uniformly among them."""
    pick = torch.multinomial(y.clamp(min=1e-12) * (y.sum(1, keepdim=True) > 0), 1, generator=g).flatten()
    chosen = torch.zeros_like(y)
    rows = (y.sum(1) > 0).nonzero().flatten()
    chosen[rows, pick[rows]] = 1.0
    return chosen[observed_from]


def test_single_positive_labels_are_calibrated_from_the_score_distribution():
    """One label chosen per image (a present label is chosen with chance 1/|Y|, not a
    constant rate): the likelihood alone cannot tell the rate from the map, and settles high
    (probabilities far too low). Best Bin Estimation reads the rate off the scores'
    distribution; the fit with it is calibrated against the true labels."""
    _, y, scores, g = _synthetic(n=8000)
    keep = y.sum(1) > 0
    y, scores = y[keep], scores[keep]
    observed = _single_positive(torch.arange(len(y)), y, g)
    true_rate = float(observed.sum() / y.sum())
    estimate = best_bin_rate(scores, observed, delta=FIT["bbe_delta"], gamma=FIT["bbe_gamma"])
    assert abs(estimate - true_rate) < 0.08, (estimate, true_rate)
    cal = fit_calibration(scores, observed, NAMES, **FIT)
    assert abs(cal.shared_rate - true_rate) < 0.08, (cal.shared_rate, true_rate)
    # A handful of held-out images cannot place the top bin: the rate is pulled towards the
    # likelihood's (the safe side: unchosen labels read as absent).
    few = fit_calibration(scores[:12], observed[:12], NAMES, **FIT)
    scar = fit_calibration(scores[:12], observed[:12], NAMES, **{**FIT, "single_positive_share": 2.0})
    assert true_rate + 0.1 < few.shared_rate < scar.shared_rate, (few.shared_rate, scar.shared_rate)
    ece = expected_calibration_error(cal.probabilities(scores, NAMES), y, bins=BINS)
    assert ece < 0.03, ece
    naive = fit_calibration(scores, observed, NAMES, fixed_rate=1.0, **FIT)
    assert expected_calibration_error(naive.probabilities(scores, NAMES), y, bins=BINS) > 0.05


def test_best_bin_rate_recovers_a_planted_constant_rate():
    _, y, scores, g = _synthetic(n=8000)
    for rate in (0.3, 0.7):
        observed = y * torch.bernoulli(torch.full_like(y, rate), generator=g)
        assert abs(best_bin_rate(scores, observed, delta=FIT["bbe_delta"], gamma=FIT["bbe_gamma"]) - rate) < 0.08


def test_rare_labels_are_shrunk_towards_the_shared_calibration():
    _, y, scores, g = _synthetic(C=4)
    scores = scores[:, :1].repeat(1, 4)  # one score distribution, one true map for all labels
    y = y[:, :1].repeat(1, 4)
    observed = y.clone()
    observed[40:, 3] = 0  # label d: observed on the first 40 images only (a handful of positives)
    mask = torch.ones_like(observed)
    mask[40:, 3] = 0
    cal = fit_calibration(scores, observed, NAMES, mask, fixed_rate=1.0, **{**FIT, "shrinkage": 200.0})
    a, b, _ = cal.parameters(NAMES)
    assert cal.positives[3] < 25 < cal.positives[0]
    # d's map stays close to the shared one; a label unknown to the calibration uses it exactly
    assert abs(a[3] - cal.shared_slope) < abs(a[0] - cal.shared_slope) + 0.05
    assert cal.parameters(["new"])[0].item() == pytest.approx(cal.shared_slope)
    again = Calibration.from_json(cal.to_json())
    assert torch.allclose(again.probabilities(scores, NAMES), cal.probabilities(scores, NAMES), atol=1e-5)
    assert torch.allclose(Calibration.identity(NAMES).probabilities(scores, NAMES), torch.sigmoid(scores))


def test_zero_shot_calibration_is_fitted_from_observed_labels():
    """Cosine-like similarities with an unknown temperature and centre, partially observed:
    the fitted ``sigmoid(scale · (s − bias))`` is calibrated against the true labels."""
    true, y, _, g = _synthetic()
    similarity = 0.3 + true / 40.0  # what a backbone gives: small spread, off-centre
    observed = y * torch.bernoulli(torch.full_like(y, 0.5), generator=g)
    scale, bias, rate = fit_zero_shot_calibration(similarity, observed, **FIT)
    assert scale == pytest.approx(40.0, rel=0.15) and abs(rate - 0.5) < 0.05
    probs = torch.sigmoid(scale * (similarity - bias))
    assert expected_calibration_error(probs, y, bins=BINS) < 0.03
