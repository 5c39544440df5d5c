"""The one interface every frozen vision-language backbone implements."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import Sequence

import torch
from PIL import Image


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → the first CUDA device when one is usable, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Backbone(ABC):
    """A frozen image/text encoder into one shared, L2-normalised space.

    Implementations set:

    - ``name``: human-readable identity of architecture *and* weights (shown in model
      versions and ``semlabel doctor``);
    - ``dim``: D, the width of the shared space;
    - ``feature_config``: everything besides the weights that changes image features
      (resolution, temperature, ...); part of :attr:`fingerprint`.
    """

    name: str
    dim: int
    device: torch.device
    feature_config: dict

    #: why this backbone was chosen, and its zero-shot calibration (set by the factory)
    selection_reason: str = ""
    zero_shot_scale: float = 10.0
    zero_shot_bias: float = 0.5

    @property
    def fingerprint(self) -> str:
        """Short hash of name + feature config: the namespace of cached features."""
        payload = json.dumps({"name": self.name, **self.feature_config}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def text_fingerprint(self) -> str:
        """Namespace of cached text embeddings (text encoder identity only)."""
        return hashlib.sha256(self.name.encode()).hexdigest()[:16]

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB image → the ``[3, H, W]`` tensor :meth:`encode_pixels` takes."""

    @abstractmethod
    def encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 3, H, W]`` → (global ``[B, D]``, local ``[B, P, D]``), both L2-normalised."""

    @abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts → L2-normalised embeddings ``[len(texts), D]`` in the image space."""

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB images → (global ``[B, D]``, local ``[B, P, D]``) on the CPU, float32."""
        if not images:
            raise ValueError("encode_images needs at least one image")
        pixels = torch.stack([self.preprocess(img) for img in images]).to(self.device)
        global_, local = self.encode_pixels(pixels)
        return global_.float().cpu(), local.float().cpu()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "dim": self.dim,
            "device": str(self.device),
            "fingerprint": self.fingerprint,
            "reason": self.selection_reason,
        }
