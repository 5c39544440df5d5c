"""Evaluation of a trained model on fully labelled images (Label Studio exports or tasks).

The test annotations are treated as *complete* truth. Figures (see :mod:`worker.metrics`):
mAP, P@k/R@k/F1@k (k = 1, 3, 5), recall@k of hidden positives (known labels given to the
model), and with a taxonomy mistake severity and hierarchical distance@k — for the model
and, beside it, for the zero-shot scores of the same backbone.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from backend.errors import ConfigError
from backend.labels import LabelSpace

from .data import Example, attach_features, examples_from_tasks
from .metrics import evaluate_scores, hide_positives
from .train import targets

log = logging.getLogger(__name__)


def model_scores(predictor, features, space: LabelSpace, known: torch.Tensor | None = None):
    """(visual logits, conditional logits) of a SigRL predictor, or (probabilities,
    probabilities) of any other Predictor."""
    known_names = None
    if known is not None:
        known_names = [[space.names[j] for j in row.nonzero().flatten().tolist()] for row in known]
    if hasattr(predictor, "logits"):
        return predictor.logits(features, space, known_names)
    probs = predictor.probabilities(features, space, known_names)
    return probs, probs


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
) -> dict:
    """``{"model": {...}, "zero_shot": {...}}`` for images with complete label sets."""
    y = targets(label_sets, space.names)
    if y.sum() == 0:
        raise ConfigError("the test export has no labels of the model's label set")
    known, hidden = hide_positives(y, hidden_seed)
    visual, _ = model_scores(predictor, features, space)
    _, conditional = model_scores(predictor, features, space, known)
    out = {
        "model": evaluate_scores(
            visual, y, names=space.names, conditional_scores=conditional, known=known, hidden=hidden,
            recall_ks=recall_ks, taxonomy=taxonomy,
        )
    }
    out["model"]["unconditioned_hidden_recall"] = {
        f"@{k}": evaluate_scores(visual, y, names=space.names, known=known, hidden=hidden, recall_ks=(k,))[
            f"hidden_recall@{k}"
        ]
        for k in recall_ks
    }
    if zero_shot is not None:
        zs = zero_shot.probabilities(features, space)
        out["zero_shot"] = evaluate_scores(
            zs, y, names=space.names, known=known, hidden=hidden, recall_ks=recall_ks, taxonomy=taxonomy
        )
    return out


def evaluate_examples(predictor, examples: Sequence[Example], space, runtime, **kwargs) -> dict:
    kept, G, L, errors = attach_features(list(examples), runtime)
    from backend.features import Features

    features = [Features(e.key or "", g, l) for e, g, l in zip(kept, G, L)]
    out = evaluate_features(predictor, features, [e.positives for e in kept], space, **kwargs)
    out["images_skipped"] = len(errors)
    return out


def evaluate_tasks(predictor, tasks: Sequence[dict], labels: Sequence[str], runtime, taxonomy=None,
                   hidden_seed: int = 1) -> dict:
    """Held-out metrics of ``predictor`` on Label Studio tasks (their annotations as truth):
    the ``model`` figures flattened, ``zero_shot_mAP`` beside them."""
    examples, report = examples_from_tasks(tasks, labels)
    if not examples:
        raise ConfigError("no annotated held-out task")
    space = runtime.label_space(labels, taxonomy)
    out = evaluate_examples(
        predictor, examples, space, runtime, zero_shot=runtime.zero_shot_predictor(), taxonomy=taxonomy,
        hidden_seed=hidden_seed,
    )
    flat = dict(out["model"])
    flat.pop("AP_per_label", None)
    flat["zero_shot_mAP"] = out["zero_shot"]["mAP"]
    flat["split"] = "held-out tasks"
    return flat
