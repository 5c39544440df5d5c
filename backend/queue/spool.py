"""Nothing lost when Redis blinks: webhook events wait in a local disk spool and are replayed.

Label Studio waits one second for a webhook's answer and never sends it again.
:class:`EventRecorder` writes an event straight to Redis through a client that gives up after
``redis.webhook_timeout_s`` per command (no retries) and ``redis.webhook_deadline_s`` for the
whole write; when Redis does not answer in time — or when the
spool already holds entries, so that nothing overtakes them — the validated event goes to the
spool instead and the webhook is answered ``202``:

- ``<data_dir>/spool/spool.sqlite`` (directory 0700, file 0600), one row per webhook, appended
  in a transaction committed with ``synchronous=FULL`` (fsync'd before the answer);
- bounded: ``redis.spool.max_entries`` rows and ``redis.spool.max_mb`` of JSON; a full spool
  refuses (:class:`SpoolFull`, the route answers 503);
- a background thread replays the rows in order (``seq``) once Redis answers, each through
  :func:`~.eventlog.record_webhook` — one Redis transaction — and deletes it. Events carry
  their identity and the event log skips identities it holds, so a row replayed twice (a crash
  between the Redis write and the delete) is stored once;
- every process of the machine shares the spool (sqlite locking) and one replays at a time
  (an ``flock``), so the order in Redis is the order of the spool.

``/setup`` records (Label Studio's address and a reference to its token, see
:mod:`backend.ls.setup_record`) take the same path, so one made while Redis was down is written when
it returns.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Callable, Iterator

import redis as _redis

from ..errors import SemlabelError
from .eventlog import WebhookResult, record_webhook
from .webhook import WebhookEvent
from ..redis.connection import fast_client
from ..settings import Settings, get_settings

log = logging.getLogger(__name__)

DB_NAME = "spool.sqlite"
_UNREACHABLE = (_redis.ConnectionError, _redis.TimeoutError, OSError)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    size INTEGER NOT NULL,
    ts REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS dead (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    ts REAL NOT NULL,
    error TEXT NOT NULL
);
"""


class SpoolFull(SemlabelError):
    """The disk spool holds its maximum; the event could not be kept."""


class Spool:
    """An ordered, durable, bounded queue of JSON entries in one sqlite file (see the module
    doc). Safe across threads (one connection per thread) and processes (sqlite locking)."""

    def __init__(self, directory: str | Path, *, max_entries: int, max_bytes: int, max_attempts: int,
                 sqlite_timeout_s: float):
        self.dir = Path(directory)
        self.path = self.dir / DB_NAME
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_attempts = max_attempts
        self.sqlite_timeout_s = sqlite_timeout_s
        self._local = threading.local()

    @classmethod
    def from_settings(cls, settings: Settings) -> "Spool":
        sp = settings.redis.spool
        return cls(settings.spool_path, max_entries=sp.max_entries, max_bytes=int(sp.max_mb * 2**20),
                   max_attempts=sp.max_replay_attempts, sqlite_timeout_s=sp.sqlite_timeout_s)

    def _db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        self.dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # a mounted volume this user does not own
            os.chmod(self.dir, 0o700)
        if not self.path.exists():  # sqlite gives its -wal / -shm files the mode of this one
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self.path, timeout=self.sqlite_timeout_s, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a committed append survives a power cut
        conn.executescript(_SCHEMA)
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def append(self, kind: str, body: dict) -> int:
        """Append one entry (fsync'd when this returns); its sequence number."""
        text = json.dumps(body, separators=(",", ":"), default=str)
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            count, size = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM spool").fetchone()
            if count >= self.max_entries or size + len(text) > self.max_bytes:
                raise SpoolFull(f"the disk spool is full ({count} entries, {size / 2**20:.1f} MB)")
            seq = db.execute("INSERT INTO spool (kind, body, size, ts) VALUES (?, ?, ?, ?)",
                             (kind, text, len(text), time.time())).lastrowid
            db.execute("COMMIT")
            return int(seq)
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def empty(self) -> bool:
        if not self.path.exists():
            return True
        return self._db().execute("SELECT 1 FROM spool LIMIT 1").fetchone() is None

    def head(self, n: int) -> list[tuple[int, str, dict, int]]:
        """The ``n`` oldest entries: ``(seq, kind, body, attempts)``."""
        rows = self._db().execute("SELECT seq, kind, body, attempts FROM spool ORDER BY seq LIMIT ?", (n,))
        return [(int(seq), kind, json.loads(body), int(attempts)) for seq, kind, body, attempts in rows]

    def remove_upto(self, seq: int) -> None:
        """Delete the entries up to ``seq`` (those replayed, in order): one fsync for a batch."""
        self._db().execute("DELETE FROM spool WHERE seq <= ?", (seq,))

    def failed(self, seq: int, error: str) -> bool:
        """Count a failed replay of ``seq`` (Redis answered, but with an error); after
        ``max_attempts`` the entry moves to the ``dead`` table so it no longer blocks the
        ones behind it. True when it moved."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("UPDATE spool SET attempts = attempts + 1 WHERE seq = ?", (seq,))
            row = db.execute("SELECT kind, body, ts, attempts FROM spool WHERE seq = ?", (seq,)).fetchone()
            moved = row is not None and row[3] >= self.max_attempts
            if moved:
                db.execute("INSERT OR REPLACE INTO dead (seq, kind, body, ts, error) VALUES (?, ?, ?, ?, ?)",
                           (seq, row[0], row[1], row[2], error[:500]))
                db.execute("DELETE FROM spool WHERE seq = ?", (seq,))
            db.execute("COMMIT")
            return moved
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def stats(self) -> dict:
        if not self.path.exists():
            return {"entries": 0, "bytes": 0, "oldest_age_s": None, "dead": 0}
        db = self._db()
        count, size, oldest = db.execute("SELECT count(*), coalesce(sum(size), 0), min(ts) FROM spool").fetchone()
        dead = db.execute("SELECT count(*) FROM dead").fetchone()[0]
        return {"entries": int(count), "bytes": int(size),
                "oldest_age_s": round(time.time() - oldest, 3) if oldest else None, "dead": int(dead)}

    @contextlib.contextmanager
    def replaying(self) -> Iterator[bool]:
        """True inside when this process holds the machine's replay lock (non-blocking)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "replay.lock", "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local = threading.local()


class EventRecorder:
    """Webhook events (and ``/setup`` records) to Redis within the webhook's deadline, or to
    the disk spool and later to Redis, in order, once (see the module doc).

    ``client()`` returns the process's Redis client or ``None`` while none answers."""

    def __init__(self, settings: Settings | None, client: Callable[[], Any], *, start: bool = True):
        self.settings = settings or get_settings()
        self._client = client
        self.spool = Spool.from_settings(self.settings)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_pid: int | None = None
        self._thread_lock = threading.Lock()
        self._start = start
        self._writers = ThreadPoolExecutor(max_workers=self.settings.redis.spool.writer_threads,
                                           thread_name_prefix="semlabel-webhook-write")
        self.replayed = 0
        self.spooled = 0
        self.drained_at: float | None = None  # perf_counter() when a replay last emptied the spool
        self._last_note = 0.0
        if start and not self.spool.empty():
            self._ensure_replayer()

    # -- writing -----------------------------------------------------------------------
    def record(self, event: WebhookEvent) -> WebhookResult:
        """Store one parsed webhook (its events and review jobs): in Redis when it answers in
        time and nothing waits in the spool, else in the spool (``spooled``). Raises
        :class:`SpoolFull` (nothing stored)."""
        if event.project is None:
            return record_webhook(None, event, self.settings)
        fast, why = self._direct()
        if fast is not None:
            # One webhook is several round trips; the whole write has a deadline too. A write
            # that finishes after it is harmless: the spooled copy has the same identity.
            future = self._writers.submit(record_webhook, fast, event, self.settings)
            try:
                return future.result(timeout=self.settings.redis.webhook_deadline_s)
            except FutureTimeout:
                why = f"Redis did not answer within {self.settings.redis.webhook_deadline_s} s"
            except _redis.RedisError as exc:
                why = f"Redis did not answer in {self.settings.redis.webhook_timeout_s} s ({type(exc).__name__})"
        self._append("webhook", {"parsed": event.model_dump()}, why)
        return WebhookResult(event.action, event.project, stored=len(event.events), spooled=True,
                             reason=f"{len(event.events)} event(s) kept in the disk spool until Redis answers")

    def record_hash(self, key: str, mapping: dict[str, str]) -> bool:
        """``HSET key mapping`` now, or through the spool; True when it is in Redis already."""
        fast, why = self._direct()
        if fast is not None:
            try:
                fast.hset(key, mapping=mapping)
                return True
            except _redis.RedisError as exc:
                why = f"Redis did not answer ({type(exc).__name__})"
        self._append("hset", {"key": key, "mapping": mapping}, why)
        return False

    def _direct(self):
        """``(fast client, None)`` when a write may go straight to Redis, else ``(None, why)``."""
        if not self.spool.empty():
            return None, "earlier events wait in the disk spool"
        client = self._client()
        if client is None:
            return None, "no Redis answers"
        return fast_client(client, self.settings.redis.webhook_timeout_s), None

    def _append(self, kind: str, body: dict, why: str) -> int:
        seq = self.spool.append(kind, body)
        self.spooled += 1
        now = time.monotonic()
        if now - self._last_note > self.settings.redis.spool.note_interval_s:  # not one line per webhook
            self._last_note = now
            log.warning("Redis unavailable (%s): keeping events in the disk spool %s (%d waiting)",
                        why, self.spool.path, self.spool.stats()["entries"])
        self._ensure_replayer()
        self._wake.set()
        return seq

    # -- replaying ---------------------------------------------------------------------
    def replay(self) -> int:
        """Write spooled entries to Redis, oldest first, until the spool is empty or Redis
        fails; how many were written. A no-op while another process of the machine replays."""
        client = self._client()
        if client is None or self.spool.empty():
            return 0
        # No retries with backoff inside a command: this loop retries every `retry_s`, so the
        # replay starts as soon as Redis is back.
        client = fast_client(client, self.settings.redis.socket_timeout_s)
        done = 0
        batch = self.settings.redis.spool.batch
        with self.spool.replaying() as mine:
            if not mine:
                return 0
            while True:
                rows = self.spool.head(batch)
                if not rows:
                    break
                last = None  # the entries up to here are in Redis (deleted per batch: a crash
                try:         # before the delete replays them again, which stores nothing twice)
                    for seq, kind, body, _attempts in rows:
                        try:
                            self._apply(client, kind, body)
                        except _UNREACHABLE as exc:
                            log.info("spool replay paused: Redis not answering (%s)", type(exc).__name__)
                            return done
                        except Exception as exc:  # noqa: BLE001 - Redis answered with an error
                            error = f"{type(exc).__name__}: {str(exc)[:300]}"
                            if not self.spool.failed(seq, error):
                                log.warning("spool entry %d not replayed yet (%s)", seq, error)
                                return done
                            log.error("spool entry %d set aside after repeated failures (%s)", seq, error)
                        else:
                            done += 1
                            self.replayed += 1
                        last = seq
                finally:
                    if last is not None:
                        self.spool.remove_upto(last)
        if done:
            self.drained_at = time.perf_counter()
            log.warning("replayed %d spooled event(s) into Redis", done)
        return done

    def _apply(self, client, kind: str, body: dict) -> None:
        if kind == "webhook":
            # "also": the review jobs of an entry an older version spooled.
            record_webhook(client, WebhookEvent.model_validate(body["parsed"]), self.settings,
                           also=[tuple(a) for a in body.get("also") or ()])
        elif kind == "hset":
            client.hset(body["key"], mapping=body["mapping"])
        else:
            raise ValueError(f"unknown spool entry kind {kind!r}")

    def _ensure_replayer(self) -> None:
        if not self._start:
            return
        with self._thread_lock:
            alive = self._thread is not None and self._thread.is_alive() and self._thread_pid == os.getpid()
            if alive or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._run, name="semlabel-spool-replay", daemon=True)
            self._thread_pid = os.getpid()
            self._thread.start()

    def _run(self) -> None:
        retry = self.settings.redis.spool.retry_s
        while not self._stop.is_set():
            try:
                self.replay()
                if self.spool.empty():
                    self._wake.wait(retry * 20)  # idle: a new spool entry wakes it at once
                else:
                    self._wake.wait(retry)
            except Exception:  # noqa: BLE001 - the replayer must survive anything
                log.exception("spool replay failed")
                self._stop.wait(retry)
            self._wake.clear()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._writers.shutdown(wait=False)
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and self._thread_pid == os.getpid():
            thread.join(timeout=5)
        self.spool.close()
