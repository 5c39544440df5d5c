"""Losses for partial multi-label annotations, and the semantic loss.

Notation: ``logits [B, C]``; ``y [B, C]`` observed positives (1) — every other entry is
*unknown*, not negative; ``mask [B, C]`` the entries that count (0 for labels given to the
model as known inputs). Every loss is a mean over the counted entries.

- **AN-LS** (assume negative, label smoothing; Cole et al. 2021): BCE against
  ``t = (1 − ε)·y + ε/2``.
- **EM** (entropy maximisation; Zhou et al. 2022): ``−log p`` on positives and ``−α·H(p)``
  on unknowns, ``H(p) = −p log p − (1 − p) log(1 − p)``: unknowns are kept uncertain rather
  than pushed to 0.
- **EM + pseudo-labels** (VLPL-style; Xing et al. 2023): unknowns whose zero-shot
  probability is ≥ θ count as positives with weight ``w`` (``−w·log p``), the rest as EM.
- **semantic** (Perotti et al. 2023, "b3p", in a multi-label form):
  ``L = β·L_base(y) + (1 − β)·BCE(p, ŷ)`` where the soft target of label c is its largest
  similarity to an observed positive, ``ŷ_c = max_{j ∈ Y} S_jc`` (``S_jj = 1``). ``S`` comes
  from the taxonomy, ``S_jc = exp(−d_LCA(j, c) / T)``, or from the label text embeddings,
  ``S_jc = exp(−(1 − cos(h_j, h_c)) / T_text)``.
- **ranking** (optional): ``log(1 + Σ_{i∈Y, j∉Y} (1 − ŷ_j) e^{z_j − z_i})`` per image (LSEP
  with unknowns that are semantically close to a positive weighted down).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from backend.errors import ConfigError
from backend.model.config import LossSettings

_EPS = 1e-7


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def an_ls(logits, y, mask=None, *, smoothing: float) -> torch.Tensor:
    target = (1.0 - smoothing) * y + smoothing / 2.0
    return _masked_mean(F.binary_cross_entropy_with_logits(logits, target, reduction="none"), mask)


def binary_entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """``H(σ(z))`` computed stably: ``softplus(z) − z·σ(z)``."""
    return F.softplus(logits) - logits * torch.sigmoid(logits)


def em(logits, y, mask=None, *, alpha: float) -> torch.Tensor:
    pos = F.softplus(-logits)  # −log σ(z)
    unk = -alpha * binary_entropy_from_logits(logits)
    return _masked_mean(torch.where(y > 0, pos, unk), mask)


def em_pl(logits, y, mask=None, *, alpha: float, zero_shot=None, threshold: float, weight: float):
    if zero_shot is None:
        return em(logits, y, mask, alpha=alpha)
    pseudo = (y <= 0) & (zero_shot >= threshold)
    pos = F.softplus(-logits)
    unk = -alpha * binary_entropy_from_logits(logits)
    values = torch.where(y > 0, pos, torch.where(pseudo, weight * pos, unk))
    return _masked_mean(values, mask)


# ------------------------------------------------------------------------------ semantic
def taxonomy_similarity(names: Sequence[str], taxonomy, temperature: float) -> torch.Tensor:
    """``S [C, C] = exp(−d_LCA / T)``; labels outside the taxonomy are similar to themselves only."""
    C = len(names)
    S = torch.eye(C)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i != j and a in taxonomy.parent and b in taxonomy.parent:
                S[i, j] = math.exp(-taxonomy.lca_distance(a, b) / temperature)
    return S


def text_similarity(embeddings: torch.Tensor, temperature: float) -> torch.Tensor:
    """``S [C, C] = exp(−(1 − cos) / T)`` of L2-normalised label embeddings."""
    cos = embeddings @ embeddings.T
    S = torch.exp(-(1.0 - cos) / temperature)
    S.fill_diagonal_(1.0)
    return S


def soft_targets(y: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """``ŷ_bc = max_{j: y_bj = 1} S_jc`` (0 for an image without positives)."""
    masked = y[:, :, None] * similarity[None, :, :]  # [B, C(j), C(c)]
    return masked.max(dim=1).values.clamp(0.0, 1.0)


def semantic(base: torch.Tensor, logits, soft, mask=None, *, beta: float) -> torch.Tensor:
    soft_term = _masked_mean(F.binary_cross_entropy_with_logits(logits, soft, reduction="none"), mask)
    return beta * base + (1.0 - beta) * soft_term


def ranking(logits, y, mask=None, soft=None) -> torch.Tensor:
    """Mean over images with a positive of ``log(1 + Σ_{i∈Y, j∉Y} w_j e^{z_j − z_i})``."""
    counted = mask if mask is not None else torch.ones_like(y)
    pos = (y > 0) & (counted > 0)
    neg = (y <= 0) & (counted > 0)
    weight = neg.float() * (1.0 - soft if soft is not None else 1.0)
    diff = logits[:, None, :] - logits[:, :, None]  # [B, i, j] = z_j − z_i
    terms = torch.exp(diff.clamp(max=50.0)) * pos.float()[:, :, None] * weight[:, None, :]
    per_image = torch.log1p(terms.sum((1, 2)))
    has = pos.any(1).float()
    return (per_image * has).sum() / has.sum().clamp(min=1.0)


# -------------------------------------------------------------------------------- config
class PartialLabelLoss:
    """The configured loss (``configs: loss``), callable on a batch."""

    def __init__(self, cfg: LossSettings, similarity: torch.Tensor | None = None):
        self.cfg = cfg
        self.similarity = similarity
        if cfg.semantic and similarity is None:
            raise ValueError("the semantic loss needs a label similarity matrix")

    def to(self, device) -> "PartialLabelLoss":
        if self.similarity is not None:
            self.similarity = self.similarity.to(device)
        return self

    def __call__(self, logits, y, mask=None, zero_shot=None) -> torch.Tensor:
        cfg = self.cfg
        if cfg.kind == "an_ls":
            base = an_ls(logits, y, mask, smoothing=cfg.smoothing)
        elif cfg.kind == "em":
            base = em(logits, y, mask, alpha=cfg.em_alpha)
        elif cfg.kind == "em_pl":
            base = em_pl(logits, y, mask, alpha=cfg.em_alpha, zero_shot=zero_shot, threshold=cfg.pl_threshold,
                         weight=cfg.pl_weight)
        else:  # pragma: no cover - pydantic restricts kind
            raise ValueError(f"unknown loss kind {cfg.kind!r}")
        soft = soft_targets(y, self.similarity) if self.similarity is not None else None
        loss = semantic(base, logits, soft, mask, beta=cfg.semantic_beta) if cfg.semantic else base
        if cfg.ranking_weight > 0:
            loss = loss + cfg.ranking_weight * ranking(logits, y, mask, soft)
        return loss


def label_similarity(cfg: LossSettings, names: Sequence[str], embeddings: torch.Tensor, taxonomy=None):
    """The similarity the semantic loss uses, or None when it is off."""
    if not (cfg.semantic or cfg.ranking_weight > 0):
        return None
    if cfg.semantic_source == "taxonomy":
        if taxonomy is None:
            raise ConfigError("loss.semantic_source=taxonomy needs a taxonomy (--taxonomy or model.json)")
        return taxonomy_similarity(names, taxonomy, cfg.semantic_temperature)
    return text_similarity(embeddings, cfg.semantic_text_temperature)
