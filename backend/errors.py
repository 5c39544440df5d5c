"""Typed errors. Each carries a one-line, user-facing message; callers print ``str(err)``."""

from __future__ import annotations


class SemlabelError(Exception):
    """Base class of every error semlabel raises on purpose."""


class ConfigError(SemlabelError):
    """A configuration (settings file, label config, taxonomy) is invalid."""


class BackboneUnavailable(SemlabelError):
    """The requested backbone's weights cannot be loaded."""


class ImageError(SemlabelError):
    """An image could not be turned into pixels. ``source`` names the input."""

    reason = "image error"

    def __init__(self, source: str, detail: str = ""):
        self.source = source
        self.detail = detail
        # The source comes from a request: shown short, with control characters escaped.
        shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(source)[:160])
        shown += f"…({len(source)} chars)" if len(str(source)) > 160 else ""
        super().__init__(f"{shown}: {self.reason}" + (f" ({detail})" if detail else ""))


class ImageNotFound(ImageError):
    reason = "file not found"


class ImageUnreachable(ImageError):
    reason = "could not be downloaded"


class URLNotAllowed(ImageError):
    reason = "URL not allowed (host is not in images.allowed_hosts)"


class NotAnImage(ImageError):
    reason = "not an image"


class TruncatedImage(ImageError):
    reason = "truncated or corrupt image"


class ImageTooLarge(ImageError):
    reason = "image too large"


class RedisUnavailable(SemlabelError):
    """No Redis server answers at the configured URL."""


class InvalidWebhook(SemlabelError):
    """A Label Studio webhook payload that cannot be used; nothing of it was stored.

    ``reason`` is a one-line explanation suitable for a 400 response."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"invalid webhook: {reason}")


class ModelStoreError(SemlabelError):
    """A model-store operation cannot be done (unknown version, nothing to roll back to)."""


class CorruptVersion(ModelStoreError):
    """A model version directory is incomplete or its files do not match its manifest."""


class ModelLoadError(SemlabelError):
    """A trained model directory cannot be served: missing or corrupt files, an unknown
    format, or features from another backbone than the one it was trained on."""
