"""Which version of a project is current: the ``CURRENT`` pointer file, its Redis mirror and
the announcement of every change.

The pointer file (JSON, replaced atomically) is the truth: the backend starts without Redis
and polls it. With a Redis client, every change also sets the project's ``current`` key and publishes
``{"project", "version"}`` on the ``models`` channel (both named in :mod:`backend.redis.keys`), which
:class:`~backend.store.served.ServedModels` listens to. A failed announcement never undoes a
change.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

from .files import atomic_write_json, file_stamp, utc_iso
from ..redis.keys import Keys
from .ids import check_project

log = logging.getLogger(__name__)

POINTER = "CURRENT"


class Pointers:
    """The current-version pointers of the projects under ``root``; each remembers its newest
    ``previous_kept`` rollback targets (``store.previous_kept``)."""

    def __init__(self, root: Path, redis, key_prefix: str, previous_kept: int):
        self.root = root
        self.previous_kept = previous_kept
        self.redis = redis
        self.channel = Keys(key_prefix).models
        self.key_prefix = key_prefix

    def redis_key(self, project: str | int) -> str:
        return Keys(self.key_prefix).current(check_project(project))

    def path(self, project: str | int) -> Path:
        return self.root / check_project(project) / POINTER

    def read(self, project: str | int) -> dict | None:
        """The pointer record: ``version``, ``previous`` (rollback targets), ``updated_at``,
        ``reason``; ``None`` when the project has no current version."""
        try:
            with open(self.path(project), encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("unreadable pointer file %s: %s", self.path(project), exc)
            return None
        return data if isinstance(data, dict) and data.get("version") else None

    def stamp(self, project: str | int) -> tuple | None:
        """A cheap value that changes whenever the pointer file is replaced."""
        return file_stamp(self.path(project))

    def redis_current(self, project: str | int) -> str | None:
        if self.redis is None:
            return None
        value = self.redis.get(self.redis_key(project))
        return value.decode() if isinstance(value, bytes) else value

    def write(self, project: str, version: str, reason: str, previous: list[str] | None = None) -> dict | None:
        """Point ``project`` at ``version`` (the caller holds the project lock).
        ``previous`` (default: the old version first, then its own) are the rollback targets.
        Returns the old record; :meth:`notify` announces the change."""
        old = self.read(project)
        if previous is None:
            previous = []
            if old and old.get("version") and old["version"] != version:
                previous = [old["version"]] + [v for v in old.get("previous", []) if v != version]
        atomic_write_json(self.path(project), {
            "project": project, "version": version, "previous": previous[:self.previous_kept],
            "updated_at": utc_iso(), "reason": reason, "host": socket.gethostname(),
        })
        return old

    def notify(self, project: str | int, version: str | None) -> bool:
        """Mirror ``version`` into Redis and announce it; False when Redis is not reachable
        (the pointer file stays the truth and backends poll it)."""
        if self.redis is None:
            return False
        try:
            pipe = self.redis.pipeline(transaction=True)
            if version:
                pipe.set(self.redis_key(project), version)
            else:
                pipe.delete(self.redis_key(project))
            pipe.publish(self.channel, json.dumps({"project": str(project), "version": version}))
            pipe.execute()
            return True
        except Exception as exc:  # noqa: BLE001 - Redis down must not undo a publish
            log.warning("could not announce project %s version %s on Redis: %s", project, version, exc)
            return False
