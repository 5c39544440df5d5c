"""RQ jobs: ``train_project`` — a project's annotations → a new, evaluated, published version.

Enqueued by :mod:`backend.events` by its dotted name ``worker.jobs.train_project`` on the
``gpu`` queue. Steps (``job.meta["stage"]``, visible in ``rq info`` / ``semlabel models status``):

1. ``lock`` — take the project's training lock (a Redis key renewed while the job runs); if
   another worker trains the project, put a successor back ``worker.busy_retry_s`` later and end.
2. ``claim`` — stop being the project's pending job and note the end of its event log; events
   after that start the next job (:func:`backend.events.claim_pending`).
3. ``collect`` — the project's annotations: the events the backend persisted, folded so that
   updates replace and deletions remove; when Label Studio's API is reachable
   (``LABEL_STUDIO_URL`` + ``LABEL_STUDIO_API_KEY``) its JSON export is the truth instead.
4. ``preparing`` / ``features`` / ``training`` / ``evaluating`` — the trainer (the model engineer's API,
   :func:`train_heads`) extracts missing features through the runtime's feature cache,
   trains on the training split, evaluates on the held-out split (a fixed share of tasks
   chosen by a hash of the task id, so a task never moves between splits), reporting epoch
   and loss into ``job.meta``.
5. ``publishing`` — :meth:`backend.store.ModelStore.publish` (atomic; promoted only if the
   held-out metric passes the gate).

Retries with backoff come from ``rq.Retry`` (``worker.retry_intervals_s``), also for a worker
that died mid-job; a failed job leaves ``job.meta["error"]`` (one line) and RQ's traceback.
Errors that a retry cannot fix (:class:`PermanentJobError`) are not retried.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import resource
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from backend.errors import SemlabelError
from backend.events import (
    claim_pending,
    compact_events,
    keys_for,
    project_info,
    read_state,
    request_training,
    task_data,
)
from backend.settings import Settings, get_settings
from backend.store import ModelStore

log = logging.getLogger(__name__)

_RUNTIME = None
_RUNTIME_LOCK = threading.Lock()
FORCING_REASONS = ("START_TRAINING", "semlabel models train")


class PermanentJobError(SemlabelError):
    """A training failure that retrying cannot fix (bad label config, ...)."""


def plain(value: Any) -> Any:
    """``value`` as JSON data (RQ stores jobs' meta and results with its JSON serializer):
    numpy / torch scalars become numbers, arrays lists, paths and other objects strings."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / torch arrays and scalars
        return plain(value.tolist())
    if hasattr(value, "item"):
        return plain(value.item())
    return str(value)


# ---------------------------------------------------------------------------- runtime
def _label_studio(settings: Settings):
    if not settings.label_studio_url:
        return None
    from backend.ls.connection import LabelStudioConnection

    return LabelStudioConnection(settings.label_studio_url, settings.label_studio_api_key)


def runtime(settings: Settings | None = None):
    """The process's :class:`~backend.runtime.Runtime` (backbone loaded once)."""
    global _RUNTIME
    with _RUNTIME_LOCK:
        if _RUNTIME is None:
            from backend.runtime import Runtime

            settings = settings or get_settings()
            _RUNTIME = Runtime.create(settings, label_studio=_label_studio(settings),
                                      local_roots=settings.images.local_roots)
        return _RUNTIME


def preload(settings: Settings | None = None) -> None:
    """Load the backbone in the worker's parent process so every forked job shares it."""
    started = time.perf_counter()
    rt = runtime(settings)
    log.warning("worker: backbone %s loaded in %.1f s (shared by every job)", rt.backbone.name,
                time.perf_counter() - started)


# ---------------------------------------------------------------------------- progress
class Progress:
    """Writes the job's progress into ``job.meta`` (readable with ``rq info`` and
    ``semlabel models status``) and the log."""

    def __init__(self, job):
        self.job = job
        self._last_save = 0.0

    def __call__(self, stage: str | None = None, *, force: bool = False, **fields: Any) -> None:
        if self.job is None:
            return
        if stage is not None:
            self.job.meta["stage"] = stage
            log.info("job %s: %s %s", self.job.id, stage, fields or "")
        self.job.meta.update({k: plain(v) for k, v in fields.items()})
        self.job.meta["updated_at"] = time.time()
        now = time.monotonic()
        # Epoch updates can be frequent; write at most twice a second unless a stage changes.
        if stage is not None or force or now - self._last_save >= 0.5:
            self._last_save = now
            with contextlib.suppress(Exception):
                self.job.save_meta()


# -------------------------------------------------------------------------------- lock
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

# Take the lock when it is free or held by an earlier attempt of the same job, in one step.
_ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held then
    local ok, record = pcall(cjson.decode, held)
    if not ok or type(record) ~= 'table' or record['job'] ~= ARGV[2] then
        return 0
    end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
if held then return 2 end
return 1
"""


class ProjectLock:
    """One training per project at a time across all workers: a Redis key holding the job id,
    with a TTL renewed by a thread. A retry of the same job (after its worker died) takes it
    over; anyone else waits for it to be released or to expire."""

    def __init__(self, redis, key: str, job_id: str, ttl_s: float):
        self.redis = redis
        self.key = key
        self.job_id = job_id
        self.ttl_ms = int(ttl_s * 1000)
        self.value = json.dumps({"job": job_id, "host": socket.gethostname(), "pid": os.getpid(),
                                 "since": time.time(), "token": secrets.token_hex(8)})
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict | None:
        raw = self.redis.get(self.key)
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return {"job": raw.decode(errors="replace")}

    def acquire(self) -> bool:
        taken = int(self.redis.eval(_ACQUIRE, 1, self.key, self.value, self.job_id, self.ttl_ms))
        if taken == 0:
            return False
        if taken == 2:  # our own earlier attempt died holding it: this retry took over
            log.warning("job %s: took over the training lock of its earlier attempt", self.job_id)
        self._thread = threading.Thread(target=self._renew, name="semlabel-train-lock", daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> None:
        renew = self.redis.register_script(_RENEW)
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                if not renew(keys=[self.key], args=[self.value, self.ttl_ms]):
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
            self.redis.register_script(_RELEASE)(keys=[self.key], args=[self.value])


# ------------------------------------------------------------------------------ collect
@dataclass
class ProjectData:
    """A project's labelled tasks, shaped like Label Studio's JSON export."""

    project: str
    tasks: list[dict]
    label_config: str | None
    source: str
    events_upto: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update((self.label_config or "").encode())
        for task in sorted(self.tasks, key=lambda t: t["id"]):
            anns = sorted(
                ([a.get("id"), a.get("result"), bool(a.get("was_cancelled"))] for a in task.get("annotations", [])),
                key=lambda a: str(a[0]),
            )
            h.update(json.dumps([task["id"], task.get("data"), anns], sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        anns = [a for t in self.tasks for a in t.get("annotations", [])]
        return {
            "source": self.source,
            "tasks": len(self.tasks),
            "annotations": len(anns),
            "cancelled": sum(1 for a in anns if a.get("was_cancelled")),
            "events_upto": self.events_upto,
            "fingerprint": self.fingerprint,
            "notes": self.notes,
        }


def _from_events(redis, project: str, upto: str | None, settings: Settings) -> ProjectData:
    # The snapshot earlier trainings folded the stream into, plus the events up to `upto`.
    state = read_state(redis, project, settings, upto=upto, with_events=upto is not None)
    known = task_data(redis, project, settings)
    known.update(state["task_data"])
    by_task: dict[int, list[dict]] = {}
    for ann in state["annotations"].values():
        by_task.setdefault(int(ann["task"]), []).append(ann)
    tasks, missing = [], 0
    for tid, anns in sorted(by_task.items()):
        if tid in state["deleted_tasks"]:
            continue
        if tid not in known:
            missing += 1
            continue
        tasks.append({"id": tid, "data": known[tid], "annotations": sorted(anns, key=lambda a: a["id"])})
    label_config = state["label_config"] or project_info(redis, project, settings).get("label_config")
    notes = []
    if missing:
        notes.append(f"{missing} annotated task(s) skipped: their image is unknown (no TASKS_CREATED webhook, "
                     "no /predict call, Label Studio API not configured)")
    return ProjectData(project, tasks, label_config, "events", upto, notes)


def _from_label_studio(project: str, settings: Settings, upto: str | None) -> ProjectData:
    conn = _label_studio(settings)
    client = conn.client
    pid = int(project)
    label_config = client.projects.get(id=pid).label_config
    raw = b"".join(client.projects.exports.download_sync(id=pid, export_type="JSON", download_all_tasks=False))
    exported = json.loads(raw.decode("utf-8"))
    tasks = []
    for task in exported:
        anns = [
            {k: a.get(k) for k in ("id", "result", "was_cancelled", "ground_truth", "completed_by", "updated_at")}
            for a in task.get("annotations") or []
        ]
        if anns:
            tasks.append({"id": int(task["id"]), "data": task.get("data") or {}, "annotations": anns})
    return ProjectData(project, tasks, label_config, "label-studio", upto)


def collect(redis, project: str, upto: str | None, settings: Settings | None = None) -> ProjectData:
    """The project's current annotations (see the module doc)."""
    settings = settings or get_settings()
    if settings.label_studio_url and settings.label_studio_api_key:
        try:
            data = _from_label_studio(project, settings, upto)
            log.info("project %s: %d labelled task(s) from Label Studio's export", project, len(data.tasks))
            return data
        except Exception as exc:  # noqa: BLE001 - unreachable LS: the event log still has it all
            note = f"Label Studio API unavailable ({type(exc).__name__}: {str(exc)[:160]}); used the event log"
            log.warning("project %s: %s", project, note)
            data = _from_events(redis, project, upto, settings)
            data.notes.insert(0, note)
            return data
    return _from_events(redis, project, upto, settings)


def split_holdout(tasks: list[dict], fraction: float, seed: int = 0,
                  min_holdout: int = 1) -> tuple[list[dict], list[dict]]:
    """(train, held-out): a task is held out when a hash of its id falls under ``fraction``,
    so a task stays on its side as the project grows. No held-out split (everything trains)
    when fewer than ``min_holdout`` tasks would be held out, or nothing would be left."""
    if fraction <= 0 or len(tasks) < 2:
        return list(tasks), []

    def score(task):
        digest = hashlib.sha256(f"{seed}:{task['id']}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    held_ids = {t["id"] for t in tasks if score(t) < fraction}
    if len(held_ids) < min_holdout or len(held_ids) >= len(tasks):
        return list(tasks), []
    return [t for t in tasks if t["id"] not in held_ids], [t for t in tasks if t["id"] in held_ids]


# ------------------------------------------------------------------------------ trainer
@dataclass
class TrainingContext:
    """What a trainer gets. It writes the model into ``out_dir`` and returns a
    :class:`TrainingResult`."""

    project: str
    data: ProjectData
    train_tasks: list[dict]
    holdout_tasks: list[dict]
    settings: Settings
    progress: Progress
    out_dir: Path
    current_dir: Path | None  # the current version's directory (baseline on the same held-out split)
    current_version: str | None
    runtime_factory: Callable[[], Any] = field(default=runtime)


@dataclass
class TrainingResult:
    metrics: dict                      # held-out metrics of the new model (the gate reads store.gate_metric)
    labels: list[str]
    baseline: dict | None = None       # {"version", "metrics"}: the current version on the same held-out split
    config: dict = field(default_factory=dict)
    extra_summary: dict = field(default_factory=dict)
    promote_reason: str | None = None  # set: promote without the gate, for this reason


def _taxonomy(settings: Settings):
    path = getattr(getattr(settings, "backend", None), "taxonomy", "") or ""
    if not path:
        return None
    from backend.labels import Taxonomy

    return Taxonomy.from_yaml(path)


def _binding(label_config: str):
    """The ``<Choices>``→``<Image>`` binding semlabel serves (the first multiple-choice one)."""
    from backend.errors import ConfigError
    from worker.data import label_config_binding

    try:
        return label_config_binding(label_config)
    except ConfigError as exc:
        raise PermanentJobError(f"label config: {exc}") from None


def _evaluate(predictor, feats, examples, space) -> dict:
    from worker.metrics import evaluate_scores
    from worker.train import targets

    with torch_no_grad():
        scores = predictor.probabilities(feats, space)
    y = targets([e.positives for e in examples], space.names)
    out = evaluate_scores(scores, y, names=space.names, ks=(1, 3))
    out.pop("AP_per_label", None)
    return out


def torch_no_grad():
    import torch

    return torch.no_grad()


def train_heads(ctx: TrainingContext) -> TrainingResult:
    """The default trainer: the SigRL heads (worker.train.train_model) on cached features,
    evaluated on the held-out tasks together with the current version."""
    from backend.errors import ConfigError, ModelLoadError
    from backend.model import load_predictor, save_model
    from worker.data import attach_feature_batch, examples_from_tasks
    from worker.train import train_model

    settings = ctx.settings
    binding = _binding(ctx.data.label_config or "")
    labels = binding.names
    rt = ctx.runtime_factory()
    taxonomy = _taxonomy(settings)
    space = rt.label_space(binding.labels, taxonomy=taxonomy)
    kw = dict(from_name=binding.control, image_field=binding.data_key)
    train_ex, report = examples_from_tasks(ctx.train_tasks, labels, **kw)
    hold_ex, hold_report = examples_from_tasks(ctx.holdout_tasks, labels, **kw)
    if not train_ex:
        raise PermanentJobError(f"no annotated image carries a label of the config ({report.to_dict()})")
    ctx.progress("features", images=len(train_ex) + len(hold_ex))
    train_ex, batch, errors = attach_feature_batch(train_ex, rt, progress=False)

    def on_epoch(info: dict) -> None:
        fields = {k: info[k] for k in ("epoch", "epochs", "loss") if k in info}
        if "val_map" in info:
            fields["val_mAP"] = info["val_map"]
        ctx.progress("training" if info.get("stage") == "train" and info.get("epoch") == 1 else None, **fields)

    try:
        result = train_model(train_ex, space, batch, settings, backbone=rt.backbone, progress=on_epoch,
                             taxonomy=taxonomy, show_progress=False)
    except ConfigError as exc:
        raise PermanentJobError(str(exc)) from None
    save_model(result.model, ctx.out_dir, metrics=result.metrics)
    metrics: dict = {"validation": result.metrics}
    baseline = None
    promote_reason = None
    ctx.progress("evaluating", holdout_images=len(hold_ex))
    if hold_ex:
        feats = rt.features_for([e.image for e in hold_ex], [e.task_id for e in hold_ex], progress=False)
        pairs = [(e, f) for e, f in zip(hold_ex, feats) if not isinstance(f, SemlabelError)]
        if pairs:
            hold_ex, hold_feats = [p[0] for p in pairs], [p[1] for p in pairs]
            metrics.update(_evaluate(load_predictor(ctx.out_dir, rt), hold_feats, hold_ex, space))
            metrics["split"] = "held-out tasks"
            if ctx.current_dir is not None:
                try:
                    current = load_predictor(ctx.current_dir, rt)
                except (ModelLoadError, OSError) as exc:
                    promote_reason = (f"the current version {ctx.current_version} cannot be loaded here "
                                      f"({exc}); promoted without comparison")
                else:
                    baseline = {"version": ctx.current_version,
                                "metrics": _evaluate(current, hold_feats, hold_ex, space)}
            else:  # the project is served zero-shot: that is the baseline
                zero_shot = rt.zero_shot_predictor()
                baseline = {"version": zero_shot.version,
                            "metrics": _evaluate(zero_shot, hold_feats, hold_ex, space)}
    else:
        promote_reason = (f"too few labelled tasks for a held-out evaluation "
                          f"(fewer than {settings.worker.min_holdout_tasks} would be held out); "
                          "promoted without the gate")
    (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str))
    summary = {
        "examples": len(train_ex),
        "holdout_examples": len(hold_ex),
        "image_errors": len(errors),
        "export_report": report.to_dict(),
        "training": result.summary,
    }
    if hold_report.skipped_no_labels or hold_report.skipped_no_image:
        summary["holdout_report"] = hold_report.to_dict()
    return TrainingResult(
        metrics=metrics, labels=labels, baseline=baseline,
        config={"binding": binding.control, "image_field": binding.data_key, "backbone": rt.backbone.name,
                "taxonomy": bool(taxonomy)},
        extra_summary=summary, promote_reason=promote_reason,
    )


def _trainer(settings: Settings) -> Callable[[TrainingContext], TrainingResult]:
    """``worker.trainer`` (``module:function``) when configured, else :func:`train_heads`."""
    spec = settings.worker.trainer
    if not spec:
        return train_heads
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------- job
def extract_features(project: str | int, tasks: list[dict]) -> dict:
    """``cpu`` queue: compute newly imported tasks' features into the shared feature cache."""
    from rq import get_current_job

    settings = get_settings()
    progress = Progress(get_current_job())
    rt = runtime(settings)
    sources, ids = [], []
    for task in tasks:
        source = _task_image(task)
        if source:
            sources.append(source)
            ids.append(task.get("id"))
    progress("features", tasks=len(tasks), images=len(sources))
    feats = rt.features_for(sources, ids, progress=False) if sources else []
    errors = [str(f) for f in feats if isinstance(f, SemlabelError)]
    progress("done", computed=rt.features.computed, cached=rt.features.hits, errors=errors[:20])
    return {"project": str(project), "images": len(sources), "errors": len(errors),
            "computed": rt.features.computed, "cached": rt.features.hits}


def _task_image(task: dict) -> str | None:
    data = task.get("data") or {}
    try:
        from worker.data import task_image

        return task_image(task)
    except Exception:  # noqa: BLE001 - fall back to the first string value that looks like an image
        for value in data.values():
            if isinstance(value, str) and value:
                return value
    return None


def note_failure(job, reason: str) -> None:
    """Keep a failure's one-line reason in ``job.meta`` (``error`` and the last few in
    ``failures``), also when RQ retries the job and keeps no result of the failed attempt."""
    try:
        meta = job.get_meta(refresh=True)
    except Exception:  # noqa: BLE001
        meta = job.meta
    failures = list(meta.get("failures") or [])[-9:]
    failures.append({"ts": time.time(), "error": reason[:500]})
    meta.update(error=reason[:500], failures=failures)
    if meta.get("stage") not in ("failed", "done"):
        meta["stage"] = "failed"
    job.meta = meta
    with contextlib.suppress(Exception):
        job.save_meta()


def record_failure(job, connection, exc_type, exc_value, traceback) -> None:
    """RQ failure callback (set on every training job): an exception in the job, or the job
    declared abandoned because its worker died."""
    from rq.exceptions import AbandonedJobError

    if exc_type is AbandonedJobError or isinstance(exc_value, AbandonedJobError):
        reason = "abandoned: the worker running it stopped sending heartbeats (killed or lost)"
    else:
        reason = f"{getattr(exc_type, '__name__', exc_type)}: {str(exc_value)[:300]}"
    retry = " (will be retried)" if (job.retries_left or 0) > 0 else ""
    note_failure(job, reason + retry)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train_project(project: str | int, reason: str = "requested", force: bool | None = None) -> dict:
    """Train, evaluate and publish a new version of ``project``'s model (see the module doc)."""
    from rq import get_current_job

    settings = get_settings()
    job = get_current_job()
    if job is None:
        raise RuntimeError("train_project runs inside an RQ worker (use `semlabel models train`)")
    redis = job.connection
    project = str(project)
    progress = Progress(job)
    started = time.time()
    force = reason in FORCING_REASONS if force is None else force
    progress("lock", project=project, attempt_started_at=started, host=socket.gethostname(), pid=os.getpid(),
             error=None)
    lock = ProjectLock(redis, keys_for(settings).lock(project), job.id, settings.worker.lock_ttl_s)
    if not lock.acquire():
        holder = lock.holder() or {}
        nxt = request_training(redis, project, settings, reason=f"{reason} (after {holder.get('job')})",
                               delay_s=settings.worker.busy_retry_s, exclude_job=job.id)
        progress("deferred", busy_with=holder.get("job"), next_job=nxt["job_id"])
        return {"status": "deferred", "project": project, "busy_with": holder.get("job"), "next_job": nxt["job_id"]}
    try:
        return _train_locked(job, redis, project, reason, force, settings, progress, lock, started)
    except PermanentJobError as exc:
        job.retries_left = 0  # nothing a retry could change
        progress("failed", error=str(exc), force=True)
        raise
    except Exception as exc:
        progress("failed", error=f"{type(exc).__name__}: {str(exc)[:300]}", force=True)
        raise
    finally:
        lock.release()


def _train_locked(job, redis, project, reason, force, settings, progress, lock, started) -> dict:
    claimed, upto = claim_pending(redis, project, job.id, settings)
    progress("collect", claimed=claimed, events_upto=upto)
    data = collect(redis, project, upto, settings)
    if settings.redis.compact_after_training and upto:
        # Lossless: the folded events become the snapshot the next training starts from.
        try:
            progress(compacted=compact_events(redis, project, upto, settings))
        except Exception as exc:  # noqa: BLE001 - the stream stays complete; compacted next time
            log.warning("project %s: could not fold the event stream (%s)", project, exc)
    summary = data.summary()
    progress(tasks=summary["tasks"], annotations=summary["annotations"], source=data.source)
    store = ModelStore.from_settings(settings, redis)
    versions = store.versions(project)
    if not force and versions and versions[-1].data_summary.get("fingerprint") == data.fingerprint:
        progress("done", result="up to date")
        return {"status": "up-to-date", "project": project, "version": versions[-1].version,
                "tasks": summary["tasks"]}
    labelled = [t for t in data.tasks if any(not a.get("was_cancelled") for a in t["annotations"])]
    if not labelled:
        progress("done", result="nothing to train on")
        return {"status": "skipped", "project": project, "reason": "no labelled tasks yet", **summary}
    if not data.label_config:
        raise PermanentJobError(f"project {project}: no label config known (no webhook carried the project, "
                                "and Label Studio's API is not configured)")
    w = settings.worker
    train, holdout = split_holdout(labelled, w.holdout_fraction, w.holdout_seed, w.min_holdout_tasks)
    current = store.current(project)
    with store.staging(project) as out_dir:
        ctx = TrainingContext(
            project=project, data=data, train_tasks=train, holdout_tasks=holdout, settings=settings,
            progress=progress, out_dir=out_dir,
            current_dir=store.version_dir(project, current) if current else None, current_version=current,
        )
        progress("preparing", train_tasks=len(train), holdout_tasks=len(holdout))
        result = _trainer(settings)(ctx)
        if lock.lost:
            raise RuntimeError("the project's training lock was lost (Redis unreachable too long); not publishing")
        progress("publishing", holdout_metrics=result.metrics,
                 **{f"holdout_{store.gate_metric}": result.metrics.get(store.gate_metric)})
        summary.update(train_tasks=len(train), holdout_tasks=len(holdout), reason=reason, job=job.id,
                       **result.extra_summary)
        published = store.publish(project, out_dir, metrics=result.metrics, data_summary=summary,
                                   config=result.config, labels=result.labels, baseline=result.baseline,
                                   promote=True if result.promote_reason else None,
                                   promote_reason=result.promote_reason,
                                   extra={"trained_by": {"job": job.id, "host": socket.gethostname()}})
    out = {
        "status": "published",
        "project": project,
        "version": published.version,
        "promoted": published.promoted,
        "reason": published.reason,
        "metrics": result.metrics,
        "tasks": summary["tasks"],
        "duration_s": round(time.time() - started, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }
    out = plain(out)
    progress("done", version=published.version, promoted=published.promoted, gate=published.reason,
             duration_s=out["duration_s"], peak_rss_mb=out["peak_rss_mb"], finished_at=time.time())
    return out
