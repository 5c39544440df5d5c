"""Ids of the model store: version ids and project ids.

Version ids (``v20260314T101502123456Z-3fa9c1``) sort by creation time and carry a random
suffix, so workers on different machines never collide. A project id names a directory, so it
is checked against a conservative pattern before any path is built from it.
"""

from __future__ import annotations

import datetime as _dt
import re
import secrets
import time

from ..errors import ModelStoreError

VERSION_RE = re.compile(r"^v\d{8}T\d{12}Z-[0-9a-f]{6}$")
PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def new_version_id(now: float | None = None) -> str:
    """``v<UTC yyyymmddTHHMMSSffffff>Z-<6 hex>``: sorts by time, unique across machines."""
    t = _dt.datetime.fromtimestamp(now if now is not None else time.time(), tz=_dt.timezone.utc)
    return f"v{t:%Y%m%dT%H%M%S%f}Z-{secrets.token_hex(3)}"


def is_version_id(value: str) -> bool:
    return bool(VERSION_RE.match(value or ""))


def check_version(version: str) -> str:
    """``version`` itself; :class:`ModelStoreError` when it is not a version id."""
    if not is_version_id(version):
        raise ModelStoreError(f"invalid version id {version!r}")
    return version


def check_project(project: str | int) -> str:
    """The project id as the directory name it is; :class:`ModelStoreError` when it is not one."""
    name = str(project)
    if not PROJECT_RE.match(name):
        raise ModelStoreError(f"invalid project id {name!r}")
    return name
