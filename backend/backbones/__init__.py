"""Backbones: one factory, :func:`create_backbone`, driven by ``configs: backbone``."""

from __future__ import annotations

import logging

from ..errors import BackboneUnavailable
from .base import Backbone, resolve_device

__all__ = ["Backbone", "BackboneUnavailable", "create_backbone", "resolve_device"]

log = logging.getLogger(__name__)


def create_backbone(settings=None, kind: str | None = None, text_cache=None) -> Backbone:
    """Build the configured backbone.

    ``kind`` (default ``settings.backbone.kind``): ``open_clip``, ``packaged`` or ``auto``
    — open_clip when its configured weights load without waiting on the network, else the
    packaged backbone, with a warning naming the reason. The chosen backbone carries its
    zero-shot calibration (``zero_shot_scale``/``zero_shot_bias``) and ``selection_reason``.
    """
    from ..labels import TextEmbeddingCache
    from ..settings import get_settings

    settings = settings or get_settings()
    cfg = settings.backbone
    kind = kind or cfg.kind
    if text_cache is None:
        text_cache = TextEmbeddingCache.from_settings(settings)

    if kind in ("open_clip", "auto"):
        from .openclip import OpenClipBackbone

        oc = cfg.open_clip
        try:
            if kind == "auto" and not oc.pretrained:
                raise BackboneUnavailable("backbone.open_clip.pretrained is not set")
            backbone = OpenClipBackbone(
                oc.model, oc.pretrained, cfg.device, probe_timeout=cfg.network_probe_timeout_s,
                model_configs=oc.model_configs, image_fit=cfg.image_fit, text_batch_size=cfg.text_batch_size,
            )
        except BackboneUnavailable as exc:
            if kind == "open_clip":
                raise
            reason = f"open_clip {oc.model}/{oc.pretrained} unavailable: {exc}"
            log.warning(
                "USING THE PACKAGED BACKBONE (weak zero-shot): %s. Set backbone.open_clip.pretrained "
                "to a checkpoint file or a cached hub tag for CLIP-quality scores.", reason
            )
        else:
            backbone.zero_shot_scale, backbone.zero_shot_bias = oc.zero_shot_scale, oc.zero_shot_bias
            backbone.selection_reason = f"backbone.kind={kind}: open_clip weights loaded"
            log.info("backbone: %s on %s", backbone.name, backbone.device)
            return backbone
    elif kind != "packaged":
        raise ValueError(f"unknown backbone kind {kind!r} (auto, open_clip, packaged)")
    else:
        reason = "backbone.kind=packaged"

    from .packaged import PackagedBackbone

    backbone = PackagedBackbone(cfg.packaged, settings.prompts.templates, text_cache, cfg.device,
                                image_fit=cfg.image_fit, text_batch_size=cfg.text_batch_size)
    pk = cfg.packaged
    backbone.zero_shot_scale, backbone.zero_shot_bias = pk.zero_shot_scale, pk.zero_shot_bias
    backbone.selection_reason = reason
    log.info("backbone: %s on %s", backbone.name, backbone.device)
    return backbone
