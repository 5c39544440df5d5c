"""Label Studio webhooks → a durable per-project event log in Redis → debounced training jobs.

:func:`record_webhook` validates a payload, appends its events to the project's Redis stream
(``<prefix>:events:<project>``) and applies the trigger policy in the same Redis transaction,
so an event is never stored without being covered by a training job, and none is counted twice:

- ``START_TRAINING`` — train now;
- ``ANNOTATION(S)_CREATED`` / ``ANNOTATION_UPDATED`` / ``ANNOTATION(S)_DELETED`` /
  ``TASK(S)_DELETED`` — train once ``worker.debounce.annotations`` events have arrived, or after
  ``worker.debounce.quiet_s`` seconds without a new one (each event pushes that back), but no
  later than ``worker.debounce.max_wait_s`` after the first untrained event;
- ``PROJECT_UPDATED`` / ``PROJECT_CREATED`` — the label config is recorded, no training;
- anything else — ignored, nothing stored.

Each project has at most one *pending* training job (RQ job id ``train-<project>-<stamp>``,
recorded in ``<prefix>:pending:<project>``). It waits in RQ's ScheduledJobRegistry until its
due time (the worker's scheduler enqueues it) or sits in the queue; more events only move its
due time. When a worker starts it, the job *claims* the pending record and reads the event
log up to its end in one transaction; events after that create the next pending job. So a
project has at most one queued and one running training, every event is trained on by the
job that claimed it or by the next one, and none is dropped.

The backend never imports ``worker``: jobs are enqueued by their dotted name.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis as _redis

from .errors import InvalidWebhook
from .settings import Settings, get_settings

log = logging.getLogger(__name__)

TRAIN_JOB = "worker.jobs.train_project"
FAILURE_CALLBACK = "worker.jobs.record_failure"
FEATURES_JOB = "worker.jobs.extract_features"

ANNOTATION_UPSERT = {"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_UPDATED"}
ANNOTATION_DELETE = {"ANNOTATION_DELETED", "ANNOTATIONS_DELETED"}
TASK_DELETE = {"TASK_DELETED", "TASKS_DELETED"}
PROJECT_INFO = {"PROJECT_UPDATED", "PROJECT_CREATED"}
TASK_CREATE = {"TASK_CREATED", "TASKS_CREATED"}
START_TRAINING = "START_TRAINING"
TRAINING_ACTIONS = ANNOTATION_UPSERT | ANNOTATION_DELETE | TASK_DELETE
HANDLED = TRAINING_ACTIONS | PROJECT_INFO | TASK_CREATE | {START_TRAINING}

# RQ statuses of a pending job that can still pick up more events.
_WAITING = {b"scheduled", b"queued", b"deferred"}


# ------------------------------------------------------------------------------------ keys
class Keys:
    """Names of semlabel's Redis keys (``redis.key_prefix``)."""

    def __init__(self, prefix: str = "semlabel"):
        self.prefix = prefix

    def events(self, project: str) -> str:
        return f"{self.prefix}:events:{project}"

    def pending(self, project: str) -> str:
        return f"{self.prefix}:pending:{project}"

    def lock(self, project: str) -> str:
        return f"{self.prefix}:training:{project}"

    def jobs(self, project: str) -> str:
        return f"{self.prefix}:jobs:{project}"

    def project(self, project: str) -> str:
        return f"{self.prefix}:project:{project}"

    def tasks(self, project: str) -> str:
        """Hash task id → task ``data`` JSON (from TASKS_CREATED webhooks and /predict)."""
        return f"{self.prefix}:tasks:{project}"

    @property
    def projects(self) -> str:
        return f"{self.prefix}:projects"


def keys_for(settings: Settings | None = None) -> Keys:
    return Keys((settings or get_settings()).redis.key_prefix)


# ------------------------------------------------------------------------------- parsing
@dataclass
class ParsedWebhook:
    action: str
    project: str | None
    events: list[dict] = field(default_factory=list)  # flat string fields for XADD
    project_info: dict = field(default_factory=dict)  # label_config, title when sent
    task_data: dict = field(default_factory=dict)  # task id -> data JSON, when sent


@dataclass
class WebhookResult:
    """What :func:`record_webhook` did. ``training`` describes the pending job covering the
    stored events (``None`` when the action trains nothing)."""

    action: str
    project: str | None
    stored: int = 0  # events appended to the project's log
    ignored: bool = False
    reason: str = ""
    training: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _as_id(value: Any, what: str) -> str:
    if isinstance(value, bool) or value is None:
        raise InvalidWebhook(f"{what} is missing")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return str(int(value.strip()))
    raise InvalidWebhook(f"{what} must be an integer id, got {value!r}"[:200])


def _project_id(payload: dict) -> str | None:
    project = payload.get("project")
    if isinstance(project, dict):
        project = project.get("id")
    if project is None:
        for holder in ("annotation", "task"):
            obj = payload.get(holder)
            if isinstance(obj, dict) and obj.get("project") is not None:
                project = obj["project"]
                break
    if project is None:
        tasks = payload.get("tasks")
        if isinstance(tasks, list) and tasks and isinstance(tasks[0], dict):
            project = tasks[0].get("project")
    return None if project is None else _as_id(project, "project id")


def _listed(payload: dict, singular: str, plural: str) -> list:
    value = payload.get(plural)
    if value is None:
        value = payload.get(singular)
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return value
    if value is None:
        return []
    raise InvalidWebhook(f"'{singular}' must be an object or a list of objects")


def parse_webhook(payload: Any) -> ParsedWebhook:
    """Validate a Label Studio webhook payload; :class:`InvalidWebhook` with the reason if
    it cannot be used. Pure: touches nothing."""
    if not isinstance(payload, dict):
        raise InvalidWebhook("payload is not a JSON object")
    action = payload.get("action")
    if not isinstance(action, str) or not action.strip():
        raise InvalidWebhook("no 'action'")
    action = action.strip().upper()
    if action not in HANDLED:
        return ParsedWebhook(action, None)
    project = _project_id(payload)
    if project is None:
        raise InvalidWebhook(f"{action} without a project id")
    info = {}
    if isinstance(payload.get("project"), dict):
        pj = payload["project"]
        for key in ("label_config", "title", "updated_at"):
            if isinstance(pj.get(key), str):
                info[key] = pj[key]
    parsed = ParsedWebhook(action, project, project_info=info)
    now = f"{time.time():.6f}"
    top_task = payload.get("task") if isinstance(payload.get("task"), dict) else None

    if action in ANNOTATION_UPSERT:
        annotations = _listed(payload, "annotation", "annotations")
        if not annotations:
            raise InvalidWebhook(f"{action} without an annotation")
        for ann in annotations:
            if not isinstance(ann, dict):
                raise InvalidWebhook("an annotation is not an object")
            ann_id = _as_id(ann.get("id"), "annotation id")
            task = ann.get("task")
            task_obj = task if isinstance(task, dict) else top_task
            task_id = _as_id(task.get("id") if isinstance(task, dict) else (
                task if task is not None else (top_task or {}).get("id")), "annotation's task id")
            result = ann.get("result")
            if result is None:
                result = []
            if not isinstance(result, list):
                raise InvalidWebhook(f"annotation {ann_id}: 'result' must be a list")
            record = {
                "id": int(ann_id),
                "task": int(task_id),
                "result": result,
                "was_cancelled": bool(ann.get("was_cancelled", False)),
                "ground_truth": bool(ann.get("ground_truth", False)),
                "completed_by": ann.get("completed_by"),
                "updated_at": ann.get("updated_at") or ann.get("created_at"),
            }
            event = {
                "action": "annotation",
                "source": action,
                "ts": now,
                "annotation_id": ann_id,
                "task_id": task_id,
                "annotation": json.dumps(record, separators=(",", ":"), default=str),
            }
            if task_obj is not None and str(task_obj.get("id")) == task_id and isinstance(task_obj.get("data"), dict):
                event["task_data"] = json.dumps(task_obj["data"], separators=(",", ":"), default=str)
                parsed.task_data[task_id] = event["task_data"]
            parsed.events.append(event)
    elif action in ANNOTATION_DELETE:
        annotations = _listed(payload, "annotation", "annotations")
        if not annotations:
            raise InvalidWebhook(f"{action} without annotation ids")
        for ann in annotations:
            ann_id = _as_id(ann.get("id") if isinstance(ann, dict) else ann, "annotation id")
            parsed.events.append({"action": "annotation_deleted", "source": action, "ts": now, "annotation_id": ann_id})
    elif action in TASK_DELETE:
        tasks = _listed(payload, "task", "tasks")
        if not tasks and payload.get("id") is not None:
            tasks = [{"id": payload["id"]}]
        if not tasks:
            raise InvalidWebhook(f"{action} without task ids")
        for task in tasks:
            task_id = _as_id(task.get("id") if isinstance(task, dict) else task, "task id")
            parsed.events.append({"action": "task_deleted", "source": action, "ts": now, "task_id": task_id})
    elif action in TASK_CREATE:
        for task in _listed(payload, "task", "tasks"):
            if isinstance(task, dict) and isinstance(task.get("data"), dict) and task.get("id") is not None:
                parsed.task_data[_as_id(task["id"], "task id")] = json.dumps(
                    task["data"], separators=(",", ":"), default=str)
    elif action in PROJECT_INFO:
        parsed.events.append({"action": "project_updated", "source": action, "ts": now,
                              "label_config": info.get("label_config", "")})
    return parsed


# ------------------------------------------------------------------------------ triggers
def _job_key(job_id: bytes | str) -> str:
    from rq.job import Job

    return Job.key_for(job_id.decode() if isinstance(job_id, bytes) else job_id)


def _new_job_id(project: str) -> str:
    return f"train-{project}-{int(time.time() * 1000)}-{secrets.token_hex(3)}"


def _train_queue(redis, settings: Settings):
    from rq import Queue

    return Queue(settings.worker.queues.train, connection=redis)


def _retry(settings: Settings):
    from rq import Retry

    intervals = list(settings.worker.retry_intervals_s)
    return Retry(max=len(intervals), interval=intervals) if intervals else None


def _schedule(
    redis,
    project: str,
    settings: Settings,
    *,
    urgent: bool,
    count: int,
    reason: str,
    extra=None,
    exclude_job: str | None = None,
    delay_s: float | None = None,
) -> dict:
    """In one Redis transaction: run ``extra(pipe)`` (the event writes) and make sure a pending
    training job covers them, creating it or moving its due time (see the module doc)."""
    from rq.registry import ScheduledJobRegistry

    keys = keys_for(settings)
    pkey = keys.pending(project)
    deb = settings.worker.debounce
    queue = _train_queue(redis, settings)
    sched_key = ScheduledJobRegistry(queue=queue).key
    with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(pkey)
                state = pipe.hgetall(pkey)
                now = time.time()
                job_id = (state.get(b"job_id") or b"").decode() or None
                waiting = False
                if job_id and job_id != exclude_job:
                    waiting = pipe.hget(_job_key(job_id), "status") in _WAITING
                if waiting:
                    first = float(state.get(b"first_ts", now))
                    total = int(state.get(b"count", 0)) + count
                    was_urgent = state.get(b"urgent") == b"1"
                    old_due = float(state.get(b"due", now))
                else:
                    first, total, was_urgent, old_due = now, count, False, None
                now_urgent = urgent or total >= deb.annotations
                if delay_s is not None:
                    due = now + delay_s
                elif now_urgent:
                    due = now
                else:
                    due = min(now + deb.quiet_s, first + deb.max_wait_s)
                if old_due is not None and (was_urgent or delay_s is not None):
                    # Joining a waiting job never postpones it: not past an urgent due time,
                    # nor (with an explicit delay) past the quiet / max_wait_s bound it has.
                    due = min(due, old_due)
                urgent_flag = now_urgent or was_urgent
                pipe.multi()
                if extra is not None:
                    extra(pipe)
                info = {"project": project, "due_at": due, "due_in_s": round(max(0.0, due - now), 3),
                        "pending_events": total, "reason": reason}
                if waiting:
                    pipe.hset(pkey, mapping={"due": repr(due), "count": total, "urgent": int(urgent_flag),
                                             "last_ts": repr(now)})
                    # Moves the job only while it still waits in the scheduled registry; once the
                    # scheduler has queued it, it runs as soon as a worker is free anyway.
                    pipe.zadd(sched_key, {job_id: due}, xx=True)
                    info.update(job_id=job_id, coalesced=True)
                else:
                    job_id = _new_job_id(project)
                    pipe.hset(pkey, mapping={"job_id": job_id, "first_ts": repr(now), "last_ts": repr(now),
                                             "due": repr(due), "count": total, "urgent": int(urgent_flag),
                                             "reason": reason})
                    pipe.lpush(keys.jobs(project), job_id)
                    pipe.ltrim(keys.jobs(project), 0, 99)
                    from rq import Callback

                    options = dict(
                        job_id=job_id,
                        on_failure=Callback(FAILURE_CALLBACK),
                        job_timeout=settings.worker.job_timeout_s,
                        result_ttl=settings.worker.result_ttl_s,
                        failure_ttl=settings.worker.failure_ttl_s,
                        retry=_retry(settings),
                        description=f"train project {project} ({reason})",
                        meta={"project": project, "reason": reason, "stage": "waiting",
                              "requested_at": now},
                        pipeline=pipe,
                    )
                    if due <= now:
                        queue.enqueue_call(TRAIN_JOB, args=(project,), kwargs={"reason": reason}, **{
                            k: v for k, v in options.items() if k != "job_timeout"},
                            timeout=settings.worker.job_timeout_s)
                    else:
                        queue.enqueue_at(_dt.datetime.fromtimestamp(due, tz=_dt.timezone.utc), TRAIN_JOB,
                                         project, reason=reason, **options)
                    info.update(job_id=job_id, coalesced=False)
                pipe.execute()
                return info
            except _redis.WatchError:
                continue


def record_webhook(redis, payload: Any, settings: Settings | None = None) -> WebhookResult:
    """Validate, persist (before returning) and act on one Label Studio webhook payload.

    Raises :class:`~backend.errors.InvalidWebhook` (nothing stored) for a payload it cannot use,
    :class:`redis.RedisError` when Redis fails (the caller answers 5xx so Label Studio knows).
    """
    settings = settings or get_settings()
    parsed = parse_webhook(payload)
    if parsed.project is None:
        return WebhookResult(parsed.action, None, ignored=True, reason=f"{parsed.action} is not used")
    keys = keys_for(settings)
    project = parsed.project

    def writes(pipe):
        pipe.sadd(keys.projects, project)
        if parsed.project_info:
            pipe.hset(keys.project(project), mapping=parsed.project_info)
        if parsed.task_data:
            pipe.hset(keys.tasks(project), mapping=parsed.task_data)
        for event in parsed.events:
            pipe.xadd(keys.events(project), event)

    result = WebhookResult(parsed.action, project)
    if parsed.action == START_TRAINING:
        result.training = _schedule(redis, project, settings, urgent=True, count=0, reason="START_TRAINING",
                                    extra=writes)
        result.reason = "training requested"
    elif parsed.action in TRAINING_ACTIONS:
        result.training = _schedule(redis, project, settings, urgent=False, count=len(parsed.events),
                                    reason=parsed.action, extra=writes)
        result.reason = f"{len(parsed.events)} event(s) recorded"
    else:
        pipe = redis.pipeline(transaction=True)
        pipe.multi()
        writes(pipe)
        if parsed.action in TASK_CREATE and parsed.task_data and settings.worker.prefetch_features:
            from rq import Queue

            tasks = [{"id": int(tid), "data": json.loads(data)} for tid, data in parsed.task_data.items()]
            Queue(settings.worker.queues.features, connection=redis).enqueue_call(
                FEATURES_JOB, args=(project, tasks), timeout=settings.worker.job_timeout_s,
                result_ttl=3600, failure_ttl=settings.worker.failure_ttl_s,
                job_id=f"features-{project}-{int(time.time() * 1000)}-{secrets.token_hex(3)}",
                description=f"features of {len(tasks)} new task(s) of project {project}", pipeline=pipe)
            result.training = None
        pipe.execute()
        result.reason = ("task data recorded" if parsed.action in TASK_CREATE
                         else "project information recorded")
    result.stored = len(parsed.events)
    return result


def request_training(redis, project: str | int, settings: Settings | None = None, *, reason: str = "requested",
                     delay_s: float | None = None, exclude_job: str | None = None) -> dict:
    """Make sure a training job for ``project`` runs now (or in ``delay_s``), coalescing with
    the pending one. Used by ``START_TRAINING``, ``semlabel models train`` and by a job that
    finds its project busy (``exclude_job`` = itself)."""
    settings = settings or get_settings()
    project = _as_id(project, "project id")

    def writes(pipe):
        pipe.sadd(keys_for(settings).projects, project)

    return _schedule(redis, project, settings, urgent=delay_s is None, count=0, reason=reason, extra=writes,
                     exclude_job=exclude_job, delay_s=delay_s)


# ----------------------------------------------------------------------- job-side helpers
def claim_pending(redis, project: str, job_id: str, settings: Settings | None = None) -> tuple[bool, str | None]:
    """Called by a training job when it starts: if it is the project's pending job, stop being
    it (later events make a new one), and return the id of the last event it must train on.
    Both happen in one transaction, so no event falls between two jobs."""
    settings = settings or get_settings()
    keys = keys_for(settings)
    pkey = keys.pending(project)
    with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(pkey)
                mine = (pipe.hget(pkey, "job_id") or b"").decode() == job_id
                pipe.multi()
                if mine:
                    pipe.delete(pkey)
                pipe.xrevrange(keys.events(project), count=1)
                out = pipe.execute()
                last = out[-1]
                last_id = last[0][0].decode() if last else None
                return mine, last_id
            except _redis.WatchError:
                continue


def read_events(redis, project: str | int, settings: Settings | None = None, upto: str | None = None) -> list[dict]:
    """The project's events in order (up to and including stream id ``upto``), decoded."""
    settings = settings or get_settings()
    key = keys_for(settings).events(str(project))
    out = []
    start = "-"
    while True:
        batch = redis.xrange(key, min=start, max=upto or "+", count=5000)
        if not batch:
            break
        for sid, fields in batch:
            event = {k.decode(): v.decode() for k, v in fields.items()}
            event["id"] = sid.decode()
            out.append(event)
        if len(batch) < 5000:
            break
        start = "(" + batch[-1][0].decode()
    return out


def reconcile(events: list[dict]) -> dict:
    """Fold events into the project's current annotations.

    Returns ``{"annotations": {annotation_id: record}, "task_data": {task_id: data},
    "label_config": str | None, "deleted_tasks": set}``. A later update replaces an
    annotation, a deletion removes it, a task deletion removes all of the task's annotations.
    """
    annotations: dict[int, dict] = {}
    task_data: dict[int, dict] = {}
    deleted_tasks: set[int] = set()
    label_config = None
    for event in events:
        kind = event.get("action")
        if kind == "annotation":
            record = json.loads(event["annotation"])
            annotations[int(record["id"])] = record
            deleted_tasks.discard(int(record["task"]))
            if event.get("task_data"):
                task_data[int(record["task"])] = json.loads(event["task_data"])
        elif kind == "annotation_deleted":
            annotations.pop(int(event["annotation_id"]), None)
        elif kind == "task_deleted":
            tid = int(event["task_id"])
            deleted_tasks.add(tid)
            task_data.pop(tid, None)
            for aid in [a for a, r in annotations.items() if int(r["task"]) == tid]:
                annotations.pop(aid)
        elif kind == "project_updated" and event.get("label_config"):
            label_config = event["label_config"]
    return {"annotations": annotations, "task_data": task_data, "label_config": label_config,
            "deleted_tasks": deleted_tasks}


def remember_tasks(redis, project: str | int, tasks, settings: Settings | None = None) -> int:
    """Keep the ``data`` of Label Studio tasks (e.g. those seen by /predict) so a training job
    can find the images of annotated tasks when Label Studio's API is not reachable.
    ``tasks``: dicts with ``id`` and ``data``. Returns how many were stored."""
    mapping = {}
    for task in tasks or []:
        if isinstance(task, dict) and task.get("id") is not None and isinstance(task.get("data"), dict):
            mapping[str(task["id"])] = json.dumps(task["data"], separators=(",", ":"), default=str)
    if mapping:
        redis.hset(keys_for(settings).tasks(str(project)), mapping=mapping)
    return len(mapping)


def task_data(redis, project: str | int, settings: Settings | None = None) -> dict[int, dict]:
    raw = redis.hgetall(keys_for(settings).tasks(str(project)))
    return {int(k): json.loads(v) for k, v in raw.items()}


def project_info(redis, project: str | int, settings: Settings | None = None) -> dict:
    """What webhooks told about the project (``label_config``, ``title``)."""
    raw = redis.hgetall(keys_for(settings).project(str(project)))
    return {k.decode(): v.decode() for k, v in raw.items()}


def training_state(redis, project: str | int, settings: Settings | None = None) -> dict:
    """The pending trigger, the training lock holder and the recent job ids of a project."""
    settings = settings or get_settings()
    keys = keys_for(settings)
    project = str(project)
    pending = {k.decode(): v.decode() for k, v in redis.hgetall(keys.pending(project)).items()}
    lock = redis.get(keys.lock(project))
    return {
        "project": project,
        "pending": pending or None,
        "running": json.loads(lock) if lock else None,
        "events": redis.xlen(keys.events(project)),
        "jobs": [j.decode() for j in redis.lrange(keys.jobs(project), 0, 19)],
    }


def known_projects(redis, settings: Settings | None = None) -> list[str]:
    return sorted(p.decode() for p in redis.smembers(keys_for(settings).projects))
