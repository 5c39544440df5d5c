"""Evaluation of a trained model on fully labelled images (Label Studio exports or tasks).

The test annotations are treated as *complete* truth. Figures (see :mod:`worker.eval.metrics`):
mAP, P@k/R@k/F1@k (k = 1, 3, 5), recall@k of hidden positives (known labels given to the
model), and with a taxonomy mistake severity and hierarchical distance@k — for the model
and, beside it, for the zero-shot scores of the same backbone. What an annotator would see:
the backend's pre-selection (:func:`backend.model.decision.preselect` on the served
probabilities) scored by edit cost per task (and a blank task's), micro-/macro-F1, and the
probabilities' expected calibration error (``calibration`` holds the reliability bins).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from backend.errors import ConfigError
from backend.labels import LabelSpace

from .metrics import calibration, evaluate_scores, hidden_recall_at_k, hide_positives, selection_metrics
from worker.training.data import targets

log = logging.getLogger(__name__)


def model_scores(predictor, features, space: LabelSpace, known: torch.Tensor | None = None):
    """(visual scores, scores given the ``known`` labels): the visual logits of a SigRL
    predictor (per-label rankings, mAP) or any other Predictor's probabilities, and the
    served probabilities given the known labels — what the backend ranks suggestions by,
    so the recall of hidden positives is the recall of what an annotator is shown."""
    known_names = None
    if known is not None:
        known_names = [[space.names[j] for j in row.nonzero().flatten().tolist()] for row in known]
    conditional = predictor.probabilities(features, space, known_names)
    if hasattr(predictor, "logits"):
        return predictor.logits(features, space)[0], conditional
    return predictor.probabilities(features, space), conditional


def evaluate_outputs(
    scores,
    y,
    names: Sequence[str],
    *,
    probabilities=None,
    conditional=None,
    known=None,
    hidden=None,
    ks: Sequence[int] = (1, 3, 5),
    recall_ks: Sequence[int] = (1, 3),
    taxonomy=None,
    preannotation=None,
    ece_bins: int | None = None,
    ece_binning: str | None = None,
) -> dict:
    """The one evaluator: ranking figures of ``scores [N, C]`` against complete truth ``y``
    (:func:`~worker.eval.metrics.evaluate_scores`; ``conditional``: the scores given the
    ``known`` labels, for the recall of the ``hidden`` ones) and, with ``probabilities``,
    what an annotator sees: the pre-selection of the backend's decision rule
    (:func:`backend.model.decision.preselect` with ``preannotation``, default: the
    configured one) scored by edit cost, micro/macro-F1 and ECE (``ece_bins`` /
    ``ece_binning``, default: ``bench.ece_bins`` / ``bench.ece_binning``)."""
    out = evaluate_scores(scores, y, names=names, ks=ks, conditional_scores=conditional, known=known,
                          hidden=hidden, recall_ks=recall_ks, taxonomy=taxonomy)
    if probabilities is not None:
        from backend.model.decision import preselect

        from backend.settings import get_settings

        settings = get_settings()
        preannotation = settings.backend.preannotation if preannotation is None else preannotation
        ece_bins = settings.bench.ece_bins if ece_bins is None else ece_bins
        ece_binning = settings.bench.ece_binning if ece_binning is None else ece_binning
        out.update(selection_metrics(probabilities, preselect(probabilities, preannotation), y,
                                     bins=ece_bins, strategy=ece_binning))
    return out


def evaluate_features(
    predictor,
    features: Sequence,
    label_sets: Sequence[Sequence[str]],
    space: LabelSpace,
    *,
    zero_shot=None,
    taxonomy=None,
    hidden_seed: int = 1,
    recall_ks: Sequence[int] = (1, 3),
    preannotation=None,
    ece_bins: int | None = None,
    ece_binning: str | None = None,
) -> dict:
    """``{"model": {...}, "zero_shot": {...}}`` for images with complete label sets
    (:func:`evaluate_outputs` of the predictor's scores, and of the zero-shot ones beside);
    ``calibration`` holds the reliability bins of each one's probabilities.

    ``preannotation``: the ``backend.preannotation`` settings whose decision rule makes the
    pre-selection (default: the configured ones); ``ece_bins`` / ``ece_binning`` default to
    ``bench.ece_bins`` / ``bench.ece_binning``."""
    from backend.settings import get_settings

    bench = get_settings().bench
    ece_bins = bench.ece_bins if ece_bins is None else ece_bins
    ece_binning = bench.ece_binning if ece_binning is None else ece_binning
    y = targets(label_sets, space.names)
    if y.sum() == 0:
        raise ConfigError("the test export has no labels of the model's label set")
    known, hidden = hide_positives(y, hidden_seed)
    kw = dict(known=known, hidden=hidden, recall_ks=recall_ks, taxonomy=taxonomy, preannotation=preannotation,
              ece_bins=ece_bins, ece_binning=ece_binning)
    visual, conditional = model_scores(predictor, features, space, known)
    probabilities = predictor.probabilities(features, space)
    model = evaluate_outputs(visual, y, space.names, conditional=conditional, probabilities=probabilities, **kw)
    model["unconditioned_hidden_recall"] = {
        f"@{k}": round(hidden_recall_at_k(probabilities, known, hidden, k), 4) for k in recall_ks
    }
    model["calibration"] = calibration(probabilities, y, ece_bins, ece_binning)
    out = {"model": model}
    if zero_shot is not None:
        zs = zero_shot.probabilities(features, space)
        out["zero_shot"] = evaluate_outputs(zs, y, space.names, probabilities=zs, **kw)
        out["zero_shot"]["calibration"] = calibration(zs, y, ece_bins, ece_binning)
    return out

