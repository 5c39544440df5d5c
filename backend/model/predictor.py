"""What the backend asks of a model: probabilities, and suggestions with reasons.

A :class:`Predictor` scores any label space (labels it never saw included) from cached
features. :class:`Suggestion` and :class:`Reasons` are plain data; the Label Studio layer
renders them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from ..features import Features
from ..labels import LabelSpace


@dataclass
class Reasons:
    """Why a label is suggested.

    - ``visual``: the model's probability from the image alone (no known labels);
    - ``zero_shot``: the backbone's zero-shot probability;
    - ``co_occurring``: chosen labels that support it, with the co-occurrence strength
      ``P(label | chosen)`` measured on the annotations;
    - ``neighbours``: its nearest labels in text-embedding space, with cosine similarity;
    - ``taxonomy_path``: root-to-label path when a taxonomy is configured;
    - for a spot (a point or box the annotator drew, :mod:`.spot`): ``spot`` says where,
      ``local`` is the label's local evidence there, ``mean_local`` its evidence in the image's
      average patch, ``attention`` how much more than uniformly SVFR's label attention falls on
      the spot (None without SVFR).
    """

    visual: float
    zero_shot: float
    co_occurring: list[tuple[str, float]] = field(default_factory=list)
    neighbours: list[tuple[str, float]] = field(default_factory=list)
    taxonomy_path: list[str] = field(default_factory=list)
    local: float | None = None
    mean_local: float | None = None
    attention: float | None = None
    spot: str | None = None


@dataclass
class Suggestion:
    label: str
    probability: float
    reasons: Reasons

    def to_dict(self) -> dict:
        return asdict(self)


class Predictor(ABC):
    """A servable model. ``version`` names it in Label Studio predictions."""

    version: str

    @abstractmethod
    def probabilities(
        self,
        features: Sequence[Features],
        space: LabelSpace,
        known: Sequence[Sequence[str]] | None = None,
    ) -> torch.Tensor:
        """``[B, C]`` probabilities; ``known[b]`` are labels already chosen for image b
        (a conditional model uses them; labels not in ``space`` are ignored)."""

    @abstractmethod
    def suggest(
        self,
        features: Sequence[Features],
        space: LabelSpace,
        known: Sequence[Sequence[str]],
        top_k: int,
        min_probability: float = 0.0,
    ) -> list[list[Suggestion]]:
        """For each image, up to ``top_k`` labels not in ``known[b]``, most likely first."""


def text_neighbours(space: LabelSpace, index: int, n: int) -> list[tuple[str, float]]:
    """The ``n`` labels of ``space`` closest to label ``index`` in text-embedding space."""
    if n <= 0 or len(space) < 2:
        return []
    sims = space.embeddings @ space.embeddings[index]
    sims[index] = -2.0
    top = sims.topk(min(n, len(space) - 1))
    return [(space.names[j], round(float(s), 4)) for s, j in zip(top.values, top.indices)]


def taxonomy_path(space: LabelSpace, index: int) -> list[str]:
    return space.taxonomy.path(space.names[index]) if space.taxonomy is not None else []


def ranked_suggestions(
    space: LabelSpace,
    probs: torch.Tensor,
    known: Sequence[Sequence[str]] | None,
    top_k: int,
    min_probability: float,
    reasons: Callable[[int, int, list[int]], Reasons],
) -> list[list[Suggestion]]:
    """The one suggestion builder: per image ``b`` of ``probs [B, C]``, the ``top_k`` most
    probable labels that are not ``known`` and have ``P ≥ min_probability``, best first;
    ``reasons(b, c, known_indices)`` explains label ``c``."""
    mask = known_mask(space, known, probs.shape[0]).bool()
    out = []
    for b in range(probs.shape[0]):
        row = probs[b].masked_fill(mask[b], -1.0)
        known_idx = mask[b].nonzero().flatten().tolist()
        items = []
        for c in row.argsort(descending=True).tolist():
            p = float(probs[b, c])
            if len(items) >= top_k or row[c] < 0 or p < min_probability:
                break  # sorted: nothing later qualifies
            items.append(Suggestion(label=space.names[c], probability=round(p, 4), reasons=reasons(b, c, known_idx)))
        out.append(items)
    return out


def co_occurring_support(space: LabelSpace, cond: torch.Tensor, known_idx: Sequence[int], c: int,
                         n: int) -> list[tuple[str, float]]:
    """The ``n`` chosen labels ``j`` most in favour of ``c``, by ``cond[j, c] = P(c | j) > 0``."""
    pairs = ((space.names[j], round(float(cond[j, c]), 4)) for j in known_idx if cond[j, c] > 0)
    return sorted(pairs, key=lambda kv: -kv[1])[:n]


def known_mask(space: LabelSpace, known: Sequence[Sequence[str]] | None, batch: int) -> torch.Tensor:
    """``[B, C]`` 0/1 matrix of known labels (names outside ``space`` are ignored)."""
    mask = torch.zeros(batch, len(space))
    for b, names in enumerate(known or []):
        for name in names:
            j = space.index.get(name)
            if j is not None:
                mask[b, j] = 1.0
    return mask
