"""The Label Studio instance a backend talks to: its URL and a token, handled by the SDK.

Both token kinds work: a legacy API token (sent as ``Token <key>``) and a personal access
token, which is a JWT *refresh* token that label-studio-sdk exchanges for short-lived access
tokens (sent as ``Bearer <access>``) and refreshes when they expire.
"""

from __future__ import annotations

import threading
from functools import cached_property


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
