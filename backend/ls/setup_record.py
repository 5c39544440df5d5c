"""What ``/setup`` told about Label Studio, shared by the backend's processes through Redis,
without the token in it.

Redis holds ``<prefix>:ls:<project>`` = ``{"url", "token_ref"}``; the token itself stays on this
machine, in ``<data_dir>/secrets/ls-token-<token_ref>`` (mode 0600, directory 0700).
``token_ref`` is the first 32 hex digits of the token's SHA-256: it names the token without
revealing it, so reading Redis (or a dump of it) gives nobody Label Studio access. A process
on another machine cannot resolve the reference; it uses ``LABEL_STUDIO_API_KEY`` or the
``/setup`` it received itself. A record written by an older version with a plain ``token``
field is converted on first read.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

from ..redis.connection import write_private
from ..redis.keys import keys_for
from ..settings import Settings, get_settings

log = logging.getLogger(__name__)


def token_ref(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def _secrets_dir(settings: Settings) -> Path:
    path = settings.data_path / "secrets"
    path.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # a mounted volume this user does not own
        os.chmod(path, 0o700)
    return path


def save_token(token: str, settings: Settings | None = None) -> str:
    """Keep ``token`` on this machine (0600); its reference."""
    settings = settings or get_settings()
    ref = token_ref(token)
    path = _secrets_dir(settings) / f"ls-token-{ref}"
    if not path.exists():
        write_private(path, token)
    return ref


def load_token(ref: str, settings: Settings | None = None) -> str | None:
    """The token a reference names, when this machine has it."""
    settings = settings or get_settings()
    if not ref or not all(c in "0123456789abcdef" for c in ref):
        return None
    try:
        return (settings.data_path / "secrets" / f"ls-token-{ref}").read_text() or None
    except OSError:
        return None


def setup_record(url: str | None, token: str | None, settings: Settings | None = None) -> dict[str, str]:
    """The Redis hash of a ``/setup`` (the token saved locally, only its reference in it)."""
    return {"url": url or "", "token_ref": save_token(token, settings) if token else ""}


def read_setup(redis, project: str, settings: Settings | None = None) -> tuple[str | None, str | None] | None:
    """``(url, token)`` recorded for ``project`` (token ``None`` when this machine does not
    hold it), or ``None`` when nothing is recorded."""
    settings = settings or get_settings()
    key = keys_for(settings).setup(project)
    raw = {k.decode(): v.decode() for k, v in redis.hgetall(key).items()}
    if not raw:
        return None
    if raw.get("token"):  # written in plain text by an older version: keep a reference instead
        ref = save_token(raw["token"], settings)
        pipe = redis.pipeline(transaction=True)
        pipe.hset(key, "token_ref", ref)
        pipe.hdel(key, "token")
        pipe.execute()
        raw["token_ref"] = ref
        log.warning("project %s: replaced the Label Studio token kept in Redis by a reference", project)
    return raw.get("url") or None, load_token(raw.get("token_ref", ""), settings)
