"""The one interface every frozen vision-language backbone implements.

``Backbone.encode_images(images) -> EncodedImages(native_global, native_local, global_, local)``:

- ``native_global [B, N]`` / ``native_local [B, P, N]``: the backbone's *own* visual features
  (for EfficientNet-Lite0: the 1280-d pooled vector and the 7 × 7 feature map). The trained
  heads learn a projection from them into the label-embedding space;
- ``global_ [B, D]`` / ``local [B, P, D]``: the same image in the shared text-aligned space
  (L2-normalised), which is what zero-shot scoring and unseen labels use.

Where the backbone's visual space *is* the text-aligned one (CLIP-style models),
:attr:`Backbone.native_is_aligned` is True and the native tensors are the aligned ones
(the FeatureStore then stores them once).

Preprocessing: multi-label images are seen whole by default — resized so the longer side fits
and padded to a square (``backbone.image_fit: pad``) — rather than centre-cropped, which cuts
away objects near the border (``crop`` keeps the old behaviour).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import Sequence

import torch
from PIL import Image

from ..features import EncodedImages

#: Bumped whenever the meaning of stored features changes (part of the fingerprint, so
#: features of an older version are never mixed with new ones).
FEATURE_VERSION = 2

IMAGE_FITS = ("pad", "crop")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → the first CUDA device when one is usable, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pad_to_square(image: Image.Image, size: int, fill: Sequence[float]) -> Image.Image:
    """Resize ``image`` (bicubic) so that its longer side is ``size`` and pad it, centred, to
    ``size × size`` with the colour ``fill`` (RGB in 0..1; the normalisation mean pads with
    zeros after normalisation). Nothing of the image is cut away."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = image.resize((nw, nh), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), tuple(int(round(255 * c)) for c in fill))
    canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
    return canvas


class Backbone(ABC):
    """A frozen image/text encoder: native visual features plus a shared, L2-normalised
    image/text space.

    Implementations set:

    - ``name``: human-readable identity of architecture *and* weights (shown in model
      versions and ``semlabel doctor``);
    - ``dim``: D, the width of the shared space; ``native_dim``: N, the width of the native
      visual features;
    - ``native_is_aligned``: whether the native visual space is the shared space itself;
    - ``feature_config``: everything besides the weights that changes image features
      (resolution, preprocessing, temperature, ...); part of :attr:`fingerprint`.
    """

    name: str
    dim: int
    native_dim: int
    native_is_aligned: bool = False
    device: torch.device
    feature_config: dict

    #: why this backbone was chosen, and its zero-shot calibration (set by the factory)
    selection_reason: str = ""
    zero_shot_scale: float  # backbone.<kind>.zero_shot_scale
    zero_shot_bias: float  # backbone.<kind>.zero_shot_bias

    @property
    def fingerprint(self) -> str:
        """Short hash of name + feature config + feature version: the namespace of cached
        features (and what a trained model must match)."""
        payload = json.dumps(
            {"name": self.name, "feature_version": FEATURE_VERSION, **self.feature_config}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def text_fingerprint(self) -> str:
        """Namespace of cached text embeddings (text encoder identity only)."""
        return hashlib.sha256(self.name.encode()).hexdigest()[:16]

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB image → the ``[3, H, W]`` tensor :meth:`encode_pixels` takes."""

    @abstractmethod
    def encode_pixels(self, pixels: torch.Tensor) -> EncodedImages:
        """``[B, 3, H, W]`` → :class:`~backend.features.EncodedImages` (aligned features
        L2-normalised; native features as the backbone makes them)."""

    @abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts → L2-normalised embeddings ``[len(texts), D]`` in the image space."""

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> EncodedImages:
        """RGB images → :class:`~backend.features.EncodedImages` on the CPU, float32."""
        if not images:
            raise ValueError("encode_images needs at least one image")
        pixels = torch.stack([self.preprocess(img) for img in images]).to(self.device)
        return self.encode_pixels(pixels).to_cpu_float()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "dim": self.dim,
            "native_dim": self.native_dim,
            "native_is_aligned": self.native_is_aligned,
            "device": str(self.device),
            "fingerprint": self.fingerprint,
            "reason": self.selection_reason,
        }
