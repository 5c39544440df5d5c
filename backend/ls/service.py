"""The backend's per-process state and the one path every prediction takes.

task → image source (the label config's ``<Image>`` variable) → bytes (``ImageLoader``, with the
project's Label Studio connection) → features (``FeatureStore``, cached by content hash) →
predictor (``ServedModels.get(project)``: the project's current trained version, else zero-shot)
→ probabilities / suggestions → Label Studio JSON (:mod:`.results`).

One :class:`BackendService` per process, shared by all request threads: it loads the backbone
once (in a background thread, so ``/health`` answers at once), keeps the served models current
(the model store's watcher swaps new versions in; requests in flight keep the object they hold),
caches parsed label configs and label spaces by content, and serialises the CPU/GPU work
(feature extraction and heads) with one lock while image downloads run in parallel.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

from ..errors import ConfigError, ImageError, RedisUnavailable
from ..features import Features
from ..images import ImageLoader
from ..redis.keys import keys_for
from .setup_record import read_setup, setup_record
from ..model.decision import preselect
from ..settings import Settings, get_settings
from ..queue.spool import EventRecorder
from . import metrics, results
from .config import Binding, ConfigCache, ProjectConfig, TaskDataError
from .connection import LabelStudioConnection, choose_label_studio

log = logging.getLogger(__name__)

_AUTO = object()


class NotReady(RuntimeError):
    """The model is still loading (or failed to load)."""


def project_key(value: Any) -> str | None:
    """Label Studio's project reference → the project id as a string.

    ``/setup`` and ``/predict`` send ``"<id>.<created_at timestamp>"``; webhooks an object with
    ``id``; the API an integer."""
    if isinstance(value, Mapping):
        value = value.get("id")
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    text = str(value).strip()
    head = text.split(".", 1)[0]
    return head if head.isdigit() else None


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
        self._compute = threading.Lock()
        self._embedding = threading.Lock()
        self._spaces: OrderedDict[tuple, Any] = OrderedDict()
        self._spaces_lock = threading.Lock()
        self.configs = ConfigCache(self.cfg.reasons_textarea)
        self._setup: dict[str, tuple[str | None, str | None]] = {}
        self._connections: dict[tuple[str, str | None], LabelStudioConnection] = {}
        self._conn_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="semlabel-fetch")
        self._bg = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semlabel-bg")
        self._bg_lock = threading.Lock()
        self._bg_pending = 0
        # (Label Studio URL, upload source) → content key of the image's features. Upload
        # files never change (Label Studio names each with a random prefix), so a warm
        # request for one reads its cached features without downloading the image again.
        self._upload_keys: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._upload_lock = threading.Lock()
        # (project, task id) → (when, choices per control) of the last spot answer: Label
        # Studio saves the annotator's draft 5 s after a change, so two points in quick
        # succession would otherwise lose the first point's label.
        self._answers: OrderedDict[tuple, tuple[float, dict]] = OrderedDict()
        self._answers_lock = threading.Lock()
        self._taxonomy = None
        if self.cfg.taxonomy:
            from ..labels import Taxonomy

            self._taxonomy = Taxonomy.from_yaml(self.cfg.taxonomy)
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
                self.served = ServedModels(
                    self.store, self.runtime, redis=self.redis,
                    poll_interval_s=self.settings.store.poll_interval_s,
                    max_projects=self.settings.store.max_watched_projects, idle_s=self.settings.store.watch_idle_s,
                )
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
        """Run ``fn`` on a background thread (fire and forget; dropped while 8 are waiting)."""
        with self._bg_lock:
            if self._bg_pending >= 8:
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
        self._pool.shutdown(wait=False)
        self._bg.shutdown(wait=False)

    # -- redis -------------------------------------------------------------------------
    @property
    def redis(self):
        """The Redis client, or None while none answers. Never blocks a request: after the first
        attempt (at start), reconnecting runs in the background at most every 5 s."""
        if self._redis is not None or not self._redis_auto:
            return self._redis
        with self._redis_lock:
            due = time.monotonic() - self._redis_checked > 5.0
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

    # -- label config ------------------------------------------------------------------
    def project_config(self, xml: str) -> ProjectConfig:
        return self.configs.get(xml)

    def label_space(self, binding: Binding):
        key = (binding.labels, id(self._taxonomy))
        with self._spaces_lock:
            hit = self._spaces.get(key)
            if hit is not None:
                self._spaces.move_to_end(key)
                return hit
        space = self.runtime.label_space(binding.labels, taxonomy=self._taxonomy)
        with self._spaces_lock:
            self._spaces[key] = space
            while len(self._spaces) > 64:
                self._spaces.popitem(last=False)
        return space

    # -- Label Studio connection -------------------------------------------------------
    def remember_setup(self, project: str | None, hostname: str | None, token: str | None) -> None:
        """Keep what ``/setup`` said about Label Studio (host, the project creator's token), in
        this process and in Redis so every process of the backend can use it."""
        if project is None:
            return
        hostname = hostname.strip().rstrip("/") if isinstance(hostname, str) and hostname.strip() else None
        token = token.strip() if isinstance(token, str) and token.strip() else None
        if hostname is None and token is None:
            return
        if self._setup.get(project) == (hostname, token):
            return
        self._setup[project] = (hostname, token)
        try:  # Redis gets a reference to the token, never the token (backend/ls/setup_record.py)
            self.events.record_hash(keys_for(self.settings).setup(project), setup_record(hostname, token, self.settings))
        except Exception as exc:  # noqa: BLE001 - the in-process copy still works
            log.warning("project %s: could not record the Label Studio host (%s)", project, exc)

    def connection(self, project: str | None) -> LabelStudioConnection | None:
        """The Label Studio to fetch images from and store predictions in: ``LABEL_STUDIO_URL`` /
        ``LABEL_STUDIO_API_KEY`` when set, else what ``/setup`` sent for the project."""
        url, token = self.settings.label_studio_url, self.settings.label_studio_api_key
        setup = None
        if (not url or not token) and project is not None:
            setup = self._setup.get(project)
            if setup is None and self.redis is not None:
                try:
                    setup = read_setup(self.redis, project, self.settings)
                except Exception:  # noqa: BLE001
                    setup = None
                if setup is not None:
                    self._setup[project] = setup
        url, token = choose_label_studio(self.settings, setup)  # the operator's address only
        if not url:
            return None
        with self._conn_lock:
            conn = self._connections.get((url, token))
            if conn is None:
                try:
                    conn = LabelStudioConnection(url, token)
                except ValueError as exc:  # e.g. LABEL_STUDIO_URL without a scheme
                    log.error("project %s: no Label Studio connection: %s", project, exc)
                    return None
                self._connections[(url, token)] = conn
            return conn

    # -- images and features -----------------------------------------------------------
    def features(self, sources: Sequence[str], conn: LabelStudioConnection | None, task_ids=None) -> list:
        """Features (or the ImageError) of each source, in order. Label Studio uploads seen
        before come straight from the feature cache; the other images are downloaded in
        parallel outside the compute lock, each request into its own temporary directory,
        removed afterwards (features are cached by content hash, not the files)."""
        if not sources:
            return []
        store = self.runtime.features
        remembered = [self._upload_key(conn, source) for source in sources]
        known = {i: store.get(key) for i, key in enumerate(remembered) if key is not None}
        known = {i: feats for i, feats in known.items() if feats is not None}
        if known:
            metrics.FEATURES.labels("cache").inc(len(known))
        todo = [i for i in range(len(sources)) if i not in known]
        fetched = self._fetch_features([sources[i] for i in todo], conn,
                                       [task_ids[i] for i in todo] if task_ids else None) if todo else []
        out = [known.get(i) for i in range(len(sources))]
        for i, feats in zip(todo, fetched):
            out[i] = feats
            if isinstance(feats, Features) and _is_upload(sources[i]) and conn is not None:
                self._remember_upload(conn, sources[i], feats.key)
        return out

    def _upload_key(self, conn, source: str) -> str | None:
        if conn is None or not _is_upload(source):
            return None
        with self._upload_lock:
            return self._upload_keys.get((conn.url, source))

    def _remember_upload(self, conn, source: str, key: str) -> None:
        with self._upload_lock:
            self._upload_keys[(conn.url, source)] = key
            self._upload_keys.move_to_end((conn.url, source))
            while len(self._upload_keys) > 100_000:
                self._upload_keys.popitem(last=False)

    def _fetch_features(self, sources: Sequence[str], conn, task_ids) -> list:
        downloads = self.settings.data_path / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            loader = ImageLoader(
                self.settings.images, label_studio=conn,
                local_roots=self.settings.images.local_roots, cache_dir=tmp,
            )

            def fetch(i):
                try:
                    return loader.fetch(sources[i], task_ids[i] if task_ids else None)
                except ImageError as err:
                    return err

            if len(sources) == 1:
                blobs = [fetch(0)]
            else:
                blobs = list(self._pool.map(fetch, range(len(sources))))
        store = self.runtime.features
        with self._compute:
            hits, computed = store.hits, store.computed
            feats = store.get_or_compute(blobs, progress=False)
            metrics.FEATURES.labels("cache").inc(store.hits - hits)
            metrics.FEATURES.labels("computed").inc(store.computed - computed)
        return feats

    # -- predictions -------------------------------------------------------------------
    def _task_features(self, config: ProjectConfig, tasks: Sequence[Any], conn) -> tuple[list, list]:
        """Per task: ``{object name: Features}`` or None, and the error message or None."""
        errors: list[str | None] = [None] * len(tasks)
        wanted: list[dict[str, str]] = [{} for _ in tasks]
        for i, task in enumerate(tasks):
            if not isinstance(task, Mapping):
                errors[i] = f"task #{i} is not an object"
                continue
            for b in config.bindings:
                try:
                    wanted[i][b.object] = b.source(task)
                except TaskDataError as exc:
                    errors[i] = f"task {task.get('id', '#' + str(i))}: {exc}"
                    break
        order: dict[str, int] = {}
        owners: list[int | None] = []
        for i, srcs in enumerate(wanted):
            if errors[i] is None:
                for src in srcs.values():
                    if src not in order:
                        order[src] = len(order)
                        task_id = tasks[i].get("id")
                        owners.append(task_id if isinstance(task_id, int) else None)
        sources = list(order)
        feats = self.features(sources, conn, owners)
        out: list[dict | None] = [None] * len(tasks)
        for i, srcs in enumerate(wanted):
            if errors[i] is not None:
                continue
            row = {}
            for obj, src in srcs.items():
                f = feats[order[src]]
                if isinstance(f, ImageError):
                    errors[i] = f"task {tasks[i].get('id', '#' + str(i))}: {f}"
                    break
                row[obj] = f
            else:
                out[i] = row
        return out, errors

    def predict(self, project: str | None, xml: str, tasks: Sequence[Any], context: Any = None) -> tuple[list, str]:
        """One entry per task, in order (see :mod:`.results`), and the model version.

        ``context.result`` (interactive pre-annotation) holds the annotator's partial choices, or
        (Label Studio's UI) a point or box drawn with a smart tool: the entries then carry the
        chosen labels plus the likely-missing ones — for a spot, the best labels at that spot
        (:mod:`backend.model.spot`) — with reasons."""
        config = self.project_config(xml)
        predictor = self.predictor(project)
        version = self.model_version(project, predictor)
        note = self.unserved_note(project, predictor.version)
        partial = context.get("result") if isinstance(context, Mapping) else None
        kind = "interactive" if isinstance(partial, list) else "preannotation"
        conn = self.connection(project)
        feats, errors = self._task_features(config, tasks, conn)
        ok = [i for i in range(len(tasks)) if feats[i] is not None]
        entries: list[dict | None] = [None] * len(tasks)
        if kind == "preannotation":
            scores = self._probabilities(predictor, config, [feats[i] for i in ok])
            pre = self.cfg.preannotation
            multiple = {(b.control, b.object): b.multiple for b in config.bindings}
            chosen = {key: preselect(rows, pre, multiple[key]) if rows else [] for key, rows in scores.items()}
            for j, i in enumerate(ok):
                entries[i] = results.preannotation(
                    config, {key: rows[j] for key, rows in scores.items()}, version,
                    threshold=pre.threshold, max_labels=pre.max_labels, reasons_labels=pre.reasons_labels,
                    selected={key: rows[j] for key, rows in chosen.items()},
                )
        else:
            ctx_chosen, unknown = config.chosen(partial)
            if unknown:
                log.info("interactive context: ignoring %d value(s) not in the label config: %s",
                         len(unknown), ", ".join(unknown[:10]))
            spots = results.spots(config, partial)
            # Label Studio 1.23 sends only the smart region in the context and *replaces* the
            # annotation's choices by the answer's: the annotator's current choices come from
            # the task Label Studio sends along (draft, annotation or pre-annotation).
            chosen_rows, sources = [], []
            for i in ok:
                if any(ctx_chosen.values()) or not spots:
                    chosen_rows.append(ctx_chosen)
                    sources.append("context")
                else:
                    row, source = results.current_choices(config, tasks[i], version)
                    last = self._last_answer(project, tasks[i])
                    if last is not None and last[0] > results.saved_at(tasks[i]):
                        row = {c: list(dict.fromkeys([*row.get(c, []), *last[1].get(c, [])])) for c in row}
                        source += "+last answer"
                    chosen_rows.append(row)
                    sources.append(source)
            top_k, min_p = self.settings.suggest.top_k, self.settings.suggest.min_probability
            sugg = self._suggestions(predictor, config, [feats[i] for i in ok], chosen_rows, top_k, min_p)
            at_spot = self._spot_suggestions(predictor, config, [feats[i] for i in ok], chosen_rows, spots)
            for j, i in enumerate(ok):
                task_items = {key: rows[j] for key, rows in sugg.items()}
                if spots:
                    entries[i] = results.spot_answer(
                        config, chosen_rows[j], {key: rows[j] for key, rows in at_spot.items()}, task_items,
                        version, add=self.settings.suggest.spot.add, ignored=unknown,
                        meta={"chosen_from": sources[j]},
                    )
                    self._remember_answer(project, tasks[i], entries[i])
                else:
                    entries[i] = results.suggestions(config, chosen_rows[j], task_items, version, ignored=unknown)
        if note is not None:
            for i in ok:
                results.add_note(config, entries[i], note[1])
        for i, err in enumerate(errors):
            if err is not None:
                log.warning("project %s: no prediction for %s", project or "-", err)
                entries[i] = results.error_entry(version, err)
                metrics.PREDICTIONS.labels(kind, "error").inc()
        metrics.PREDICTIONS.labels(kind, "ok").inc(len(ok))
        return entries, version

    def _probabilities(self, predictor, config: ProjectConfig, feats: list[dict]) -> dict:
        out = {}
        if not feats:
            return {(b.control, b.object): [] for b in config.bindings}
        for b in config.bindings:
            space = self._space_locked(b)
            with self._compute:
                probs = predictor.probabilities([f[b.object] for f in feats], space)
            out[(b.control, b.object)] = probs.tolist()
        return out

    def _suggestions(self, predictor, config, feats, chosen, top_k, min_probability) -> dict:
        out = {}
        if not feats:
            return {(b.control, b.object): [] for b in config.bindings}
        for b in config.bindings:
            space = self._space_locked(b)
            known = [list(c.get(b.control, [])) for c in chosen]
            with self._compute:
                out[(b.control, b.object)] = predictor.suggest(
                    [f[b.object] for f in feats], space, known, top_k, min_probability
                )
        return out

    def _last_answer(self, project, task) -> tuple[float, dict] | None:
        key = (project, task.get("id"))
        with self._answers_lock:
            hit = self._answers.get(key)
        if hit is None or time.time() - hit[0] > 600:
            return None
        return hit

    def _remember_answer(self, project, task, entry: Mapping) -> None:
        if task.get("id") is None:
            return
        choices = {r["from_name"]: list(r["value"]["choices"]) for r in entry.get("result", [])
                   if r.get("type") == "choices"}
        with self._answers_lock:
            self._answers[(project, task.get("id"))] = (time.time(), choices)
            self._answers.move_to_end((project, task.get("id")))
            while len(self._answers) > 10_000:
                self._answers.popitem(last=False)

    def _spot_suggestions(self, predictor, config, feats, chosen, spots) -> dict:
        """``{(control, object): [per image: [(Spot, [Suggestion])]]}`` for the bindings whose
        image has a spot (a smart point or box) in the context."""
        from ..model.spot import crop_fraction, suggest_at_spot

        cfg, out = self.settings.suggest, {}
        fraction = crop_fraction(self.runtime.backbone)
        for b in config.bindings:
            on_image = spots.get(b.object) or []
            if not on_image or not feats:
                continue
            space = self._space_locked(b)
            rows = []
            for f, c in zip(feats, chosen):
                known = list(c.get(b.control, []))
                with self._compute:
                    rows.append([(spot, suggest_at_spot(
                        predictor, f[b.object], space, known, spot, top_k=cfg.spot.listed,
                        min_probability=cfg.spot.min_probability, sigma=cfg.spot.point_sigma,
                        gain=cfg.spot.local_gain, fraction=fraction, co_occurring=cfg.co_occurring,
                        neighbours=cfg.neighbours)) for spot in on_image])
            out[(b.control, b.object)] = rows
        return out

    def _space_locked(self, binding: Binding):
        key = (binding.labels, id(self._taxonomy))
        with self._spaces_lock:
            cached = key in self._spaces
        if cached:
            return self.label_space(binding)
        # The text encoder runs for new labels only, under its own lock: one new label set
        # at a time, while image requests keep the compute lock.
        with self._embedding:
            return self.label_space(binding)

    def review_prediction(self, project: str, xml: str, task: Mapping, annotation: Mapping) -> dict | None:
        """The review prediction of one submitted annotation: its labels plus the likely-missing
        ones; ``None`` when the annotation was skipped or chose nothing semlabel serves."""
        if annotation.get("was_cancelled"):
            return None
        config = self.project_config(xml)
        chosen, unknown = config.chosen(annotation.get("result") or [])
        if not any(chosen.values()):
            return None
        predictor = self.predictor(project)
        conn = self.connection(project)
        feats, errors = self._task_features(config, [task], conn)
        if errors[0] is not None:
            raise ImageError(str(task.get("id")), errors[0])
        review = self.cfg.review
        # The top_k unchosen labels whatever their probability: the task's score, P(missing),
        # ranks the reviewer's queue even when no single label reaches min_probability (a
        # calibrated weak model); the text lists only those that do.
        sugg = self._suggestions(predictor, config, feats, [chosen], review.top_k, 0.0)
        top = {key: rows[0] for key, rows in sugg.items()}
        listed = {key: [s for s in row if s.probability >= review.min_probability] for key, row in top.items()}
        meta = {"kind": "review", "annotation_id": annotation.get("id"), "served_version": predictor.version}
        entry = results.suggestions(config, chosen, listed, self.review_version(predictor.version),
                                    ignored=unknown, meta=meta)
        entry["score"] = results.p_missing(s.probability for row in top.values() for s in row)
        metrics.PREDICTIONS.labels("review", "ok").inc()
        return entry

    def review_version(self, served_version: str) -> str:
        return self.cfg.review.model_version.replace("{version}", served_version)


def check_config(service: BackendService, xml: str | None) -> ProjectConfig:
    if not isinstance(xml, str) or not xml.strip():
        raise ConfigError("no label config in the request ('label_config' or 'schema')")
    return service.project_config(xml)


def _is_upload(source: str) -> bool:
    """A file uploaded to Label Studio (``/data/upload/…``, relative or absolute URL)."""
    path = source.split("://", 1)[-1]
    path = path[path.find("/"):] if "://" in source else path
    return path.startswith(("/data/upload/", "data/upload/"))

