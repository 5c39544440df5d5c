"""Image inputs: where bytes come from, and how bytes become RGB pixels.

Sources an :class:`ImageLoader` accepts:

- a local path or ``file://`` URL (in server mode only inside ``images.local_roots``);
- a Label Studio URL (``/data/upload/...``, ``/data/local-files/?d=...``,
  ``/storage-data/...``, cloud URIs with a task id), fetched by label-studio-sdk's
  ``get_local_path`` with the configured host and token;
- an ``http(s)`` URL whose host is the Label Studio host or in ``images.allowed_hosts``;
- a ``data:image/...;base64,`` URI.

Every failure is an :class:`~backend.errors.ImageError` subclass naming the source.
Features are keyed by the SHA-256 of the bytes, so a cached image is never decoded again.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import io
import logging
import os
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote, urlparse

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import (
    ImageError,
    ImageNotFound,
    ImageTooLarge,
    ImageUnreachable,
    NotAnImage,
    TruncatedImage,
    URLNotAllowed,
)
from .settings import ImageSettings

log = logging.getLogger(__name__)

_LS_PREFIXES = ("/data/", "data/", "/upload/", "upload/", "/storage-data/", "storage-data/")
_CLOUD_PREFIXES = ("s3:", "gs:", "azure-blob:")


@dataclass(frozen=True)
class ImageBlob:
    """The raw bytes of one image and where they came from."""

    source: str
    data: bytes = field(repr=False)

    @cached_property  # hashed once: the feature store asks several times per image
    def key(self) -> str:
        """Content hash: the feature-cache key (independent of the source's name)."""
        return hashlib.sha256(self.data).hexdigest()


def _host_allowed(host: str, patterns: Sequence[str]) -> bool:
    host = host.lower()
    return any(fnmatch.fnmatch(host, p.lower()) for p in patterns)


class ImageLoader:
    """Fetches image bytes from paths and URLs (see module docstring).

    ``local_roots=None`` lets any local path be read (the CLI); a list restricts plain paths
    to those directories (the server, where paths come from task data).
    """

    def __init__(
        self,
        settings: ImageSettings,
        label_studio=None,
        local_roots: Sequence[str | os.PathLike] | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        self.settings = settings
        self.label_studio = label_studio  # backend.ls.connection.LabelStudioConnection | None
        self.local_roots = (
            None if local_roots is None else [Path(r).expanduser().resolve() for r in local_roots]
        )
        self.cache_dir = str(cache_dir) if cache_dir else None

    # -- public ------------------------------------------------------------------------
    def fetch(self, source: str, task_id: int | None = None) -> ImageBlob:
        if not isinstance(source, str) or not source.strip():
            raise NotAnImage(repr(source), "empty image reference")
        source = source.strip()
        if source.startswith("data:"):
            return ImageBlob(source[:40] + "...", _decode_data_uri(source))
        parsed = urlparse(source)
        if parsed.scheme in ("http", "https"):
            return self._fetch_http(source, parsed.hostname or "", task_id)
        if parsed.scheme == "file":
            return self._read_local(source, Path(unquote(parsed.path)))
        if source.startswith(_LS_PREFIXES) or source.startswith(_CLOUD_PREFIXES):
            return self._fetch_label_studio(source, task_id)
        return self._read_local(source, Path(source))

    # -- sources -----------------------------------------------------------------------
    def _read_local(self, source: str, path: Path) -> ImageBlob:
        path = path.expanduser()
        if self.local_roots is not None:
            resolved = path.resolve()
            if not any(resolved.is_relative_to(root) for root in self.local_roots):
                raise URLNotAllowed(source, "local path outside images.local_roots")
        return _read_file(source, path, self.settings.max_bytes)

    def _ls_host(self) -> str | None:
        return self.label_studio.url if self.label_studio is not None else None

    def _fetch_http(self, source: str, host: str, task_id: int | None) -> ImageBlob:
        ls_host = self._ls_host()
        if ls_host and urlparse(ls_host).netloc == urlparse(source).netloc:
            return self._fetch_label_studio(source, task_id)
        if not _host_allowed(host, self.settings.allowed_hosts):
            raise URLNotAllowed(source)
        import requests

        try:
            with requests.get(source, stream=True, timeout=self.settings.http_timeout_s) as resp:
                resp.raise_for_status()
                data = _read_capped(resp.iter_content(65536), self.settings.max_bytes, source)
        except ImageError:
            raise
        except requests.RequestException as exc:
            raise ImageUnreachable(source, _short(exc)) from exc
        return ImageBlob(source, data)

    def _fetch_label_studio(self, source: str, task_id: int | None) -> ImageBlob:
        if self.label_studio is None:
            raise ImageUnreachable(
                source, "a Label Studio URL, but no Label Studio host is configured "
                "(LABEL_STUDIO_URL or the /setup payload)"
            )
        from label_studio_sdk._extensions.label_studio_tools.core.utils.io import get_local_path

        try:
            token = self.label_studio.access_token() if self.label_studio.api_key else None
            cache_dir = self.cache_dir or tempfile.gettempdir()
            path = get_local_path(
                source,
                cache_dir=cache_dir,
                hostname=self.label_studio.url,
                access_token=token,
                task_id=task_id,
            )
        except ImageError:
            raise
        except Exception as exc:  # requests, FileNotFoundError, sdk ApiError, ValueError
            raise ImageUnreachable(source, _short(exc)) from exc
        # The SDK resolved it (a download, or a file under LOCAL_FILES_DOCUMENT_ROOT), so
        # local_roots does not apply.
        return _read_file(source, Path(path), self.settings.max_bytes)


def _read_file(source: str, path: Path, max_bytes: int) -> ImageBlob:
    if not path.is_file():
        raise ImageNotFound(source)
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageTooLarge(source, f"{size} bytes > images.max_bytes={max_bytes}")
    try:
        return ImageBlob(source, path.read_bytes())
    except OSError as exc:
        raise ImageNotFound(source, exc.strerror or str(exc)) from exc


def _read_capped(chunks, max_bytes: int, source: str) -> bytes:
    buf = io.BytesIO()
    for chunk in chunks:
        buf.write(chunk)
        if buf.tell() > max_bytes:
            raise ImageTooLarge(source, f"more than images.max_bytes={max_bytes} bytes")
    return buf.getvalue()


def _decode_data_uri(uri: str) -> bytes:
    header, _, payload = uri.partition(",")
    if ";base64" not in header:
        raise NotAnImage(uri[:40] + "...", "data URI is not base64")
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise NotAnImage(uri[:40] + "...", "invalid base64") from exc


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def decode(blob: ImageBlob, max_pixels: int) -> Image.Image:
    """Bytes → an RGB ``PIL.Image`` with EXIF orientation applied.

    The pixel count is checked from the header before any pixel is decoded, so a
    decompression bomb costs nothing. Transparent images are composited on white.
    """
    try:
        img = Image.open(io.BytesIO(blob.data))
    except UnidentifiedImageError as exc:
        raise NotAnImage(blob.source, "unrecognised image format") from exc
    except Image.DecompressionBombError as exc:  # PIL's own bound (2 × MAX_IMAGE_PIXELS)
        raise ImageTooLarge(blob.source, f"{_short(exc)} (images.max_pixels={max_pixels})") from exc
    except OSError as exc:
        raise NotAnImage(blob.source, _short(exc)) from exc
    width, height = img.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            blob.source, f"{width}x{height} pixels > images.max_pixels={max_pixels}"
        )
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise TruncatedImage(blob.source, _short(exc)) from exc
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose the image
        log.warning("%s: ignoring unreadable EXIF orientation", blob.source)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # High bit-depth greyscale: stretch to 8 bits before converting.
        lo, hi = img.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 1.0
        img = img.point(lambda v: (v - lo) * scale).convert("L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
