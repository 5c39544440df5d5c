"""Partial-label and semantic losses on small cases computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from backend.labels import Taxonomy
from backend.settings import Settings

LOSS = Settings().loss  # configs/default.yaml
from worker.training.losses import (
    PartialLabelLoss,
    an_ls,
    binary_entropy_from_logits,
    em,
    em_pl,
    ranking,
    semantic,
    soft_targets,
    taxonomy_similarity,
    text_similarity,
)

# One image, two labels: logits 0 and 2; label 0 chosen, label 1 unknown.
Z = torch.tensor([[0.0, 2.0]])
Y = torch.tensor([[1.0, 0.0]])
SIG2 = 1.0 / (1.0 + math.exp(-2.0))  # σ(2) = 0.880797
LOG2 = math.log(2.0)  # −log σ(0)


def test_an_ls_by_hand():
    # targets (1 − ε) y + ε/2 = [0.95, 0.05]; BCE at z = 0 is log 2 whatever the target.
    bce_1 = -(0.05 * math.log(SIG2) + 0.95 * math.log(1 - SIG2))
    expected = (LOG2 + bce_1) / 2
    assert an_ls(Z, Y, smoothing=0.1).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(1.35999, abs=1e-4)
    # ε = 0 is plain assume-negative BCE.
    assert an_ls(Z, Y, smoothing=0.0).item() == pytest.approx((LOG2 + -math.log(1 - SIG2)) / 2, abs=1e-6)


def test_em_by_hand():
    entropy = -(SIG2 * math.log(SIG2) + (1 - SIG2) * math.log(1 - SIG2))  # 0.365
    assert binary_entropy_from_logits(torch.tensor(2.0)).item() == pytest.approx(entropy, abs=1e-6)
    expected = (LOG2 - 0.1 * entropy) / 2
    assert em(Z, Y, alpha=0.1).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.32831, abs=1e-4)
    # Unknowns are pushed towards 0.5 (maximum entropy), not towards 0.
    z = torch.tensor([[0.0, 2.0]], requires_grad=True)
    em(z, Y, alpha=0.1).backward()
    assert z.grad[0, 1] > 0  # gradient descent lowers the unknown's logit towards 0
    z0 = torch.tensor([[0.0, 0.0]], requires_grad=True)
    em(z0, Y, alpha=0.1).backward()
    assert z0.grad[0, 1].abs() < 1e-7  # an unknown at p = 0.5 is left alone


def test_em_pl_by_hand():
    zero_shot = torch.tensor([[0.2, 0.7]])
    # θ = 0.5: the unknown label 1 (zero-shot 0.7) is a pseudo-positive of weight 1.
    expected = (LOG2 - math.log(SIG2)) / 2
    assert em_pl(Z, Y, alpha=0.1, zero_shot=zero_shot, threshold=0.5, weight=1.0).item() == pytest.approx(expected, abs=1e-6)
    # Weight 0.5 halves the pseudo-positive term; θ = 0.8 makes it a plain EM unknown again.
    assert em_pl(Z, Y, alpha=0.1, zero_shot=zero_shot, threshold=0.5, weight=0.5).item() == pytest.approx(
        (LOG2 - 0.5 * math.log(SIG2)) / 2, abs=1e-6)
    assert em_pl(Z, Y, alpha=0.1, zero_shot=zero_shot, threshold=0.8, weight=1.0).item() == pytest.approx(
        em(Z, Y, alpha=0.1).item(), abs=1e-7)


def test_mask_excludes_known_inputs():
    mask = torch.tensor([[1.0, 0.0]])
    assert em(Z, Y, mask, alpha=0.1).item() == pytest.approx(LOG2, abs=1e-6)
    assert an_ls(Z, Y, mask, smoothing=0.0).item() == pytest.approx(LOG2, abs=1e-6)


def test_semantic_b3p_by_hand():
    S = torch.tensor([[1.0, 0.3], [0.3, 1.0]])
    soft = soft_targets(Y, S)
    assert torch.allclose(soft, torch.tensor([[1.0, 0.3]]))
    soft_bce = (LOG2 + -(0.3 * math.log(SIG2) + 0.7 * math.log(1 - SIG2))) / 2  # 1.1100
    base = em(Z, Y, alpha=0.1)
    expected = 0.7 * base.item() + 0.3 * soft_bce
    assert semantic(base, Z, soft, beta=0.7).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.56281, abs=1e-4)
    loss = PartialLabelLoss(LOSS.with_changes(kind="em", em_alpha=0.1, semantic=True, semantic_beta=0.7), S)
    assert loss(Z, Y).item() == pytest.approx(expected, abs=1e-6)
    # Several positives: the soft target of a label is its largest similarity to any of them.
    S3 = torch.tensor([[1.0, 0.2, 0.5], [0.2, 1.0, 0.9], [0.5, 0.9, 1.0]])
    assert torch.allclose(soft_targets(torch.tensor([[1.0, 1.0, 0.0]]), S3), torch.tensor([[1.0, 1.0, 0.9]]))


def test_ranking_by_hand():
    assert ranking(Z, Y).item() == pytest.approx(math.log(1 + math.exp(2.0)), abs=1e-5)
    # An unknown that is semantically close to the positive (soft 0.3) counts 0.7 times.
    soft = torch.tensor([[1.0, 0.3]])
    assert ranking(Z, Y, soft=soft).item() == pytest.approx(math.log(1 + 0.7 * math.exp(2.0)), abs=1e-5)


def test_similarity_sources():
    tax = Taxonomy.from_tree({"clothing": {"tops": ["T-shirt/top", "Shirt"], "warm": ["Coat"]}, "Bag": None})
    S = taxonomy_similarity(["T-shirt/top", "Shirt", "Coat", "Bag", "Unlisted"], tax, temperature=1.0)
    assert S[0, 1].item() == pytest.approx(math.exp(-1))  # siblings: LCA one step up
    assert S[0, 2].item() == pytest.approx(math.exp(-2))  # cousins
    assert S[0, 3].item() == pytest.approx(math.exp(-3))  # only the root in common
    assert S[4, 0].item() == 0 and S[4, 4].item() == 1
    H = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6]]), dim=-1)
    T = text_similarity(H, temperature=0.1)
    assert T[0, 1].item() == pytest.approx(math.exp(-(1 - 0.8) / 0.1), abs=1e-6)
    assert torch.allclose(T.diagonal(), torch.ones(2))


def test_configured_loss_selects_kind():
    for kind, fn in (("an_ls", lambda: an_ls(Z, Y, smoothing=0.1)), ("em", lambda: em(Z, Y, alpha=0.1))):
        assert PartialLabelLoss(LOSS.with_changes(kind=kind))(Z, Y).item() == pytest.approx(fn().item())
    with pytest.raises(ValueError):
        PartialLabelLoss(LOSS.with_changes(semantic=True))
