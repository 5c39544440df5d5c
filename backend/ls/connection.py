"""The Label Studio instance a backend talks to: its URL and a token, handled by the SDK.

Both token kinds work: a legacy API token (sent as ``Token <key>``) and a personal access
token, which is a JWT *refresh* token that label-studio-sdk exchanges for short-lived access
tokens (sent as ``Bearer <access>``) and refreshes when they expire.
"""

from __future__ import annotations

import fnmatch
import threading
from functools import cached_property
from urllib.parse import urlsplit


def normalise_url(url: str) -> str | None:
    """``scheme://host:port`` of an http(s) URL (lower case, default ports written out), or
    None for anything else. What the allow-list patterns are matched against."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except (ValueError, AttributeError):
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return None
    port = port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{parts.hostname.lower()}:{port}"


def label_studio_allowed(settings, url: str | None) -> bool:
    """Whether the operator lets semlabel talk to (and send a token to) the Label Studio at
    ``url``: ``LABEL_STUDIO_URL`` itself, or one of ``auth.allowed_label_studio_urls``."""
    target = normalise_url(url) if isinstance(url, str) else None
    if target is None:
        return False
    if settings.label_studio_url:
        return normalise_url(settings.label_studio_url) == target
    return any(fnmatch.fnmatchcase(target, pattern.strip().lower().rstrip("/"))
               for pattern in settings.auth.allowed_label_studio_urls)


def choose_label_studio(settings, setup: tuple[str | None, str | None] | None) -> tuple[str | None, str | None]:
    """The (URL, token) to use for a project, given what its ``/setup`` said.

    The URL is the operator's: ``LABEL_STUDIO_URL``, else the ``/setup`` address when it is
    in ``auth.allowed_label_studio_urls``, else none (no Label Studio is contacted). The token
    is ``LABEL_STUDIO_API_KEY``, else the one ``/setup`` sent with that same address; it is
    only ever sent to the chosen URL."""
    setup_url, setup_token = setup or (None, None)
    if setup_url and not label_studio_allowed(settings, setup_url):
        setup_url = setup_token = None
    url = settings.label_studio_url or setup_url
    if not url:
        return None, None
    token = settings.label_studio_api_key or setup_token
    return url, token


class LabelStudioConnection:
    """URL + token of one Label Studio instance, with an SDK client made on first use."""

    def __init__(self, url: str, api_key: str | None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"Label Studio URL must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.api_key = api_key or None
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never print the token
        return f"LabelStudioConnection({self.url!r}, token={'set' if self.api_key else 'unset'})"

    def same_as(self, url: str | None, api_key: str | None) -> bool:
        return bool(url) and url.rstrip("/") == self.url and (api_key or None) == self.api_key

    @cached_property
    def client(self):
        """A ``label_studio_sdk.LabelStudio`` client (token refresh included)."""
        from label_studio_sdk.client import LabelStudio

        if not self.api_key:
            raise ValueError("no Label Studio API key configured (LABEL_STUDIO_API_KEY or /setup)")
        return LabelStudio(base_url=self.url, api_key=self.api_key)

    def access_token(self) -> str:
        """The token to send now: the legacy key itself, or a fresh JWT access token."""
        with self._lock:  # the SDK refreshes under its own lock; this guards client creation
            return self.client._client_wrapper._tokens_client.api_key

    def auth_headers(self) -> dict[str, str]:
        header = self.client._client_wrapper.get_headers()["Authorization"]
        return {"Authorization": header}
