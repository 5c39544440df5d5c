"""The contract between the backend and the worker: which jobs, on which RQ queues, how.

The backend never imports ``worker``: it enqueues jobs by their dotted name, and every job's
arguments and results travel as JSON (:func:`job_serializer`). The worker side implements
the names below; the queue names are settings (``worker.queues``).

- ``TRAIN_JOB`` (``worker.jobs.train_project``): a project's training, on ``worker.queues.train``,
  enqueued by :mod:`.debounce`; ``FAILURE_CALLBACK`` (``worker.jobs.record_failure``) runs when
  it fails;
- ``FEATURES_JOB`` (``worker.jobs.extract_features``): features of new tasks, on
  ``worker.queues.features`` (:func:`enqueue_features`).
"""

from __future__ import annotations

import datetime as _dt
import json
import secrets
import time

from ..settings import Settings

TRAIN_JOB = "worker.jobs.train_project"
FAILURE_CALLBACK = "worker.jobs.record_failure"
FEATURES_JOB = "worker.jobs.extract_features"


def job_serializer():
    """RQ's JSON serializer, used by every queue, job and worker of semlabel: a job's
    arguments and results are data, never code (RQ's default, pickle, runs whatever anyone
    who can write to Redis puts there)."""
    from rq.serializers import JSONSerializer

    return JSONSerializer


def queue(redis, name: str):
    """The RQ queue ``name`` with semlabel's serializer."""
    from rq import Queue

    return Queue(name, connection=redis, serializer=job_serializer())


def train_queue(redis, settings: Settings):
    return queue(redis, settings.worker.queues.train)


def fetch_job(redis, job_id: str):
    """An RQ job of semlabel's queues (with their serializer)."""
    from rq.job import Job

    return Job.fetch(job_id, connection=redis, serializer=job_serializer())


def _retry(settings: Settings):
    from rq import Retry

    intervals = list(settings.worker.retry_intervals_s)
    return Retry(max=len(intervals), interval=intervals) if intervals else None


def new_train_job_id(project: str) -> str:
    return f"train-{project}-{int(time.time() * 1000)}-{secrets.token_hex(3)}"


def enqueue_training(redis, pipe, project: str, job_id: str, due: float, reason: str, settings: Settings) -> None:
    """Add the training job ``job_id`` of ``project`` to the train queue (``due`` now or
    past) or to its scheduled registry (later), inside the transaction ``pipe``."""
    from rq import Callback

    now = time.time()
    options = dict(
        job_id=job_id,
        on_failure=Callback(FAILURE_CALLBACK),
        result_ttl=settings.worker.result_ttl_s,
        failure_ttl=settings.worker.failure_ttl_s,
        retry=_retry(settings),
        description=f"train project {project} ({reason})",
        meta={"project": project, "reason": reason, "stage": "waiting", "requested_at": now},
        pipeline=pipe,
    )
    q = train_queue(redis, settings)
    if due <= now:
        q.enqueue_call(TRAIN_JOB, args=(project,), kwargs={"reason": reason},
                       timeout=settings.worker.job_timeout_s, **options)
    else:
        q.enqueue_at(_dt.datetime.fromtimestamp(due, tz=_dt.timezone.utc), TRAIN_JOB, project, reason=reason,
                     job_timeout=settings.worker.job_timeout_s, **options)


def reschedule(redis, pipe, job_id: str, due: float, settings: Settings) -> None:
    """Move the scheduled training job ``job_id`` to ``due``, through RQ's public registry
    API. The caller WATCHes the job's key and knows it is still ``scheduled``: RQ's scheduler
    writes the job's status when it queues it, which then aborts the transaction."""
    from rq.job import Job
    from rq.registry import ScheduledJobRegistry

    registry = ScheduledJobRegistry(queue=train_queue(redis, settings))
    registry.schedule(Job(job_id, connection=redis), _dt.datetime.fromtimestamp(due, tz=_dt.timezone.utc),
                      pipeline=pipe)


def job_key(job_id: str) -> str:
    """The Redis key of an RQ job's hash (to WATCH it, read its status)."""
    from rq.job import Job

    return Job.key_for(job_id)


def enqueue_features(redis, pipe, project: str, task_json: dict[str, str], settings: Settings) -> None:
    """Queue the feature extraction of new tasks (task id → data JSON) inside ``pipe``."""
    tasks = [{"id": int(tid), "data": json.loads(data)} for tid, data in task_json.items()]
    queue(redis, settings.worker.queues.features).enqueue_call(
        FEATURES_JOB, args=(project, tasks), timeout=settings.worker.job_timeout_s,
        result_ttl=settings.worker.features_result_ttl_s, failure_ttl=settings.worker.failure_ttl_s,
        job_id=f"features-{project}-{int(time.time() * 1000)}-{secrets.token_hex(3)}",
        description=f"features of {len(tasks)} new task(s) of project {project}", pipeline=pipe)
