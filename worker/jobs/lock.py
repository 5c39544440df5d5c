"""One training per project at a time across all workers.

A redis-py :class:`~redis.lock.Lock` on ``<prefix>:training:<project>`` whose token is a
JSON record of the holder (job id, host, pid, since), renewed by a thread while the job
runs. A retry of the same job (its earlier attempt's worker died holding the lock) takes it
over; anyone else waits for it to be released or to expire.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time

from redis.exceptions import LockError

log = logging.getLogger(__name__)


class ProjectLock:
    """The project's training lock, held by ``job_id`` for ``ttl_s`` at a time."""

    def __init__(self, redis, key: str, job_id: str, ttl_s: float):
        self.redis = redis
        self.key = key
        self.job_id = job_id
        self.ttl_s = float(ttl_s)
        self.value = json.dumps({"job": job_id, "host": socket.gethostname(), "pid": os.getpid(),
                                 "since": time.time(), "token": secrets.token_hex(8)})
        self.lost = False
        self._lock = redis.lock(key, timeout=self.ttl_s, blocking=False, thread_local=False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict | None:
        raw = self.redis.get(self.key)
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return {"job": raw.decode(errors="replace")}

    def acquire(self) -> bool:
        """Take the lock when it is free, or take over the one an earlier attempt of this
        job holds (renewed under that attempt's token, which only succeeds while it is
        still the holder)."""
        for _ in range(2):  # the earlier attempt's lock may expire between the two steps
            if self._lock.acquire(token=self.value):
                break
            raw = self.redis.get(self.key)
            held = self.holder() if raw else None
            if raw is None:
                continue
            if not isinstance(held, dict) or held.get("job") != self.job_id:
                return False
            self._lock.local.token = raw
            try:
                self._lock.reacquire()
            except LockError:
                continue
            log.warning("job %s: took over the training lock of its earlier attempt", self.job_id)
            break
        else:
            return False
        self._thread = threading.Thread(target=self._renew, name="semlabel-train-lock", daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._lock.reacquire()
            except LockError:
                self.lost = True
                log.error("job %s: lost the training lock %s", self.job_id, self.key)
                return
            except Exception as exc:  # noqa: BLE001 - keep trying while Redis is away
                log.warning("job %s: could not renew the training lock: %s", self.job_id, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self._lock.release()
