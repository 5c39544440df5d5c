"""SigRLPredictor: a trained model behind the :class:`~.predictor.Predictor` interface.

``load_predictor(model_dir, runtime)`` is what the backend and the model store call. The
predictor scores any label space: labels seen in training, and labels added later (scored
from their text embedding through the trained projection, GMC and SVFR, with zero
co-occurrence counts). Per label space it caches the GMC output and the known-label matrix,
so serving costs the visual heads only.

Probabilities are *calibrated*: the heads' logits go through the model's per-label
calibration (:mod:`.calibration`; labels it does not know get its shared map) — the
image-only map without known labels, the conditional map with them.

Tensor-level access (benchmarks, evaluation): :meth:`SigRLPredictor.scores` of an
:class:`~backend.features.EncodedImages` batch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from ..features import EncodedImages, Features, stack_all
from ..labels import LabelSpace, Taxonomy
from .batched import in_batches
from .calibration import Calibration
from .checkpoint import TrainedModel, load_model
from .predictor import Predictor, Reasons, co_occurring_support, known_mask, ranked_suggestions, text_neighbours
from .sigrl import label_graph


@dataclass
class Scores:
    """Scores of a batch ``[B, C]``: raw logits of the heads and calibrated probabilities,
    image-only (``visual``) and given the known labels (``conditional``; = visual without
    known labels, or while the known-label expert is inactive)."""

    visual_logits: torch.Tensor
    conditional_logits: torch.Tensor
    visual: torch.Tensor
    conditional: torch.Tensor


class SigRLPredictor(Predictor):
    def __init__(
        self,
        model: TrainedModel,
        zero_shot: Predictor | None = None,
        *,
        neighbours: int,
        co_occurring: int,
        batch_size: int,
        graph_cache: int,
        device: str | torch.device = "cpu",
    ):
        self.model = model
        self.module = model.module.eval().to(device)
        self.device = torch.device(device)
        self.zero_shot = zero_shot
        self.neighbours = neighbours
        self.co_occurring = co_occurring
        self.batch_size = batch_size
        self.graph_cache = graph_cache
        self.version = f"sigrl-{model.model_id or 'unsaved'}@{model.backbone.get('name', '?')}"
        self.taxonomy = Taxonomy(dict(model.taxonomy)) if model.taxonomy else None
        self._cache: dict[str, tuple] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, model: TrainedModel, settings, zero_shot: Predictor | None = None,
                      device: str | torch.device = "cpu") -> "SigRLPredictor":
        """The predictor with ``suggest.*`` and ``scoring.*`` of ``settings``."""
        return cls(model, zero_shot, neighbours=settings.suggest.neighbours,
                   co_occurring=settings.suggest.co_occurring, batch_size=settings.scoring.batch_size,
                   graph_cache=settings.scoring.graph_cache, device=device)

    @property
    def labels_seen(self) -> list[str]:
        return list(self.model.labels)

    # -- per label space ---------------------------------------------------------------
    @torch.inference_mode()
    def prepare(self, space: LabelSpace):
        """(graph, Ĥ, known matrix S) of a label space (cached); ``graph.cond[j, c]`` is the
        observed ``P(c | j)``."""
        key = space.digest  # hashed once per space, not per call
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        graph = label_graph(self.model.stats, space.names, space.embeddings, self.module.cfg).to(self.device)
        H = self.module.label_embeddings(space.embeddings.to(self.device), graph)
        S = self.module.known_matrix(H, graph)
        entry = (graph, H, S)
        with self._lock:
            if len(self._cache) > self.graph_cache:
                self._cache.clear()
            self._cache[key] = entry
        return entry

    # -- scores ------------------------------------------------------------------------
    @property
    def visual_calibration(self) -> Calibration:
        return self.model.calibration.get("visual") or Calibration.identity()

    @property
    def conditional_calibration(self) -> Calibration:
        return self.model.calibration.get("conditional") or self.visual_calibration

    @torch.inference_mode()
    def scores(self, batch: EncodedImages, space: LabelSpace, known: torch.Tensor | None = None) -> Scores:
        """:class:`Scores` of a feature batch; ``known [B, C]`` 0/1 (aligned to ``space``)."""
        graph, H, S = self.prepare(space)
        embeddings = space.embeddings.to(self.device)

        def heads(part, k):
            out = self.module.score(part, H, graph, k, S, embeddings=embeddings)
            return out.visual_logits, out.logits

        empty = (torch.zeros(0, len(space)), torch.zeros(0, len(space)))
        vz, cz = in_batches(heads, batch, self.batch_size, self.device, known=known, empty=empty)
        vp = self.visual_calibration.probabilities(vz, space.names)
        has = (known.sum(1, keepdim=True) > 0) if known is not None else torch.zeros(len(vz), 1, dtype=torch.bool)
        active = bool(float(self.module.known_active) > 0)
        cp = torch.where(has & active, self.conditional_calibration.probabilities(cz, space.names), vp)
        return Scores(vz, cz, vp, cp)

    def logits(self, features: Sequence[Features], space: LabelSpace, known=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(visual logits ``[B, C]``, logits given the known labels ``[B, C]``), uncalibrated."""
        out = self._scores(features, space, known)
        return out.visual_logits, out.conditional_logits

    def _scores(self, features, space, known) -> Scores:
        mask = known_mask(space, known, len(features)) if known is not None else None
        return self.scores(stack_all(features), space, mask)

    def probabilities(self, features, space, known=None):
        """Calibrated ``P(label present)`` ``[B, C]`` (given ``known`` labels when given)."""
        if not features:
            return torch.zeros(0, len(space))
        return self._scores(features, space, known).conditional

    def suggest(self, features, space, known, top_k, min_probability=0.0):
        if not features:
            return []
        out_scores = self._scores(features, space, known)
        visual, probs = out_scores.visual, out_scores.conditional
        zero_shot = self.zero_shot.probabilities(features, space) if self.zero_shot is not None else None
        cond = self.prepare(space)[0].cond.cpu()  # cond[j, c] = P(c | j), observed
        taxonomy = space.taxonomy or self.taxonomy

        def reasons(b, c, known_idx):
            support = co_occurring_support(space, cond, known_idx, c, self.co_occurring)
            return Reasons(
                visual=round(float(visual[b, c]), 4),
                zero_shot=round(float(zero_shot[b, c]), 4) if zero_shot is not None else float("nan"),
                co_occurring=support,
                neighbours=text_neighbours(space, c, self.neighbours),
                taxonomy_path=taxonomy.path(space.names[c]) if taxonomy is not None else [],
            )

        return ranked_suggestions(space, probs, known, top_k, min_probability, reasons)


def load_predictor(
    model_dir, runtime, device: str | None = None, *, weights_sha256: str | None = None
) -> SigRLPredictor:
    """The servable predictor of a model directory for this runtime's backbone.

    ``weights_sha256``: the weights' digest when the caller has checked the files already (the
    model store), so they are not hashed twice (:func:`~.checkpoint.load_model`). Raises
    :class:`~backend.errors.ModelLoadError` when the directory is incomplete or corrupt, or was
    trained on another backbone's features."""
    model = load_model(model_dir, expected_fingerprint=runtime.backbone.fingerprint, weights_sha256=weights_sha256)
    if device is None:
        device = runtime.backbone.device if str(runtime.backbone.device).startswith("cuda") else "cpu"
    return SigRLPredictor.from_settings(model, runtime.settings, zero_shot=runtime.zero_shot_predictor(),
                                        device=device)
