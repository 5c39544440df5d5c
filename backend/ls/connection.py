"""The Label Studio instance a backend talks to: its URL and a token, handled by the SDK.

Both token kinds work: a legacy API token (sent as ``Token <key>``) and a personal access
token, which is a JWT *refresh* token that label-studio-sdk exchanges for short-lived access
tokens (sent as ``Bearer <access>``) and refreshes when they expire.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
from functools import cached_property
from typing import Callable
from urllib.parse import urlsplit

from ..redis.keys import keys_for
from .setup_record import read_setup, setup_record

log = logging.getLogger(__name__)


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


class Connections:
    """The Label Studio of each project, for this process: what ``/setup`` said (kept here and,
    through ``events`` — Redis, else the disk spool — for every process of the backend) and one
    :class:`LabelStudioConnection` per (URL, token).

    Args:
        settings: the backend's settings (``LABEL_STUDIO_URL``/``LABEL_STUDIO_API_KEY`` win).
        events: the :class:`~backend.spool.EventRecorder` that persists ``/setup`` records.
        redis: returns the Redis client or None (read when a project's setup is unknown here).
    """

    def __init__(self, settings, events, redis: Callable):
        self.settings = settings
        self.events = events
        self._redis = redis
        self._setup: dict[str, tuple[str | None, str | None]] = {}
        self._connections: dict[tuple[str, str | None], LabelStudioConnection] = {}
        self._lock = threading.Lock()

    def remember_setup(self, project: str | None, hostname: str | None, token: str | None) -> None:
        """Keep what ``/setup`` said about Label Studio (host, the project creator's token), in
        this process and in Redis so every process of the backend can use it."""
        if project is None:
            return
        hostname = hostname.strip().rstrip("/") if isinstance(hostname, str) and hostname.strip() else None
        token = token.strip() if isinstance(token, str) and token.strip() else None
        if (hostname is None and token is None) or self._setup.get(project) == (hostname, token):
            return
        self._setup[project] = (hostname, token)
        try:  # Redis gets a reference to the token, never the token (backend/ls/setup_record.py)
            self.events.record_hash(keys_for(self.settings).setup(project), setup_record(hostname, token, self.settings))
        except Exception as exc:  # noqa: BLE001 - the in-process copy still works
            log.warning("project %s: could not record the Label Studio host (%s)", project, exc)

    def _recorded_setup(self, project: str) -> tuple[str | None, str | None] | None:
        setup = self._setup.get(project)
        redis = self._redis() if setup is None else None
        if redis is not None:
            try:
                setup = read_setup(redis, project, self.settings)
            except Exception:  # noqa: BLE001 - Redis away: no recorded setup
                setup = None
            if setup is not None:
                self._setup[project] = setup
        return setup

    def get(self, project: str | None) -> LabelStudioConnection | None:
        """The Label Studio to fetch images from and store predictions in: ``LABEL_STUDIO_URL`` /
        ``LABEL_STUDIO_API_KEY`` when set, else what ``/setup`` sent for the project."""
        url, token = self.settings.label_studio_url, self.settings.label_studio_api_key
        setup = self._recorded_setup(project) if (not url or not token) and project is not None else None
        url, token = choose_label_studio(self.settings, setup)  # the operator's address only
        if not url:
            return None
        with self._lock:
            conn = self._connections.get((url, token))
            if conn is None:
                try:
                    conn = LabelStudioConnection(url, token)
                except ValueError as exc:  # e.g. LABEL_STUDIO_URL without a scheme
                    log.error("project %s: no Label Studio connection: %s", project, exc)
                    return None
                self._connections[(url, token)] = conn
            return conn
