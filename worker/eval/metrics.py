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

What an annotator feels, on a *selection* ``S [N, C]`` (bool; in the benchmark the backend's
own decision rule, :func:`backend.model.decision.decide`, applied to served probabilities):

- ``edit cost`` (:func:`edit_cost`): label toggles that turn the selection into the truth,
  ``|S_i △ Y_i|`` per task; a blank task (``S_i = ∅``) costs ``|Y_i|``;
- ``micro-F1`` (:func:`selection_f1`, the *overall F1* OF1 of ML-GCN / Q2L papers):
  ``2 TP / (2 TP + FP + FN)`` summed over every (task, label) pair; beside it the per-label
  (*class*) CF1 ``macro-F1``; unlike ``F1@k`` they score the selection an annotator sees, not
  a fixed top-k;
- ``ECE`` (:func:`calibration`): expected calibration error of the probabilities over every
  (task, label) pair, ``Σ_b (n_b / n) |mean(y)_b − mean(p)_b|`` over ``bins`` bins, either
  equal-width on [0, 1] or *equal-mass* (quantile bins, each holding ~n / bins pairs;
  default, because most pairs of a multi-label task have p near 0 and equal-width bins leave
  the informative middle nearly empty); with the bins for a reliability diagram;
- ``unseen-label AP`` (:func:`label_subset_map`): the mAP over a subset of labels (those held
  out of training).
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


def edit_cost(selected, y) -> np.ndarray:
    """``[N]`` toggles from the selection to the truth: ``|S_i △ Y_i|`` (both 0/1 ``[N, C]``)."""
    return ((_np(selected) > 0) != (_np(y) > 0)).sum(1).astype(np.float64)


def selection_f1(selected, y) -> dict:
    """micro-F1 (OF1: one ``2TP / (2TP + FP + FN)`` over all pairs), macro-F1 (CF1: mean of the
    per-label F1 over labels with a positive or a selection), and the micro precision/recall."""
    s, t = _np(selected) > 0, _np(y) > 0
    tp, fp, fn = (s & t).sum(0), (s & ~t).sum(0), (~s & t).sum(0)
    TP, FP, FN = int(tp.sum()), int(fp.sum()), int(fn.sum())
    micro = 2 * TP / (2 * TP + FP + FN) if TP + FP + FN else float("nan")
    denom = 2 * tp + fp + fn
    per_label = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)
    return {
        "micro-F1": float(micro),
        "macro-F1": float(np.nanmean(per_label)) if np.isfinite(per_label).any() else float("nan"),
        "micro-precision": TP / (TP + FP) if TP + FP else float("nan"),
        "micro-recall": TP / (TP + FN) if TP + FN else float("nan"),
    }


def calibration(probabilities, y, bins: int, strategy: str) -> dict:
    r"""Expected calibration error over every (task, label) pair, with the bins.

    ``ECE = Σ_b (n_b / n) |ȳ_b − p̄_b|`` where bin b holds n_b pairs with mean probability
    p̄_b and observed frequency ȳ_b. ``strategy``: ``equal_width`` (b = ⌊p · bins⌋) or
    ``equal_mass`` (bins at the quantiles of p; ties kept together, so there may be fewer).

    Returns ``{"ECE", "bins": [{"lo", "hi", "count", "mean_p", "frequency"}], "strategy"}``.
    """
    p = _np(probabilities).astype(np.float64).ravel()
    t = (_np(y) > 0).astype(np.float64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"probabilities {p.shape} and labels {t.shape} differ")
    if p.size == 0:
        return {"ECE": float("nan"), "bins": [], "strategy": strategy}
    if strategy == "equal_width":
        edges = np.linspace(0.0, 1.0, bins + 1)
    elif strategy == "equal_mass":
        edges = np.unique(np.quantile(p, np.linspace(0.0, 1.0, bins + 1)))
        edges[0], edges[-1] = min(edges[0], 0.0), max(edges[-1], 1.0)
    else:
        raise ValueError(f"unknown binning {strategy!r} (equal_width, equal_mass)")
    # Bin b = [edges[b], edges[b+1]); the last bin includes 1.
    index = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2)
    out_bins, ece = [], 0.0
    for b in range(len(edges) - 1):
        sel = index == b
        n = int(sel.sum())
        if n == 0:
            continue
        mean_p, freq = float(p[sel].mean()), float(t[sel].mean())
        ece += n / p.size * abs(freq - mean_p)
        out_bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n,
                         "mean_p": round(mean_p, 4), "frequency": round(freq, 4)})
    return {"ECE": round(float(ece), 4), "bins": out_bins, "strategy": strategy}


def label_subset_map(scores, y, labels: Sequence[int]) -> dict:
    """``{"mAP", "AP": {label index: AP}}`` over the given label indices that have a positive."""
    aps = {c: v for c, v in average_precisions(scores, y).items() if c in set(labels)}
    return {"mAP": _mean(aps), "AP": aps}


def selection_metrics(probabilities, selected, y, *, bins: int, strategy: str) -> dict:
    """What an annotator sees of a selection and its probabilities: edit cost per task (and a
    blank task's), micro/macro-F1, labels ticked per task, ECE."""
    cost = edit_cost(selected, y)
    blank = _np(y).astype(bool).sum(1).astype(np.float64)
    cal = calibration(probabilities, y, bins, strategy)
    return _round({
        "edit_cost": float(cost.mean()),
        "blank_edit_cost": float(blank.mean()),
        "edit_cost_vs_blank": float(cost.mean() / blank.mean()) if blank.mean() > 0 else float("nan"),
        "selected_per_task": float((_np(selected) > 0).sum(1).mean()),
        **selection_f1(selected, y),
        "ECE": cal["ECE"],
    })


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
