"""The backend's per-process state: one :class:`BackendService` per process, shared by all
request threads.

It loads the backbone once (in a background thread, so ``/health`` answers at once), keeps the
served models current (the model store's watcher swaps new versions in; requests in flight
keep the object they hold) and names the version each project is served with. The concepts it
holds each live in their own module: parsed label configs (:class:`~.config.ConfigCache`), the
Label Studio of each project (:class:`~.connection.Connections`), the tasks' image features
(:class:`~.fetch.TaskImages`), the label spaces (:class:`~.spaces.LabelSpaces`) and the
predictions themselves (:class:`~.predict.Predictions`). One lock serialises the CPU/GPU work
(feature extraction and heads) while image downloads run in parallel.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..errors import RedisUnavailable
from ..settings import Settings, get_settings
from ..queue.spool import EventRecorder
from . import metrics, results
from .config import ConfigCache
from .connection import Connections
from .fetch import TaskImages
from .predict import Predictions
from .spaces import LabelSpaces

log = logging.getLogger(__name__)

_AUTO = object()


class NotReady(RuntimeError):
    """The model is still loading (or failed to load)."""


class BackendService:
    def __init__(
        self,
        settings: Settings | None = None,
        *,
        runtime=None,
        redis=_AUTO,
        served=None,
        background: bool = True,
        start_threads: bool = True,
    ):
        self.settings = settings or get_settings()
        self.cfg = self.settings.backend
        self.runtime = runtime
        self.served = served
        self.store = getattr(served, "store", None)
        self._ready = threading.Event()
        self._load_error: str | None = None
        compute = threading.Lock()
        self.configs = ConfigCache(self.cfg.reasons_textarea, self.cfg.max_label_configs, limits=self.settings.limits)
        self._bg = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semlabel-bg")
        self._bg_lock = threading.Lock()
        self._bg_pending = 0
        taxonomy = None
        if self.cfg.taxonomy:
            from ..labels import Taxonomy

            taxonomy = Taxonomy.from_yaml(self.cfg.taxonomy)
        self.spaces = LabelSpaces(lambda: self.runtime, self.cfg.max_label_spaces, taxonomy)
        self.images = TaskImages(self.settings, lambda: self.runtime, compute)
        self.predictions = Predictions(self, self.images, self.spaces, compute)
        self._redis_auto = redis is _AUTO
        self._redis = None if redis is _AUTO else redis
        self._redis_checked = 0.0
        self._redis_lock = threading.Lock()
        self.started_at = time.time()
        self.loaded_in_s: float | None = None
        self.review = None
        # project → (store history stamp, note of a trained-but-unserved version or None)
        self._unserved: dict[str, tuple[tuple | None, tuple[str, str] | None]] = {}
        self._unserved_lock = threading.Lock()
        self._start_threads = start_threads
        # Webhook events and /setup records: to Redis within the webhook's deadline, else to
        # the disk spool and replayed in order when Redis answers (backend/spool.py).
        self.events = EventRecorder(self.settings, lambda: self.redis, start=start_threads)
        self.connections = Connections(self.settings, self.events, lambda: self.redis)
        if self._redis_auto:
            self.redis  # first connection attempt now (logged when none answers)
        if runtime is not None and served is not None:
            self._finish_loading()
        elif background:
            threading.Thread(target=self._load, name="semlabel-load", daemon=True).start()
        else:
            self._load()

    # -- loading -----------------------------------------------------------------------
    def _load(self) -> None:
        started = time.perf_counter()
        try:
            if self.runtime is None:
                from ..runtime import Runtime

                self.runtime = Runtime.create(self.settings)
            if self.served is None:
                from ..store import ModelStore, ServedModels

                self.store = ModelStore.from_settings(self.settings, redis=self.redis)
                self.served = ServedModels.from_settings(self.store, self.runtime, redis=self.redis,
                                                         settings=self.settings)
            self.loaded_in_s = round(time.perf_counter() - started, 2)
            self._finish_loading()
            log.warning("backend ready in %.1f s: backbone %s, zero-shot version %s",
                        self.loaded_in_s, self.runtime.backbone.name, self.zero_shot_version)
        except Exception as exc:  # noqa: BLE001 - reported by /health and every request
            self._load_error = f"{type(exc).__name__}: {exc}"
            log.exception("backend failed to load the model")
            self._ready.set()

    def _finish_loading(self) -> None:
        self.store = getattr(self.served, "store", self.store)
        self.settings.data_path.mkdir(parents=True, exist_ok=True)
        (self.settings.data_path / "downloads").mkdir(parents=True, exist_ok=True)
        if self.cfg.review.enabled and self._start_threads:
            from .review import ReviewQueue

            self.review = ReviewQueue(self)
            self.review.start()
        self._ready.set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._load_error is None

    @property
    def load_error(self) -> str | None:
        return self._load_error

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        return self.ready

    def require_ready(self, timeout: float) -> None:
        if not self.wait_ready(timeout):
            if self._load_error:
                raise NotReady(f"the model failed to load: {self._load_error}")
            raise NotReady("the model is still loading; try again in a few seconds")

    def background(self, fn, *args) -> bool:
        """Run ``fn`` on a background thread (fire and forget; dropped while ``backend.max_background_loads`` are waiting)."""
        with self._bg_lock:
            if self._bg_pending >= self.cfg.max_background_loads:
                return False
            self._bg_pending += 1

        def run():
            try:
                fn(*args)
            finally:
                with self._bg_lock:
                    self._bg_pending -= 1

        self._bg.submit(run)
        return True

    def close(self) -> None:
        self.events.stop()
        if self.review is not None:
            self.review.stop()
        if self.served is not None and hasattr(self.served, "close"):
            self.served.close()
        self.images.close()
        self._bg.shutdown(wait=False)

    # -- redis -------------------------------------------------------------------------
    @property
    def redis(self):
        """The Redis client, or None while none answers. Never blocks a request: after the first
        attempt (at start), reconnecting runs in the background at most every ``redis.recheck_s``."""
        if self._redis is not None or not self._redis_auto:
            return self._redis
        with self._redis_lock:
            due = time.monotonic() - self._redis_checked > self.settings.redis.recheck_s
            first = self._redis_checked == 0.0
            if due:
                self._redis_checked = time.monotonic()
        if due and first:
            self._connect_redis()
        elif due:
            self.background(self._connect_redis)
        return self._redis

    def _connect_redis(self) -> None:
        from ..redis.connection import redis_client

        try:
            self._redis = redis_client(self.settings)
        except RedisUnavailable as exc:
            log.error("%s (webhooks answer 503 until it does)", exc)

    # -- models ------------------------------------------------------------------------
    @property
    def zero_shot_version(self) -> str:
        return self.served.fallback.version if self.served is not None else "loading"

    @property
    def backbone_name(self) -> str:
        return self.runtime.backbone.name if self.runtime is not None else "loading"

    def predictor(self, project: str | None):
        """The predictor serving ``project`` now (zero-shot when it has no trained version)."""
        predictor = self.served.get(project) if project is not None else self.served.fallback
        metrics.set_model(project or "-", predictor.version, self.backbone_name)
        return predictor

    def unserved_note(self, project: str | None, served_version: str) -> tuple[str, str] | None:
        """(tag, sentence) when the project's latest training is not what is served (the
        promotion gate kept the old version, or it failed to load); None otherwise. Read from
        the store's history, again only when the history changed."""
        if self.store is None or project is None:
            return None
        try:
            stamp = self.store.history_stamp(project)
            with self._unserved_lock:
                hit = self._unserved.get(project)
            if hit is not None and hit[0] == stamp:
                notice = hit[1]
            else:
                notice = self.store.unserved(project) if stamp is not None else None
                with self._unserved_lock:
                    self._unserved[project] = (stamp, notice)
        except Exception as exc:  # noqa: BLE001 - a note, never an error
            log.warning("project %s: cannot read the model history (%s)", project, exc)
            return None
        return results.unserved_note(notice, served_version) if notice else None

    def model_version(self, project: str | None, predictor=None) -> str:
        """The version Label Studio shows and tags predictions with: the served predictor's,
        plus why the latest training is not served when that is so. Label Studio re-asks for
        the predictions of tasks whose stored predictions carry another version, so a refused
        training also brings the explanation into every task's prediction on *Retrieve
        predictions*."""
        version = (predictor or self.predictor(project)).version
        note = self.unserved_note(project, version)
        return f"{version} ({note[0]})" if note else version

    def served_versions(self) -> dict[str, str]:
        """Version each project is served with in this process (without loading anything)."""
        if self.served is None:
            return {}
        return {project: version or self.zero_shot_version
                for project, version in self.served.served_versions().items()}

    def versions(self, project: str | None = None) -> list[str]:
        """Model versions for ``GET /versions``: the current one(s) first, then the others."""
        out: list[str] = []
        served = self.served_versions()
        projects = [project] if project else (self.store.projects() if self.store is not None else [])
        for p in projects:
            try:
                current = served.get(p)
                if current and current != self.zero_shot_version:
                    out.append(current)
                for info in self.store.versions(p) if self.store is not None else []:
                    # the served name of a store version contains its id
                    if not any(info.version in v for v in out):
                        out.append(info.version)
            except Exception as exc:  # noqa: BLE001 - a listing, never an error
                log.warning("project %s: cannot list versions (%s)", p, exc)
        out.append(self.zero_shot_version)
        return list(dict.fromkeys(out))

    def remember_tasks(self, project: str | None, tasks) -> None:
        """Keep task data so a training job finds the images of annotated tasks (best effort, in
        the background: a slow or absent Redis never delays a prediction)."""
        if project is None or self.redis is None:
            return
        from ..queue.eventlog import remember_tasks

        def run():
            try:
                remember_tasks(self.redis, project, tasks, self.settings)
            except Exception as exc:  # noqa: BLE001
                log.debug("could not remember task data: %s", exc)

        try:
            self.background(run)
        except RuntimeError:  # shutting down
            pass
