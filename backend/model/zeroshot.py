"""Zero-shot label scores from the backbone alone (used until a trained model exists).

SigRL's score mix without any training: ``s = w · cos(g, h) + (1 − w) · topk_p cos(l_p, h)``,
turned into a probability with the backbone's calibration
``p = sigmoid(scale · (s − bias))`` (``configs: backbone.<kind>.zero_shot_*``). The two
numbers are not set by hand: they are fitted from labelled data, with the observation-rate
model for partial labels (:func:`~backend.model.calibration.fit_zero_shot_calibration`; how
and on what is recorded beside them in the configuration).
"""

from __future__ import annotations

import torch

from ..features import stack
from .predictor import Predictor, Reasons, ranked_suggestions, taxonomy_path, text_neighbours


def topk_mean(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Mean of the ``k`` largest values along ``dim`` (all of them when fewer than k)."""
    k = max(1, min(k, scores.shape[dim]))
    return scores.topk(k, dim=dim).values.mean(dim)


def similarity(
    global_: torch.Tensor, local: torch.Tensor, label_embeddings: torch.Tensor, global_weight: float, top_k: int
) -> torch.Tensor:
    """Mixed cosine similarity ``[B, C]`` of images to labels (all inputs L2-normalised)."""
    g = global_ @ label_embeddings.T  # [B, C]
    l = topk_mean(torch.einsum("bpd,cd->bpc", local, label_embeddings), top_k, dim=1)  # [B, C]
    return global_weight * g + (1.0 - global_weight) * l


def zero_shot_logits(global_, local, label_embeddings, *, global_weight, top_k, scale, bias) -> torch.Tensor:
    return scale * (similarity(global_, local, label_embeddings, global_weight, top_k) - bias)


def zero_shot_probs(global_, local, label_embeddings, *, global_weight, top_k, scale, bias) -> torch.Tensor:
    return torch.sigmoid(
        zero_shot_logits(
            global_, local, label_embeddings, global_weight=global_weight, top_k=top_k, scale=scale, bias=bias
        )
    )


class ZeroShotPredictor(Predictor):
    """Backbone-only scores; served until a trained model exists.

    It has no co-occurrence statistics, so known labels do not change its scores and its
    suggestions carry visual, text-neighbour and taxonomy reasons only.
    """

    def __init__(self, backbone, global_weight: float, top_k: int, neighbours: int):
        self.backbone = backbone
        self.global_weight = global_weight
        self.top_k = top_k
        self.neighbours = neighbours
        self.version = f"zero-shot@{backbone.name}"

    def probabilities(self, features, space, known=None):
        global_, local = stack(features)
        return zero_shot_probs(
            global_, local, space.embeddings,
            global_weight=self.global_weight, top_k=self.top_k,
            scale=self.backbone.zero_shot_scale, bias=self.backbone.zero_shot_bias,
        )

    def suggest(self, features, space, known, top_k, min_probability=0.0):
        probs = self.probabilities(features, space, known)

        def reasons(b, c, _known):
            p = round(float(probs[b, c]), 4)
            return Reasons(visual=p, zero_shot=p, neighbours=text_neighbours(space, c, self.neighbours),
                           taxonomy_path=taxonomy_path(space, c))

        return ranked_suggestions(space, probs, known, top_k, min_probability, reasons)
