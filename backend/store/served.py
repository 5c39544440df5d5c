"""ServedModels: the predictor each project is served with in this process, swapped hot.

New versions are noticed two ways: a message on the store's Redis channel
(:data:`~.pointer.MODELS_CHANNEL`) names the project whose pointer moved, and only that
project is checked; a message naming none, a (re)connection to Redis (messages may have been
missed meanwhile) and the poll every ``poll_interval_s`` check every watched project. Checking
a project costs one ``stat`` of its pointer file; only a changed pointer loads anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from ..errors import CorruptVersion
from .manifest import file_digest
from .versions import ModelStore

log = logging.getLogger(__name__)

Loader = Callable[[Path, Any], Any]


def default_loader(model_dir: Path, runtime) -> Any:
    """:func:`backend.model.load_predictor` of a version :class:`ServedModels` has just
    verified: the weights' SHA-256 comes from the manifest, so they are not hashed again."""
    from ..model.checkpoint import WEIGHTS
    from ..model.serving import load_predictor

    return load_predictor(model_dir, runtime, weights_sha256=file_digest(model_dir, WEIGHTS))


def announced_project(message: dict) -> str | None:
    """The project a message on the models channel names (None: none, or not readable)."""
    try:
        project = json.loads(message.get("data") or b"").get("project")
    except (AttributeError, TypeError, ValueError):
        return None
    return str(project) if project is not None else None


class ServedModels:
    """The predictor each project is served with in this process, kept current.

    ``get(project)`` returns the loaded predictor of the project's current version, or the
    zero-shot predictor while it has none. New versions are loaded off the request path and
    swapped in with one assignment, so requests in flight finish with the object they hold. A
    version whose files fail their checks or whose loader raises is refused: logged, recorded
    in the store (``semlabel models status``) and the previous predictor stays served.
    """

    def __init__(
        self,
        store: ModelStore,
        runtime,
        loader: Loader | None = None,
        redis=None,
        *,
        poll_interval_s: float,
        max_projects: int,
        idle_s: float,
        max_backoff_s: float,
        fallback=None,
        start: bool = True,
    ):
        self.store = store
        self.runtime = runtime
        self.loader = loader or default_loader
        self.redis = redis if redis is not None else store.redis
        self.poll_interval_s = poll_interval_s
        self._fallback = fallback
        self._served: dict[str, Any] = {}      # project -> predictor
        self._versions: dict[str, str | None] = {}  # project -> served store version
        self._seen: dict[str, tuple | None] = {}    # project -> pointer stamp last acted on
        # project -> when it was last asked for, least recent first. The watcher polls these
        # only: at most `max_projects`, each forgotten `idle_s` after its last request (any
        # id a request names would otherwise be polled every few seconds for ever).
        self._asked: OrderedDict[str, float] = OrderedDict()
        self.max_projects = max_projects
        self.idle_s = idle_s
        self.max_backoff_s = max_backoff_s  # the longest wait between attempts to reach Redis again
        self._due: set[str] = set()  # watched projects a notification named since the last check
        self._due_all = False         # a notification named none, or notifications (re)started
        self._lock = threading.RLock()
        self._load_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pubsub = None
        self.loads = 0
        self.refused = 0
        if start:
            self.start()

    @classmethod
    def from_settings(cls, store: ModelStore, runtime, loader: Loader | None = None, redis=None, *,
                      settings=None, **changes) -> "ServedModels":
        """Served models watched as the settings' ``store`` section says (``poll_interval_s``,
        ``max_watched_projects``, ``watch_idle_s``, ``max_backoff_s``); ``changes`` override
        keyword arguments (``fallback``, ``start``, a test's shorter poll interval)."""
        from ..settings import get_settings

        st = (settings or get_settings()).store
        options = dict(poll_interval_s=st.poll_interval_s, max_projects=st.max_watched_projects,
                       idle_s=st.watch_idle_s, max_backoff_s=st.max_backoff_s)
        return cls(store, runtime, loader, redis, **{**options, **changes})

    # -- public ------------------------------------------------------------------------
    def get(self, project: str | int):
        """The predictor to use now for ``project`` (never blocks on a reload in progress,
        except the very first request of a project, which loads its current version)."""
        key = str(project)
        with self._lock:
            predictor = self._served.get(key)
            known = key in self._seen
            self._asked[key] = time.monotonic()
            self._asked.move_to_end(key)
            while len(self._asked) > self.max_projects:
                self._forget(next(iter(self._asked)))
        if predictor is not None:
            return predictor
        if not known:  # first request for this project in this process: load its version now
            self._refresh(key)
        with self._lock:
            return self._served.get(key) or self.fallback

    def served_version(self, project: str | int) -> str | None:
        """The store version served for ``project`` (``None``: zero-shot)."""
        with self._lock:
            return self._versions.get(str(project))

    def served_versions(self) -> dict[str, str | None]:
        """Project → version string of the predictor served now (None: the fallback), for
        the projects this process has been asked about. Loads nothing."""
        with self._lock:
            return {key: getattr(self._served.get(key), "version", None) for key in self._seen}

    @property
    def fallback(self):
        if self._fallback is None:
            self._fallback = self.runtime.zero_shot_predictor()
        return self._fallback

    def start(self) -> None:
        if self._threads:
            return
        poller = threading.Thread(target=self._poll_loop, name="semlabel-model-poll", daemon=True)
        poller.start()
        self._threads.append(poller)
        if self.redis is not None:
            listener = threading.Thread(target=self._listen_loop, name="semlabel-model-pubsub", daemon=True)
            listener.start()
            self._threads.append(listener)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        pubsub = self._pubsub
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    # -- watching ----------------------------------------------------------------------
    def _known(self) -> list[str]:
        with self._lock:
            return list(self._seen)

    def _forget(self, key: str) -> None:
        """Stop watching ``key`` (caller holds ``_lock``); its next request loads it again."""
        self._asked.pop(key, None)
        self._seen.pop(key, None)
        self._served.pop(key, None)
        self._versions.pop(key, None)
        self._due.discard(key)

    def _forget_idle(self) -> None:
        cutoff = time.monotonic() - self.idle_s
        with self._lock:
            while self._asked and next(iter(self._asked.values())) < cutoff:
                self._forget(next(iter(self._asked)))

    def _announce(self, project: str | None) -> None:
        """Have the poller check ``project`` now (None: every watched project). A project this
        process does not watch is left alone: its first request loads its current version."""
        with self._lock:
            if project is None:
                self._due_all = True
            elif project in self._seen:
                self._due.add(project)
            else:
                return
        self._wake.set()

    def _take_due(self, poll_due: bool) -> list[str]:
        """The projects to check now: those announced, or every watched one."""
        with self._lock:
            due, everything = self._due, self._due_all or poll_due
            self._due, self._due_all = set(), False
        return self._known() if everything else sorted(due)

    # -- loading -----------------------------------------------------------------------
    def _refresh(self, key: str) -> None:
        with self._load_lock:  # one load at a time per process; requests never wait on it
            stamp = self.store.pointer_stamp(key)
            with self._lock:
                if key in self._seen and self._seen[key] == stamp:
                    return
            record = self.store.pointer(key)
            target = record["version"] if record else None
            with self._lock:
                served = self._versions.get(key)
            if target is None or target == served:
                with self._lock:
                    self._asked.setdefault(key, time.monotonic())
                    self._seen[key] = stamp
                    self._versions.setdefault(key, served)
                return
            predictor = self._load(key, target)
            if predictor is None and key not in self._served:
                # First load of this process: serve the newest earlier version that loads.
                for candidate in record.get("previous") or []:
                    predictor = self._load(key, candidate, note=f"instead of refused {target}")
                    if predictor is not None:
                        target = candidate
                        break
            with self._lock:
                self._asked.setdefault(key, time.monotonic())  # every watched project is bounded
                self._seen[key] = stamp
                if predictor is not None:
                    self._served[key] = predictor  # the swap: one assignment
                    self._versions[key] = target
                else:
                    self._versions.setdefault(key, None)

    def _load(self, key: str, version: str, note: str = ""):
        try:
            self.store.verify(key, version)
            predictor = self.loader(self.store.version_dir(key, version), self.runtime)
            if predictor is None:
                raise CorruptVersion("the loader returned nothing")
            if version not in str(getattr(predictor, "version", "") or ""):
                # Label Studio shows this string: it names the store version and the backbone.
                backbone = getattr(getattr(self.runtime, "backbone", None), "name", None)
                predictor.version = f"{version}@{backbone}" if backbone else version
        except Exception as exc:  # noqa: BLE001 - any failure refuses the version
            reason = f"{type(exc).__name__}: {exc}"
            log.error("project %s: refusing version %s (%s); keeping %s", key, version, reason,
                      self._versions.get(key) or "zero-shot")
            self.refused += 1
            with contextlib.suppress(Exception):
                self.store.record_refusal(key, version, reason)
            return None
        self.loads += 1
        log.warning("project %s: now serving version %s%s", key, version, f" ({note})" if note else "")
        return predictor

    # -- threads -----------------------------------------------------------------------
    def _poll_loop(self) -> None:
        next_poll = time.monotonic() + self.poll_interval_s
        while not self._stop.is_set():
            self._wake.wait(max(0.0, next_poll - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                break
            self._forget_idle()
            poll_due = time.monotonic() >= next_poll
            if poll_due:
                next_poll = time.monotonic() + self.poll_interval_s
            for key in self._take_due(poll_due):
                try:
                    self._refresh(key)
                except Exception:  # noqa: BLE001 - the watcher must survive anything
                    log.exception("project %s: checking for a new model version failed", key)

    def _listen_loop(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.store.channel)
                # redis-py reconnects and resubscribes by itself after a dropped connection:
                # hear of that too, since what was announced meanwhile went unheard.
                pubsub.connection.register_connect_callback(self._on_reconnect)
                delay = 1.0
                self._announce(None)  # what was announced before we listened went unheard
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        self._announce(announced_project(message))
            except Exception as exc:  # noqa: BLE001 - Redis may come and go; polling goes on
                if self._stop.is_set():
                    break
                log.warning("model-version notifications from Redis interrupted (%s); retrying in %.0f s",
                            exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self.max_backoff_s)
            finally:
                self._pubsub = None
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.connection.deregister_connect_callback(self._on_reconnect)
                    with contextlib.suppress(Exception):
                        pubsub.close()

    def _on_reconnect(self, connection) -> None:
        self._announce(None)
