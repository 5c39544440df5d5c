"""open_clip backbone: any open_clip model with a hub tag or a local checkpoint file.

Local features:

- ViT: the patch tokens after ``ln_post``, projected by ``visual.proj`` (P = grid²);
- ModifiedResNet: the attention-pool *inputs* passed through its value and output
  projections, location by location (as in MaskCLIP; P = (image_size / 32)²);
- anything else: the global feature as a single location (P = 1), with a warning.

A CLIP image tower's output space *is* the text-aligned space, so ``native_is_aligned`` is
True: its native features are the aligned ones (stored once, and the heads' projection of
native features starts from — and works in — that same space).

Loading never waits on the network when offline (``HF_HUB_OFFLINE=1``): a hub tag is then
only read from the local cache. Online, a short TCP probe of the weights host runs first,
so an unreachable hub costs ``backbone.network_probe_timeout_s`` rather than minutes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import BackboneUnavailable
from ..features import EncodedImages
from .base import IMAGE_FITS, Backbone, pad_to_square, resolve_device

log = logging.getLogger(__name__)

HF_HOST = "huggingface.co"


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _host_reachable(host: str, port: int, timeout: float) -> bool:
    """TCP connect with a hard deadline (DNS included, which has no timeout of its own)."""
    result: list[bool] = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _file_identity(path: Path) -> str:
    """Cheap content identity of a (possibly large) checkpoint: size + head + tail hash."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:12]


def resolve_pretrained(model: str, pretrained: str | None, probe_timeout: float) -> str | None:
    """Check that ``pretrained`` can be loaded now; return it, or raise BackboneUnavailable."""
    if not pretrained:
        return None
    if os.path.isfile(os.path.expanduser(pretrained)):
        return os.path.expanduser(pretrained)
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(model, pretrained)
    if not cfg:
        raise BackboneUnavailable(f"{pretrained!r} is neither a file nor a known tag of {model}")
    if cfg.get("hf_hub"):
        if _hf_cached(cfg["hf_hub"]):
            return pretrained
        if is_offline():
            raise BackboneUnavailable(f"{model}/{pretrained} is not in the local hub cache (offline)")
        if not _host_reachable(HF_HOST, 443, probe_timeout):
            raise BackboneUnavailable(f"{HF_HOST} unreachable within {probe_timeout:g} s")
        return pretrained
    url = cfg.get("url") or ""
    cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(urlparse(url).path)
    if cached.is_file():
        return pretrained
    if is_offline():
        raise BackboneUnavailable(f"weights of {model}/{pretrained} are not in the local cache (offline)")
    host = urlparse(url).hostname or ""
    if not host or not _host_reachable(host, 443, probe_timeout):
        raise BackboneUnavailable(f"{host or url} unreachable within {probe_timeout:g} s")
    return pretrained


def _hf_cached(hf_hub: str) -> bool:
    """Whether open_clip would find this ``org/repo/[file]`` weight file in the local cache."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.pretrained import HF_WEIGHTS_NAME

    repo_id, filename = os.path.split(hf_hub)
    filename = filename or HF_WEIGHTS_NAME
    stem = os.path.splitext(filename)[0]
    for name in (stem + ".safetensors", filename):
        if isinstance(try_to_load_from_cache(repo_id, name), str):
            return True
    return False


class OpenClipBackbone(Backbone):
    native_is_aligned = True

    def __init__(
        self,
        model: str,
        pretrained: str | None,
        device: str = "auto",
        *,
        probe_timeout: float,
        model_configs: Sequence[str] = (),
        image_fit: str,
        text_batch_size: int,
    ):
        import open_clip

        if image_fit not in IMAGE_FITS:
            raise ValueError(f"backbone.image_fit must be one of {IMAGE_FITS}, not {image_fit!r}")
        self.image_fit = image_fit
        self.text_batch_size = text_batch_size

        for path in model_configs:  # model shapes live in config files, as in open_clip
            open_clip.add_model_config(os.path.expanduser(path))
        self.device = resolve_device(device)
        resolved = resolve_pretrained(model, pretrained, probe_timeout)
        if resolved is None:
            log.warning("open_clip %s has no pretrained weights: features are random", model)
        try:
            clip, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=resolved, device=self.device
            )
            self.tokenizer = open_clip.get_tokenizer(model)
        except Exception as exc:  # download or load failures arrive as several types
            raise BackboneUnavailable(f"loading failed: {exc}") from exc
        self.model = clip.eval()
        self._preprocess = preprocess
        if resolved and os.path.isfile(resolved):
            weights = f"{Path(resolved).name}#{_file_identity(Path(resolved))}"
        else:
            weights = resolved or "random-init"
        self.name = f"open_clip:{model}/{weights}"
        visual = self.model.visual
        self.dim = int(self.encode_texts(["a"]).shape[-1])
        self.native_dim = self.dim
        pre = open_clip.get_model_preprocess_cfg(self.model)
        size = pre.get("size", visual.image_size)
        self._image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self._mean = tuple(pre.get("mean") or open_clip.OPENAI_DATASET_MEAN)
        self.feature_config = {"preprocess": repr(preprocess), "image_fit": image_fit}
        self._local_kind = self._detect_local_kind(visual)
        if self._local_kind == "global":
            log.warning("open_clip %s: no patch features for this vision tower; using P=1", model)

    @staticmethod
    def _detect_local_kind(visual) -> str:
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.transformer import VisionTransformer

        if isinstance(visual, VisionTransformer):
            return "vit"
        if isinstance(visual, ModifiedResNet) and visual.attnpool is not None:
            return "resnet"
        return "global"

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        if self.image_fit == "pad":  # whole image: open_clip's resize and crop are then no-ops
            image = pad_to_square(image, self._image_size, self._mean)
        return self._preprocess(image)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> EncodedImages:
        visual = self.model.visual
        if self._local_kind == "vit":
            visual.output_tokens = True
            try:
                pooled, tokens = visual(pixels)
            finally:
                visual.output_tokens = False
            if visual.proj is not None and tokens.shape[-1] == visual.proj.shape[0]:
                tokens = tokens @ visual.proj
            local = tokens
        elif self._local_kind == "resnet":
            x = visual.stem(pixels)
            x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
            pooled = visual.attnpool(x)
            pool = visual.attnpool
            flat = x.flatten(2).transpose(1, 2)  # [B, HW, C]
            flat = flat + pool.positional_embedding[1:].to(flat.dtype)
            local = pool.c_proj(pool.v_proj(flat))
        else:
            pooled = self.model.encode_image(pixels)
            local = pooled[:, None, :]
        global_, local = F.normalize(pooled.float(), dim=-1), F.normalize(local.float(), dim=-1)
        return EncodedImages.aligned_only(global_, local)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        step = self.text_batch_size
        for start in range(0, len(texts), step):
            tokens = self.tokenizer(list(texts[start : start + step])).to(self.device)
            out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(out)
