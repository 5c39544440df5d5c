"""Image inputs: where bytes come from, and how bytes become RGB pixels.

Sources an :class:`ImageLoader` accepts:

- a local path or ``file://`` URL (in server mode only inside ``images.local_roots``);
- a Label Studio media URL (``/data/upload/...``, ``/data/local-files/?d=...``,
  ``/storage-data/...``, cloud URIs with a task id), resolved on the configured Label Studio
  host the way label-studio-sdk's ``get_local_path`` does and fetched with its token;
- an ``http(s)`` URL whose host is the Label Studio host or in ``images.allowed_hosts``;
- a ``data:image/...;base64,`` URI (at most ``images.max_bytes`` decoded).

Every download (:meth:`ImageLoader._download`) follows redirects itself and checks each hop's
host again (Label Studio's host: the token is sent; a host in ``images.allowed_hosts``: no
token; anything else: refused), has one deadline for the whole download
(``images.download_deadline_s``, redirects included) besides the per-read timeout, and stops
reading at the first byte over ``images.max_bytes``. Bytes stay in memory: nothing is written
to disk.

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
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence
from urllib.parse import parse_qs, quote, unquote, urljoin, urlparse

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
from .sections import ImageSettings

log = logging.getLogger(__name__)

_LS_PREFIXES = ("/data/", "data/", "/upload/", "upload/", "/storage-data/", "storage-data/")
_CLOUD_PREFIXES = ("s3:", "gs:", "azure-blob:")
#: Paths on the Label Studio host a task may name: its media, nothing of its API.
_LS_MEDIA_PATHS = ("/data/upload/", "/data/local-files/", "/storage-data/uploaded/")
_REDIRECTS = (301, 302, 303, 307, 308)


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else f"{text[:limit]}…({len(text)} chars)"


@dataclass(frozen=True)
class ImageBlob:
    """The raw bytes of one image and where they came from."""

    source: str
    data: bytes = field(repr=False)
    #: The pixels, when the loader decoded a large image already (outside the compute lock).
    decoded: "Image.Image | None" = field(default=None, repr=False, compare=False)

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
        blob = self._fetch(source, task_id)
        _predecode(blob, self.settings)
        return blob

    def _fetch(self, source: str, task_id: int | None = None) -> ImageBlob:
        if not isinstance(source, str) or not source.strip():
            raise NotAnImage(repr(source), "empty image reference")
        source = source.strip()
        if source.startswith("data:"):
            return ImageBlob(source[:40] + "...", _decode_data_uri(source, self.settings.max_bytes))
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
            raise URLNotAllowed(_clip(source))
        return ImageBlob(source, self._download(source, [source]))

    def _fetch_label_studio(self, source: str, task_id: int | None) -> ImageBlob:
        if self.label_studio is None:
            raise ImageUnreachable(
                _clip(source), "a Label Studio URL, but no Label Studio host is configured "
                "(LABEL_STUDIO_URL, or a /setup address in auth.allowed_label_studio_urls)"
            )
        urls = self._label_studio_urls(source, task_id)
        return ImageBlob(source, self._download(source, urls))

    def _label_studio_urls(self, source: str, task_id: int | None) -> list[str]:
        """The URL(s) on the Label Studio host that serve ``source``, in the order to try (as
        label-studio-sdk's ``get_local_path`` resolves them). Only media paths; a path with
        ``..`` is refused (it could leave Label Studio's local-files root)."""
        base = self.label_studio.url.rstrip("/")
        if source.startswith(_CLOUD_PREFIXES):
            if task_id is None:
                raise ImageUnreachable(_clip(source), "a cloud storage URI needs the task id")
            fileuri = base64.urlsafe_b64encode(source.encode()).decode()
            return [f"{base}/tasks/{int(task_id)}/presign/?fileuri={quote(fileuri)}"]
        parsed = urlparse(source)
        path = parsed.path if parsed.scheme else "/" + source.split("?", 1)[0].lstrip("/")
        if path.startswith("/upload/"):
            path = "/data" + path
        query = parsed.query
        for value in [path, *(v for vs in parse_qs(query).values() for v in vs)]:
            if _escapes(value):
                raise URLNotAllowed(_clip(source), "a path with '..' or a control character")
        if not path.startswith(_LS_MEDIA_PATHS) and path.rstrip("/") + "/" not in _LS_MEDIA_PATHS:
            raise URLNotAllowed(_clip(source), "not a Label Studio media path "
                                "(/data/upload/, /data/local-files/, /storage-data/uploaded/)")
        if path.startswith("/data/local-files/") and "d" not in parse_qs(query):
            raise URLNotAllowed(_clip(source), "a local-files URL without ?d=")
        if path.startswith("/data/upload/"):
            key = path[len("/data/"):]
            # The media path itself first (what Label Studio 1.23 serves uploads from); the
            # storage-data view of newer releases after it.
            return [f"{base}{path}", f"{base}/storage-data/uploaded/?filepath={quote(key)}"]
        return [f"{base}{path}" + (f"?{query}" if query else "")]

    def _download(self, source: str, urls: Sequence[str]) -> bytes:
        """The bytes behind the first of ``urls`` that answers (the next one is tried on a
        400/401/403/404), within ``images.download_deadline_s`` for all of them together."""
        import requests

        deadline = time.monotonic() + self.settings.download_deadline_s
        last: ImageError | None = None
        with requests.Session() as session:
            session.trust_env = False  # no .netrc credentials, no proxy from the environment
            for url in urls:
                try:
                    return self._get(session, source, url, deadline)
                except ImageUnreachable as exc:
                    last = exc
                    if not any(f"HTTP {code}" in exc.detail for code in (400, 401, 403, 404)):
                        raise
        raise last  # type: ignore[misc]

    def _get(self, session, source: str, url: str, deadline: float) -> bytes:
        import requests

        cfg = self.settings
        shown = _clip(source)
        ls = urlparse(self.label_studio.url) if self.label_studio is not None else None
        for _hop in range(cfg.max_redirects + 1):
            parsed = urlparse(url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise URLNotAllowed(shown, f"redirected to a non-http(s) URL {_clip(url, 80)}")
            headers = {}
            if ls is not None and (parsed.scheme, parsed.netloc) == (ls.scheme, ls.netloc):
                if self.label_studio.api_key:  # the token goes to the Label Studio host only
                    headers["Authorization"] = _auth_header(self.label_studio)
            elif not _host_allowed(parsed.hostname, cfg.allowed_hosts):
                raise URLNotAllowed(shown, f"a redirect to {_clip(parsed.netloc, 80)}, which is neither "
                                           "Label Studio's host nor in images.allowed_hosts")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ImageUnreachable(shown, f"over images.download_deadline_s={cfg.download_deadline_s}")
            timeout = min(cfg.http_timeout_s, remaining)
            try:
                resp = session.get(url, headers=headers, stream=True, allow_redirects=False,
                                   timeout=(timeout, timeout))
            except requests.RequestException as exc:
                raise ImageUnreachable(shown, _short(exc)) from exc
            with resp:
                if resp.status_code in _REDIRECTS and resp.headers.get("Location"):
                    url = urljoin(url, resp.headers["Location"])
                    continue
                if resp.status_code >= 400:
                    raise ImageUnreachable(shown, f"HTTP {resp.status_code} from {_clip(parsed.netloc, 80)}")
                length = resp.headers.get("Content-Length", "")
                if length.isdigit() and int(length) > cfg.max_bytes:
                    raise ImageTooLarge(shown, f"{length} bytes > images.max_bytes={cfg.max_bytes}")
                return _read_streaming(resp, cfg.max_bytes, deadline, cfg, shown)
        raise ImageUnreachable(shown, f"more than images.max_redirects={cfg.max_redirects} redirects")


def _auth_header(conn) -> str:
    """``Token <key>`` for a legacy key, ``Bearer <access>`` for a personal access token."""
    try:
        return conn.auth_headers()["Authorization"]
    except Exception as exc:  # noqa: BLE001 - e.g. the refresh endpoint refused the token
        raise ImageUnreachable("Label Studio", f"cannot get an access token: {_short(exc)}") from exc


def _escapes(value: str) -> bool:
    text = unquote(unquote(value))
    return any(part == ".." for part in text.replace("\\", "/").split("/")) or any(ord(c) < 0x20 for c in text)


def _read_streaming(resp, max_bytes: int, deadline: float, cfg, source: str) -> bytes:
    """Read the body chunk by chunk as it arrives: refused at the first byte over
    ``max_bytes`` and at the deadline, however slowly the bytes drip."""
    import requests
    import urllib3

    buf = io.BytesIO()
    raw = resp.raw
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ImageUnreachable(source, f"over images.download_deadline_s={cfg.download_deadline_s} "
                                           f"({buf.tell()} bytes read)")
        sock = getattr(getattr(raw, "_connection", None), "sock", None)
        if sock is not None:  # each read waits at most what is left of the deadline
            sock.settimeout(max(0.01, min(cfg.http_timeout_s, remaining)))
        try:
            chunk = raw.read1(65536, decode_content=True)
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
            if deadline - time.monotonic() <= 0:
                continue  # reported as over the deadline above
            raise ImageUnreachable(source, _short(exc)) from exc
        if not chunk:
            return buf.getvalue()
        buf.write(chunk)
        if buf.tell() > max_bytes:
            raise ImageTooLarge(source, f"more than images.max_bytes={max_bytes} bytes")


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


def _decode_data_uri(uri: str, max_bytes: int) -> bytes:
    header, _, payload = uri.partition(",")
    if ";base64" not in header:
        raise NotAnImage(uri[:40] + "...", "data URI is not base64")
    if len(payload) * 3 // 4 > max_bytes + 3:  # checked before decoding anything
        raise ImageTooLarge(uri[:40] + "...", f"data URI of ~{len(payload) * 3 // 4} bytes > images.max_bytes={max_bytes}")
    try:
        data = base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise NotAnImage(uri[:40] + "...", "invalid base64") from exc
    if len(data) > max_bytes:
        raise ImageTooLarge(uri[:40] + "...", f"{len(data)} bytes > images.max_bytes={max_bytes}")
    return data


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def _predecode(blob: ImageBlob, settings: ImageSettings) -> None:
    """Decode a large image now, in the downloading thread, shrunk to at most
    ``images.decode_max_side`` (JPEG: decoded at 1/2, 1/4 or 1/8 scale in draft mode), so
    the feature extractor's compute lock never waits on a huge decode. Small images and
    undecodable bytes are left for :func:`decode` (which reports the error)."""
    side = settings.decode_max_side
    try:
        with Image.open(io.BytesIO(blob.data)) as probe:
            width, height = probe.size
    except Exception:  # noqa: BLE001 - decode() says what is wrong
        return
    if max(width, height) <= side:
        return
    try:
        object.__setattr__(blob, "decoded", decode(blob, settings.max_pixels, max_side=side))
    except ImageError:
        return


def decode(blob: ImageBlob, max_pixels: int, max_side: int | None = None) -> Image.Image:
    """Bytes → an RGB ``PIL.Image`` with EXIF orientation applied (``max_side``: shrunk to
    fit ``max_side`` x ``max_side``, keeping the aspect ratio).

    The pixel count is checked from the header before any pixel is decoded, so a
    decompression bomb costs nothing. Transparent images are composited on white.
    """
    if blob.decoded is not None:
        return blob.decoded
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
    if max_side is not None and max(width, height) > max_side:
        img.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale; others: no-op
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise TruncatedImage(blob.source, _short(exc)) from exc
    if max_side is not None and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose the image
        log.warning("%s: ignoring unreadable EXIF orientation", _clip(blob.source))
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
