"""RQ jobs: ``train_project`` — a project's annotations → a new, evaluated, published version.

Enqueued by :mod:`backend.queue.contract` by its dotted name ``worker.jobs.train_project`` on the
``gpu`` queue. Steps (``job.meta["stage"]``, visible in ``rq info`` / ``semlabel models status``):

1. ``lock`` — take the project's training lock (a Redis key renewed while the job runs); if
   another worker trains the project, put a successor back ``worker.busy_retry_s`` later and end.
2. ``claim`` — stop being the project's pending job and note the end of its event log; events
   after that start the next job (:func:`backend.queue.debounce.claim_pending`).
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

import logging
import os
import resource
import socket
import time

from backend.queue.debounce import claim_pending, request_training
from backend.queue.eventlog import compact_events
from backend.redis.keys import keys_for
from backend.settings import get_settings
from backend.store import ModelStore

from .collect import collect, split_holdout
from .lock import ProjectLock
from .progress import Progress, plain
from .trainer import PermanentJobError, TrainingContext, trainer_for

log = logging.getLogger(__name__)

FORCING_REASONS = ("START_TRAINING", "semlabel models train")


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


def _claim_and_collect(job, redis, project, settings, progress):
    """Steps ``claim`` and ``collect`` (module doc); then the event stream is folded into
    the snapshot the next training starts from (lossless), when configured."""
    claimed, upto = claim_pending(redis, project, job.id, settings)
    progress("collect", claimed=claimed, events_upto=upto)
    data = collect(redis, project, upto, settings)
    if settings.redis.compact_after_training and upto:
        try:
            progress(compacted=compact_events(redis, project, upto, settings))
        except Exception as exc:  # noqa: BLE001 - the stream stays complete; compacted next time
            log.warning("project %s: could not fold the event stream (%s)", project, exc)
    return data


def _train_locked(job, redis, project, reason, force, settings, progress, lock, started) -> dict:
    """The job's steps once it holds the project's lock (module doc)."""
    data = _claim_and_collect(job, redis, project, settings, progress)
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
        result = trainer_for(settings)(ctx)
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
