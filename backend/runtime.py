"""The per-process pieces every entry point shares: backbone, caches, image loader.

Data flows one way: image source → :class:`~backend.images.ImageLoader` (bytes) →
:class:`~backend.features.FeatureStore` (backbone features, computed once) → heads.
Building a :class:`Runtime` loads the backbone, so make one per process and reuse it.
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

import torch

from .backbones import create_backbone
from .errors import ImageError
from .features import Features, FeatureStore
from .images import ImageLoader
from .labels import Label, LabelSpace, Taxonomy, TextEmbeddingCache
from .model.zeroshot import ZeroShotPredictor
from .settings import Settings, get_settings

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings, backbone, label_studio=None, local_roots=None, text_cache=None):
        self.settings = settings
        self.backbone = backbone
        self.text_cache = text_cache or TextEmbeddingCache.from_settings(settings)
        self.features = FeatureStore.from_settings(settings, backbone)
        self.loader = ImageLoader(
            settings.images,
            label_studio=label_studio,
            local_roots=local_roots,
            cache_dir=settings.data_path / "downloads",
        )

    @classmethod
    def create(cls, settings: Settings | None = None, backbone_kind: str | None = None, **kwargs) -> "Runtime":
        settings = settings or get_settings()
        text_cache = TextEmbeddingCache.from_settings(settings)
        backbone = create_backbone(settings, kind=backbone_kind, text_cache=text_cache)
        return cls(settings, backbone, text_cache=text_cache, **kwargs)

    # -- labels ------------------------------------------------------------------------
    def label_space(self, labels: Iterable[Label | str], taxonomy: Taxonomy | None = None) -> LabelSpace:
        prompts = self.settings.prompts
        return LabelSpace.build(
            labels, self.backbone, self.text_cache, prompts.templates, prompts.name_weight, taxonomy
        )

    # -- images ------------------------------------------------------------------------
    def fetch(self, sources: Sequence[str], task_ids: Sequence[int | None] | None = None):
        """Bytes of each source, or the ImageError explaining why not (never raises)."""
        out = []
        for i, source in enumerate(sources):
            try:
                out.append(self.loader.fetch(source, task_ids[i] if task_ids else None))
            except ImageError as err:
                out.append(err)
        return out

    def features_for(
        self, sources: Sequence[str], task_ids=None, progress: bool | None = None
    ) -> list[Features | ImageError]:
        return self.features.get_or_compute(self.fetch(sources, task_ids), progress=progress)

    # -- scores ------------------------------------------------------------------------
    def zero_shot_predictor(self) -> ZeroShotPredictor:
        zs = self.settings.zero_shot
        return ZeroShotPredictor(self.backbone, zs.global_weight, zs.local_top_k, self.settings.suggest.neighbours)

    def zero_shot(self, features: Sequence[Features], space: LabelSpace) -> torch.Tensor:
        """Zero-shot probabilities ``[B, C]``."""
        return self.zero_shot_predictor().probabilities(features, space)
