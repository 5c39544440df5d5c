"""Label co-occurrence statistics, stored by label *name*.

Counts over the *observed* positives of the annotations: ``N_i`` (images with label i),
``M_ij`` (images with both i and j) and the number of images. Stored by name, so any later
label list can be aligned to them: a label added after training simply has zero counts and
joins the graph through text similarity only.

Derived quantities (aligned to a label list):

- ``P(j | i) = M_ij / N_i`` (0 when ``N_i = 0``): the ML-GCN conditional probability;
- ``npmi(i, j)``: normalised pointwise mutual information of the smoothed counts, in [-1, 1]
  (0 for labels without counts).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch


@dataclass
class CooccurrenceStats:
    n_images: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    pairs: dict[tuple[str, str], int] = field(default_factory=dict)  # keys sorted (a < b)

    @classmethod
    def from_label_sets(cls, label_sets: Iterable[Iterable[str]]) -> "CooccurrenceStats":
        counts: Counter = Counter()
        pairs: Counter = Counter()
        n = 0
        for labels in label_sets:
            names = sorted(set(labels))
            if not names:
                continue
            n += 1
            counts.update(names)
            for a in range(len(names)):
                for b in range(a + 1, len(names)):
                    pairs[(names[a], names[b])] += 1
        return cls(n, dict(counts), dict(pairs))

    def pair(self, a: str, b: str) -> int:
        if a == b:
            return self.counts.get(a, 0)
        return self.pairs.get((a, b) if a < b else (b, a), 0)

    # -- aligned matrices ----------------------------------------------------------------
    def matrices(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(``M [C, C]`` with ``N`` on the diagonal, ``N [C]``) for ``names`` (unknown names: 0)."""
        index = {n: i for i, n in enumerate(names)}
        C = len(names)
        M = torch.zeros(C, C)
        N = torch.tensor([float(self.counts.get(n, 0)) for n in names])
        for (a, b), m in self.pairs.items():
            i, j = index.get(a), index.get(b)
            if i is not None and j is not None:
                M[i, j] = M[j, i] = float(m)
        M[range(C), range(C)] = N
        return M, N

    def conditional(self, names: Sequence[str]) -> torch.Tensor:
        """``P [C, C]`` with ``P[i, j] = P(j | i) = M_ij / N_i`` (row of zeros when ``N_i = 0``);
        the diagonal is 0."""
        M, N = self.matrices(names)
        P = M / N.clamp(min=1.0)[:, None]
        P.fill_diagonal_(0.0)
        return P

    def npmi(self, names: Sequence[str], smoothing: float = 0.5) -> torch.Tensor:
        """Normalised PMI ``[C, C]`` of add-``smoothing`` counts; 0 where a label has no
        counts, and on the diagonal."""
        M, N = self.matrices(names)
        n = float(max(self.n_images, 1))
        p_ij = (M + smoothing) / (n + 2 * smoothing)
        p_i = (N + smoothing) / (n + 2 * smoothing)
        pmi = torch.log(p_ij) - torch.log(p_i)[:, None] - torch.log(p_i)[None, :]
        out = pmi / (-torch.log(p_ij)).clamp(min=1e-6)
        seen = (N > 0).float()
        out = out * seen[:, None] * seen[None, :]
        out.fill_diagonal_(0.0)
        return out.clamp(-1.0, 1.0)

    # -- serialisation -------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "n_images": self.n_images,
            "counts": dict(sorted(self.counts.items())),
            "pairs": [[a, b, m] for (a, b), m in sorted(self.pairs.items())],
        }

    @classmethod
    def from_json(cls, data: dict) -> "CooccurrenceStats":
        counts = {str(k): int(v) for k, v in data["counts"].items()}
        pairs = {}
        for a, b, m in data["pairs"]:
            a, b = str(a), str(b)
            pairs[(a, b) if a < b else (b, a)] = int(m)
        n = int(data["n_images"])
        if n < 0 or any(v < 0 or v > n for v in counts.values()):
            raise ValueError("co-occurrence counts out of range")
        return cls(n, counts, pairs)

    def summary(self) -> dict:
        return {"n_images": self.n_images, "labels": len(self.counts), "pairs": len(self.pairs)}


def smoothed_conditional(stats: CooccurrenceStats, names: Sequence[str], alpha: float = 1.0) -> torch.Tensor:
    """``P̂[j, c] = (M_jc + α·prior_c) / (N_j + α)``: the raw co-occurrence estimate used by the
    "linear probe × co-occurrence" baseline (prior = label frequency)."""
    M, N = stats.matrices(names)
    n = float(max(stats.n_images, 1))
    prior = (N + 1.0) / (n + 2.0)
    P = (M + alpha * prior[None, :]) / (N[:, None] + alpha)
    return P
