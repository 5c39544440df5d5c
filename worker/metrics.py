"""Multi-label metrics (scores ``[N, C]``, complete truth ``y [N, C]`` 0/1).

- ``mAP``: mean over labels with at least one positive of the average precision
  (scikit-learn ``average_precision_score``);
- ``P@k``, ``R@k``: per image ``|top-k ∩ Y| / k`` and ``|top-k ∩ Y| / |Y|``, averaged over
  images with a positive; ``F1@k`` is the harmonic mean of the two averages;
- ``recall@k of hidden positives``: for each image with at least two positives a seeded
  random non-empty, proper subset of its positives is *hidden* and the rest given as
  *known*; the model ranks the labels that are not known; recall = ``|top-k ∩ hidden| /
  |hidden|``, averaged over those images (:func:`hide_positives` makes the split, the same
  for every method);
- with a taxonomy: ``mistake severity`` (Bertinetto et al.) — for top-1 predictions that are
  wrong, the LCA distance to the nearest true label, averaged over the mistakes — and
  ``hierarchical distance@k`` — the mean over the top-k predictions of the LCA distance to
  the nearest true label (0 when correct), averaged over images.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def average_precisions(scores, y) -> dict[int, float]:
    from sklearn.metrics import average_precision_score

    s, t = _np(scores).astype(np.float64), _np(y)
    out = {}
    for c in range(t.shape[1]):
        if t[:, c].sum() > 0:
            out[c] = float(average_precision_score(t[:, c], s[:, c]))
    return out


def mean_average_precision(scores, y) -> float:
    return _mean(average_precisions(scores, y))


def _mean(aps: dict[int, float]) -> float:
    """mAP over the labels that have a positive (NaN when none has)."""
    return float(np.mean(list(aps.values()))) if aps else float("nan")


def topk_indices(scores, k: int, exclude=None) -> np.ndarray:
    s = _np(scores).astype(np.float64).copy()
    if exclude is not None:
        s[_np(exclude) > 0] = -np.inf
    k = min(k, s.shape[1])
    # Stable: ties broken by label index.
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def precision_recall_at_k(scores, y, k: int) -> tuple[float, float, float]:
    t = _np(y) > 0
    top = topk_indices(scores, k)
    hits = np.take_along_axis(t, top, axis=1).sum(1)
    has = t.sum(1) > 0
    if not has.any():
        return float("nan"), float("nan"), float("nan")
    p = float((hits[has] / top.shape[1]).mean())
    r = float((hits[has] / t.sum(1)[has]).mean())
    f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return p, r, f1


def hide_positives(y, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(known ``[N, C]``, hidden ``[N, C]``): for each image with ≥ 2 positives, a uniformly
    sized (1 .. n−1) random subset of its positives is hidden, the rest known."""
    t = _np(y) > 0
    rng = np.random.default_rng(seed)
    known = np.zeros_like(t, dtype=np.float32)
    hidden = np.zeros_like(t, dtype=np.float32)
    for i in range(t.shape[0]):
        pos = np.flatnonzero(t[i])
        if len(pos) < 2:
            continue
        n_hidden = int(rng.integers(1, len(pos)))
        perm = rng.permutation(pos)
        hidden[i, perm[:n_hidden]] = 1
        known[i, perm[n_hidden:]] = 1
    return torch.from_numpy(known), torch.from_numpy(hidden)


def hidden_recall_at_k(scores, known, hidden, k: int) -> float:
    h = _np(hidden) > 0
    rows = h.sum(1) > 0
    if not rows.any():
        return float("nan")
    top = topk_indices(scores, k, exclude=known)
    hits = np.take_along_axis(h, top, axis=1).sum(1)
    return float((hits[rows] / h.sum(1)[rows]).mean())


def _nearest_lca(taxonomy, names, predicted: int, truth: np.ndarray) -> int:
    return min(taxonomy.lca_distance(names[predicted], names[j]) for j in np.flatnonzero(truth))


def mistake_severity(scores, y, taxonomy, names: Sequence[str]) -> float:
    t = _np(y) > 0
    top1 = topk_indices(scores, 1)[:, 0]
    severities = [
        _nearest_lca(taxonomy, names, int(top1[i]), t[i])
        for i in range(t.shape[0])
        if t[i].any() and not t[i, top1[i]]
    ]
    return float(np.mean(severities)) if severities else 0.0


def hierarchical_distance_at_k(scores, y, taxonomy, names: Sequence[str], k: int) -> float:
    t = _np(y) > 0
    top = topk_indices(scores, k)
    values = []
    for i in range(t.shape[0]):
        if not t[i].any():
            continue
        values.append(np.mean([0 if t[i, c] else _nearest_lca(taxonomy, names, int(c), t[i]) for c in top[i]]))
    return float(np.mean(values)) if values else float("nan")


def evaluate_scores(
    scores,
    y,
    *,
    names: Sequence[str],
    ks: Sequence[int] = (1, 3, 5),
    conditional_scores=None,
    known=None,
    hidden=None,
    recall_ks: Sequence[int] = (1, 3),
    taxonomy=None,
) -> dict:
    """All figures as one flat dict (rounded to 4 decimals).

    ``conditional_scores`` are the scores given the ``known`` labels (defaults to
    ``scores``: a model that ignores known labels)."""
    aps = average_precisions(scores, y)
    out: dict = {"images": int(_np(y).shape[0]), "labels": len(names),
                 "mAP": _mean(aps)}
    for k in ks:
        p, r, f1 = precision_recall_at_k(scores, y, k)
        out[f"P@{k}"], out[f"R@{k}"], out[f"F1@{k}"] = p, r, f1
    if known is not None and hidden is not None:
        cond = conditional_scores if conditional_scores is not None else scores
        out["hidden_images"] = int((_np(hidden).sum(1) > 0).sum())
        for k in recall_ks:
            out[f"hidden_recall@{k}"] = hidden_recall_at_k(cond, known, hidden, k)
    if taxonomy is not None:
        out["mistake_severity"] = mistake_severity(scores, y, taxonomy, names)
        for k in ks:
            out[f"hier_dist@{k}"] = hierarchical_distance_at_k(scores, y, taxonomy, names, k)
    out["AP_per_label"] = {names[c]: v for c, v in aps.items()}
    return _round(out)


def _round(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return value


def pr_curves(scores, y, names: Sequence[str]) -> dict:
    """Per-label and micro-averaged precision–recall curves (scikit-learn)."""
    from sklearn.metrics import precision_recall_curve

    s, t = _np(scores).astype(np.float64), _np(y)
    curves = {}
    for c, name in enumerate(names):
        if t[:, c].sum() > 0:
            p, r, _ = precision_recall_curve(t[:, c], s[:, c])
            curves[name] = (p, r)
    p, r, _ = precision_recall_curve(t.ravel(), s.ravel())
    curves["micro"] = (p, r)
    return curves
