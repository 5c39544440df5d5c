"""Who may call the backend's routes: basic auth (``BASIC_AUTH_USER``/``BASIC_AUTH_PASS``, both
or neither) or the URL secret (``auth.url_secret``, checked by :class:`.guard.RequestGuard`),
on every route but ``/health``, ``/webhook`` included (see :mod:`.webhooks` for how Label
Studio's webhook gets the header)."""

from __future__ import annotations

import base64
import hmac

from flask import jsonify, request

from ..errors import ConfigError
from . import guard
from .webhooks import WebhookAuth, count

OPEN_PATHS = {"/health", "/"}


def _check_auth_settings(settings) -> None:
    """Half-set credentials are an error, not silently no authentication."""
    user, password = settings.basic_auth_user, settings.basic_auth_pass
    if bool(user) != bool(password):
        given, missing = ("BASIC_AUTH_USER", "BASIC_AUTH_PASS") if user else ("BASIC_AUTH_PASS", "BASIC_AUTH_USER")
        raise ConfigError(f"{given} is set but {missing} is not: set both (basic auth on) or neither")


def auth_configured(settings) -> bool:
    """Whether requests must authenticate (basic auth or the URL secret)."""
    _check_auth_settings(settings)
    return bool(settings.basic_auth_user and settings.basic_auth_pass) or bool(settings.auth.url_secret.strip("/"))


class Auth:
    """The credentials a request must carry (ConfigError for half-set ones)."""

    def __init__(self, settings):
        self.enabled = auth_configured(settings)
        user, password = settings.basic_auth_user, settings.basic_auth_pass
        self.expected: str | None = None
        #: sets this backend's header on the project's Label Studio webhook (basic auth only)
        self.webhook: WebhookAuth | None = None
        if user and password:
            self.expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            self.webhook = WebhookAuth(self.expected, settings.backend.label_studio_api)

    def refusal(self):
        """None when the current request may pass, else the 401 response (logged, rate-limited)."""
        if not self.enabled or request.path in OPEN_PATHS or request.environ.get(guard.URL_SECRET_OK):
            return None
        given = request.headers.get("Authorization", "")
        if self.expected is not None and hmac.compare_digest(given.encode(), self.expected.encode()):
            return None
        if request.path.rstrip("/") == "/webhook":
            count("?", "unauthorized")
            guard.refused.warn("webhook", "refused a webhook without this backend's credentials (from %s)",
                               request.remote_addr)
        else:
            guard.refused.warn("auth", "refused %s %s: missing or wrong credentials",
                               guard.clip(request.method, 10), guard.clip(request.path, 80))
        resp = jsonify({"error": "authentication required (basic auth or the URL secret)"})
        resp.status_code = 401
        resp.headers["WWW-Authenticate"] = 'Basic realm="semlabel"'
        return resp
