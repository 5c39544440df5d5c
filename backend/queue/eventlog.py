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

Every event has an identity (``eid``, see :func:`parse_webhook`); the project's recent
identities (``<prefix>:seen:<project>``) are checked in the same transaction, so an event
received twice — a disk-spool replay (:mod:`backend.spool`), a resend — is stored once.

A training job folds the events it read into the project's snapshot
(``<prefix>:state:<project>``, :func:`compact_events`) and trims them from the stream; the
next one reads the snapshot and the events since (:func:`read_state`).

The backend never imports ``worker``: jobs are enqueued by their dotted name, as JSON
(:func:`job_serializer`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import redis as _redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import InvalidWebhook
from ..settings import Settings, get_settings

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

    def seen(self, project: str) -> str:
        """Sorted set: identities of the project's recent events → when stored (dedup)."""
        return f"{self.prefix}:seen:{project}"

    def state(self, project: str) -> str:
        """Hash: the snapshot the event stream was folded into (see :func:`compact_events`)."""
        return f"{self.prefix}:state:{project}"

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
    duplicates: int = 0  # events already stored (same identity), not stored again
    spooled: bool = False  # kept in the local disk spool; written to Redis when it answers
    ignored: bool = False
    reason: str = ""
    training: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


_MAX_ID = 2**63 - 1


def _as_id(value: Any, what: str) -> str:
    """A Label Studio id (a positive integer, or its decimal string) as a string."""
    if isinstance(value, bool) or value is None:
        raise InvalidWebhook(f"{what} is missing")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and 0 < value <= _MAX_ID:
        return str(value)
    raise InvalidWebhook(f"{what} must be a positive integer id, got {value!r}"[:200])


class AnnotationRecord(BaseModel):
    """The part of a Label Studio annotation training reads (pydantic-checked before it is
    stored: a payload that does not have this shape stores nothing)."""

    model_config = ConfigDict(extra="ignore")

    id: Annotated[int, Field(gt=0, le=_MAX_ID)]
    task: Annotated[int, Field(gt=0, le=_MAX_ID)]
    result: list[dict[str, Any]] = []
    was_cancelled: bool = False
    ground_truth: bool = False
    completed_by: int | dict[str, Any] | None = None
    updated_at: Annotated[str, Field(max_length=64)] | None = None

    @field_validator("was_cancelled", "ground_truth", mode="before")
    @classmethod
    def _null_is_false(cls, value):
        return False if value is None else value


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "value"
    return f"{where}: {err.get('msg', 'invalid')}"[:200]


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


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str, sort_keys=True)


def _identity(*parts: Any) -> str:
    """An event's identity: the same event received twice (a replay, a resend) has the same."""
    return hashlib.sha256(_compact(parts).encode()).hexdigest()[:32]


def parse_webhook(payload: Any, settings: Settings | None = None) -> ParsedWebhook:
    """Validate a Label Studio webhook payload; :class:`InvalidWebhook` with the reason if
    it cannot be used. Pure: touches nothing.

    Ids must be positive integers; an annotation must have the shape of
    :class:`AnnotationRecord`, at most ``redis.max_result_items`` result items and at most
    ``redis.max_event_kb`` of JSON; a label config at most ``redis.max_label_config_kb``.
    Every event gets an identity (``eid``): the content and Label Studio's ``updated_at``
    where there is one (the same annotation state received twice is one event), else a
    random one fixed at receipt (kept through the disk spool)."""
    limits = (settings or get_settings()).redis
    if not isinstance(payload, dict):
        raise InvalidWebhook("payload is not a JSON object")
    action = payload.get("action")
    if not isinstance(action, str) or not action.strip():
        raise InvalidWebhook("no 'action'")
    action = action.strip().upper()
    if action not in HANDLED:
        return ParsedWebhook(action[:64], None)
    project = _project_id(payload)
    if project is None:
        raise InvalidWebhook(f"{action} without a project id")
    info = {}
    if isinstance(payload.get("project"), dict):
        pj = payload["project"]
        for key in ("label_config", "title", "updated_at"):
            if isinstance(pj.get(key), str):
                info[key] = pj[key]
        if len(info.get("label_config", "").encode()) > limits.max_label_config_kb * 1024:
            raise InvalidWebhook(f"the label config is larger than {limits.max_label_config_kb} KB")
        info["title"] = info.get("title", "")[:500]
        if "updated_at" in info:
            info["updated_at"] = info["updated_at"][:64]
        if not info["title"]:
            info.pop("title")
    parsed = ParsedWebhook(action, project, project_info=info)
    now = f"{time.time():.6f}"
    top_task = payload.get("task") if isinstance(payload.get("task"), dict) else None

    def task_json(data: dict, task_id: str) -> str:
        text = _compact(data)
        if len(text) > limits.max_task_data_kb * 1024:
            raise InvalidWebhook(f"task {task_id}: its data is larger than {limits.max_task_data_kb} KB")
        return text

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
            if len(result) > limits.max_result_items:
                raise InvalidWebhook(f"annotation {ann_id}: more than {limits.max_result_items} result items")
            try:
                checked = AnnotationRecord.model_validate({
                    "id": int(ann_id), "task": int(task_id), "result": result,
                    "was_cancelled": ann.get("was_cancelled", False), "ground_truth": ann.get("ground_truth", False),
                    "completed_by": ann.get("completed_by"),
                    "updated_at": ann.get("updated_at") or ann.get("created_at"),
                })
            except ValidationError as exc:
                raise InvalidWebhook(f"annotation {ann_id}: {_one_line(exc)}") from None
            record = checked.model_dump()
            encoded = json.dumps(record, separators=(",", ":"), default=str)
            if len(encoded) > limits.max_event_kb * 1024:
                raise InvalidWebhook(f"annotation {ann_id} is larger than {limits.max_event_kb} KB")
            event = {
                "action": "annotation",
                "source": action,
                "ts": now,
                "annotation_id": ann_id,
                "task_id": task_id,
                "annotation": encoded,
                "eid": _identity("annotation", ann_id, record["updated_at"], record["result"],
                                 record["was_cancelled"], record["ground_truth"])
                if record["updated_at"] else secrets.token_hex(16),
            }
            if task_obj is not None and str(task_obj.get("id")) == task_id and isinstance(task_obj.get("data"), dict):
                event["task_data"] = task_json(task_obj["data"], task_id)
                parsed.task_data[task_id] = event["task_data"]
            parsed.events.append(event)
    elif action in ANNOTATION_DELETE:
        annotations = _listed(payload, "annotation", "annotations")
        if not annotations:
            raise InvalidWebhook(f"{action} without annotation ids")
        for ann in annotations:
            ann_id = _as_id(ann.get("id") if isinstance(ann, dict) else ann, "annotation id")
            # Label Studio never reuses an id: deleting one twice is one event.
            parsed.events.append({"action": "annotation_deleted", "source": action, "ts": now, "annotation_id": ann_id,
                                  "eid": _identity("annotation_deleted", ann_id)})
    elif action in TASK_DELETE:
        tasks = _listed(payload, "task", "tasks")
        if not tasks and payload.get("id") is not None:
            tasks = [{"id": payload["id"]}]
        if not tasks:
            raise InvalidWebhook(f"{action} without task ids")
        for task in tasks:
            task_id = _as_id(task.get("id") if isinstance(task, dict) else task, "task id")
            parsed.events.append({"action": "task_deleted", "source": action, "ts": now, "task_id": task_id,
                                  "eid": _identity("task_deleted", task_id)})
    elif action in TASK_CREATE:
        for task in _listed(payload, "task", "tasks"):
            if isinstance(task, dict) and isinstance(task.get("data"), dict) and task.get("id") is not None:
                task_id = _as_id(task["id"], "task id")
                parsed.task_data[task_id] = task_json(task["data"], task_id)
    elif action in PROJECT_INFO:
        config = info.get("label_config", "")
        parsed.events.append({"action": "project_updated", "source": action, "ts": now, "label_config": config,
                              "eid": _identity("project_updated", config, info["updated_at"])
                              if info.get("updated_at") else secrets.token_hex(16)})
    return parsed


# ------------------------------------------------------------------------------ triggers
def _job_key(job_id: bytes | str) -> str:
    from rq.job import Job

    return Job.key_for(job_id.decode() if isinstance(job_id, bytes) else job_id)


def _new_job_id(project: str) -> str:
    return f"train-{project}-{int(time.time() * 1000)}-{secrets.token_hex(3)}"


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


def fetch_job(redis, job_id: str):
    """An RQ job of semlabel's queues (with their serializer)."""
    from rq.job import Job

    return Job.fetch(job_id, connection=redis, serializer=job_serializer())


def _train_queue(redis, settings: Settings):
    return queue(redis, settings.worker.queues.train)


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
    prepare=None,
    watch: tuple[str, ...] = (),
) -> dict | None:
    """In one Redis transaction: run ``extra(pipe)`` (the event writes) and make sure a pending
    training job covers them, creating it or moving its due time (see the module doc).

    ``prepare(pipe) -> (count, extra)``, when given, runs after the keys are watched (``watch``
    too) and decides what to write; a count of 0 for a non-urgent trigger writes nothing and
    returns ``None`` (every event was a duplicate)."""
    from rq.registry import ScheduledJobRegistry

    keys = keys_for(settings)
    pkey = keys.pending(project)
    deb = settings.worker.debounce
    queue = _train_queue(redis, settings)
    sched_key = ScheduledJobRegistry(queue=queue).key
    with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(pkey, *watch)
                if prepare is not None:
                    count, extra = prepare(pipe)
                    if count == 0 and not urgent:
                        pipe.reset()
                        return None
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


def _task_room(pipe, key: str, mapping: dict[str, str], cap: int) -> dict[str, str]:
    """The part of ``mapping`` (task id → data) the project's tasks hash takes without growing
    past ``cap`` entries: updates of tasks it has, new ones while there is room."""
    if not mapping:
        return {}
    size = pipe.hlen(key)
    if size + len(mapping) <= cap:
        return dict(mapping)
    ids = list(mapping)
    room = max(0, cap - size)
    out = {}
    for tid, old in zip(ids, pipe.hmget(key, ids)):
        if old is not None:
            out[tid] = mapping[tid]
        elif room > 0:
            out[tid] = mapping[tid]
            room -= 1
    if len(out) < len(ids):
        _warn_once(key, f"{key}: holds {size} tasks (redis.max_remembered_tasks); "
                        f"{len(ids) - len(out)} new task(s) not remembered")
    return out


_WARNED: dict[str, float] = {}


def _warn_once(key: str, message: str, every_s: float = 300.0) -> None:
    """A warning at most every ``every_s`` per ``key`` (a full hash must not flood the log)."""
    now = time.monotonic()
    if now - _WARNED.get(key, -1e9) >= every_s:
        _WARNED[key] = now
        log.warning("%s", message)


def _features_job(redis, pipe, project: str, task_json: dict[str, str], settings: Settings) -> None:
    tasks = [{"id": int(tid), "data": json.loads(data)} for tid, data in task_json.items()]
    queue(redis, settings.worker.queues.features).enqueue_call(
        FEATURES_JOB, args=(project, tasks), timeout=settings.worker.job_timeout_s,
        result_ttl=3600, failure_ttl=settings.worker.failure_ttl_s,
        job_id=f"features-{project}-{int(time.time() * 1000)}-{secrets.token_hex(3)}",
        description=f"features of {len(tasks)} new task(s) of project {project}", pipeline=pipe)


def record_webhook(redis, payload: Any, settings: Settings | None = None, *,
                   also: tuple | list = ()) -> WebhookResult:
    """Validate, persist (before returning) and act on one Label Studio webhook payload.

    ``payload``: the JSON payload, or what :func:`parse_webhook` made of it (the disk spool
    replays those). ``also``: ``(stream key, fields)`` entries appended in the same
    transaction (the review jobs of the webhook), unless every event was a duplicate.

    Events whose identity the project's recent-events set already holds are not stored again
    (``duplicates``), so a replay or a resend is a no-op. Raises
    :class:`~backend.errors.InvalidWebhook` (nothing stored) for a payload it cannot use,
    :class:`redis.RedisError` when Redis fails (nothing stored: one transaction).
    """
    settings = settings or get_settings()
    parsed = payload if isinstance(payload, ParsedWebhook) else parse_webhook(payload, settings)
    if parsed.project is None:
        return WebhookResult(parsed.action, None, ignored=True, reason=f"{parsed.action} is not used")
    keys = keys_for(settings)
    project = parsed.project
    limits = settings.redis
    seen = keys.seen(project)
    eids = list(dict.fromkeys(e["eid"] for e in parsed.events))
    result = WebhookResult(parsed.action, project)

    def prepare(pipe):
        known = set()
        if eids:
            known = {eid for eid, score in zip(eids, pipe.zmscore(seen, eids)) if score is not None}
        fresh, taken = [], set(known)
        for event in parsed.events:
            if event["eid"] not in taken:
                taken.add(event["eid"])
                fresh.append(event)
        result.duplicates = len(parsed.events) - len(fresh)
        result.stored = len(fresh)
        tasks = _task_room(pipe, keys.tasks(project), parsed.task_data, limits.max_remembered_tasks)

        def writes(p):
            p.sadd(keys.projects, project)
            if parsed.project_info:
                p.hset(keys.project(project), mapping=parsed.project_info)
            if tasks:
                p.hset(keys.tasks(project), mapping=tasks)
            gone = [e["task_id"] for e in fresh if e["action"] == "task_deleted"]
            if gone:
                p.hdel(keys.tasks(project), *gone)
            for event in fresh:
                p.xadd(keys.events(project), event)
            if fresh:
                now = time.time()
                p.zadd(seen, {e["eid"]: now for e in fresh})
                p.zremrangebyscore(seen, "-inf", now - limits.dedup_ttl_s)
                p.zremrangebyrank(seen, 0, -(limits.dedup_window + 1))
            if fresh or not parsed.events:
                for key, fields in also:
                    p.xadd(key, fields)
            if parsed.action in TASK_CREATE and tasks and settings.worker.prefetch_features:
                _features_job(redis, p, project, tasks, settings)

        return len(fresh), writes

    if parsed.action == START_TRAINING:
        result.training = _schedule(redis, project, settings, urgent=True, count=0, reason="START_TRAINING",
                                    prepare=prepare, watch=(seen,))
        result.reason = "training requested"
    elif parsed.action in TRAINING_ACTIONS:
        result.training = _schedule(redis, project, settings, urgent=False, count=0, reason=parsed.action,
                                    prepare=prepare, watch=(seen,))
        result.reason = (f"{result.stored} event(s) recorded" if result.stored
                         else f"{result.duplicates} event(s) already recorded")
    else:
        with redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(seen)
                    _, writes = prepare(pipe)
                    pipe.multi()
                    writes(pipe)
                    pipe.execute()
                    break
                except _redis.WatchError:
                    continue
        result.reason = ("task data recorded" if parsed.action in TASK_CREATE
                         else "project information recorded")
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
    it (later events make a new one), and return the id of the last event it must train on
    (``None``: the stream holds no event, everything is in the snapshot).
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


def read_events(redis, project: str | int, settings: Settings | None = None, upto: str | None = None,
                after: str | None = None) -> list[dict]:
    """The project's events in the stream, in order (after stream id ``after``, up to and
    including ``upto``), decoded. Events folded into the snapshot are no longer there."""
    settings = settings or get_settings()
    key = keys_for(settings).events(str(project))
    out = []
    start = f"({after}" if after else "-"
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


def _empty_state() -> dict:
    return {"annotations": {}, "task_data": {}, "label_config": None, "deleted_tasks": set()}


def reconcile(events: list[dict], base: dict | None = None) -> dict:
    """Fold events into the project's current annotations, starting from ``base`` (a
    snapshot, see :func:`read_state`; it is not modified).

    Returns ``{"annotations": {annotation_id: record}, "task_data": {task_id: data},
    "label_config": str | None, "deleted_tasks": set}``. A later update replaces an
    annotation, a deletion removes it, a task deletion removes all of the task's annotations.
    """
    base = base or _empty_state()
    annotations: dict[int, dict] = dict(base["annotations"])
    task_data: dict[int, dict] = dict(base["task_data"])
    deleted_tasks: set[int] = set(base.get("deleted_tasks") or ())
    label_config = base.get("label_config")
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


# -------------------------------------------------------------------- snapshot (compaction)
# The snapshot hash: "upto" (last folded stream id), "label_config", "annotations" (count),
# "a:<annotation id>" → record JSON, "d:<task id>" → task data JSON (from annotation events).
def _load_snapshot(redis, key: str) -> tuple[dict, str | None, dict[str, bytes]]:
    raw = {k.decode(): v for k, v in redis.hgetall(key).items()}
    base = _empty_state()
    for name, value in raw.items():
        if name.startswith("a:"):
            base["annotations"][int(name[2:])] = json.loads(value)
        elif name.startswith("d:"):
            base["task_data"][int(name[2:])] = json.loads(value)
        elif name == "label_config":
            base["label_config"] = value.decode() or None
    upto = raw.get("upto")
    return base, (upto.decode() if upto else None), raw


def read_state(redis, project: str | int, settings: Settings | None = None, upto: str | None = None,
               with_events: bool = True) -> dict:
    """The project's annotations: the snapshot earlier trainings folded the stream into, plus
    the stream's events after it (up to stream id ``upto``; none with ``with_events=False``),
    folded (:func:`reconcile`). Adds ``folded_upto`` and ``events_read``."""
    settings = settings or get_settings()
    base, snap_upto, _ = _load_snapshot(redis, keys_for(settings).state(str(project)))
    events = read_events(redis, project, settings, upto=upto, after=snap_upto) if with_events else []
    state = reconcile(events, base=base)
    state.update(folded_upto=snap_upto, events_read=len(events))
    return state


def _next_stream_id(stream_id: str) -> str:
    ms, _, seq = stream_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def compact_events(redis, project: str | int, upto: str | None, settings: Settings | None = None) -> dict:
    """Fold the project's events up to stream id ``upto`` into its snapshot and trim them from
    the stream, in one transaction (lossless: :func:`read_state` gives the same annotations
    before and after). Called by the training job holding the project's lock, after it has
    read them; the stream then holds only what arrived since, so the next training reads
    ``O(annotations + new events)``, not the history. Writes only the snapshot entries that
    changed."""
    settings = settings or get_settings()
    project = str(project)
    keys = keys_for(settings)
    skey, stream = keys.state(project), keys.events(project)
    if not upto:
        return {"folded": 0}
    with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(skey)
                base, snap_upto, raw = _load_snapshot(pipe, skey)
                if snap_upto and _stream_key(snap_upto) >= _stream_key(upto):
                    pipe.reset()
                    return {"folded": 0, "upto": snap_upto}
                events = read_events(pipe, project, settings, upto=upto, after=snap_upto)
                state = reconcile(events, base=base)
                fields = {f"a:{aid}": json.dumps(rec, separators=(",", ":"), default=str)
                          for aid, rec in state["annotations"].items()}
                fields.update({f"d:{tid}": json.dumps(data, separators=(",", ":"), default=str)
                               for tid, data in state["task_data"].items()})
                changed = {k: v for k, v in fields.items() if raw.get(k) != v.encode()}
                removed = [k for k in raw if k[:2] in ("a:", "d:") and k not in fields]
                pipe.multi()
                if removed:
                    pipe.hdel(skey, *removed)
                pipe.hset(skey, mapping={**changed, "upto": upto, "label_config": state["label_config"] or "",
                                         "annotations": len(state["annotations"])})
                pipe.xtrim(stream, minid=_next_stream_id(upto), approximate=False)
                out = pipe.execute()
                return {"folded": len(events), "trimmed": int(out[-1]), "upto": upto,
                        "annotations": len(state["annotations"]), "written": len(changed) + len(removed)}
            except _redis.WatchError:
                continue


def _stream_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def remember_tasks(redis, project: str | int, tasks, settings: Settings | None = None) -> int:
    """Keep the ``data`` of Label Studio tasks (e.g. those seen by /predict) so a training job
    can find the images of annotated tasks when Label Studio's API is not reachable.
    ``tasks``: dicts with a positive integer ``id`` and ``data`` (at most
    ``redis.max_task_data_kb``); the project's hash holds at most ``redis.max_remembered_tasks``.
    Returns how many were stored."""
    settings = settings or get_settings()
    limits = settings.redis
    mapping = {}
    for task in tasks or []:
        if isinstance(task, dict) and isinstance(task.get("data"), dict):
            try:
                tid = _as_id(task.get("id"), "task id")
            except InvalidWebhook:
                continue
            text = _compact(task["data"])
            if len(text) <= limits.max_task_data_kb * 1024:
                mapping[tid] = text
    if not mapping:
        return 0
    key = keys_for(settings).tasks(str(project))
    room = _task_room(redis, key, mapping, limits.max_remembered_tasks)
    if room:
        redis.hset(key, mapping=room)
    return len(room)


def task_data(redis, project: str | int, settings: Settings | None = None) -> dict[int, dict]:
    raw = redis.hgetall(keys_for(settings).tasks(str(project)))
    return {int(k): json.loads(v) for k, v in raw.items()}


def project_info(redis, project: str | int, settings: Settings | None = None) -> dict:
    """What webhooks told about the project (``label_config``, ``title``)."""
    raw = redis.hgetall(keys_for(settings).project(str(project)))
    return {k.decode(): v.decode() for k, v in raw.items()}


def training_state(redis, project: str | int, settings: Settings | None = None) -> dict:
    """The pending trigger, the training lock holder, the recent job ids of a project, the
    events in its stream (not yet folded) and the annotations of its snapshot."""
    settings = settings or get_settings()
    keys = keys_for(settings)
    project = str(project)
    pending = {k.decode(): v.decode() for k, v in redis.hgetall(keys.pending(project)).items()}
    lock = redis.get(keys.lock(project))
    folded = redis.hget(keys.state(project), "annotations")
    return {
        "project": project,
        "pending": pending or None,
        "running": json.loads(lock) if lock else None,
        "events": redis.xlen(keys.events(project)),
        "folded_annotations": int(folded or 0),
        "jobs": [j.decode() for j in redis.lrange(keys.jobs(project), 0, 19)],
    }


def known_projects(redis, settings: Settings | None = None) -> list[str]:
    return sorted(p.decode() for p in redis.smembers(keys_for(settings).projects))
