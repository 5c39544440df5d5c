"""The per-project event log in Redis: append, read, fold and trim.

:func:`record_webhook` appends a parsed webhook's events (:mod:`.webhook`) to the project's
Redis stream and applies the trigger policy (:mod:`.debounce`) in the same Redis transaction,
so an event is never stored without being covered by a training job, and none is counted
twice. Every event has an identity (``eid``); the project's recent identities are checked in
the same transaction, so an event received twice — a disk-spool replay (:mod:`.spool`), a
resend — is stored once. The review jobs of the webhook are appended to the review stream in
that transaction too.

The worker's side: a training job claims the pending job record and the log up to its end
(:func:`~.debounce.claim_pending`), reads the project's annotations (:func:`read_state`: the snapshot
plus the events since), then folds what it read into the snapshot and trims it from the
stream (:func:`compact_events`). Every key is named in :mod:`backend.redis.keys`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis as _redis

from ..errors import InvalidWebhook
from ..redis.keys import keys_for
from ..sections import RedisSettings
from ..settings import Settings, get_settings
from . import contract
from .debounce import Trigger, schedule
from .webhook import START_TRAINING, TASK_CREATE, TRAINING_ACTIONS, WebhookEvent, as_id, compact_json, parse_webhook

log = logging.getLogger(__name__)


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


def _task_room(pipe, key: str, mapping: dict[str, str], limits: RedisSettings) -> dict[str, str]:
    """The part of ``mapping`` (task id → data) the project's tasks hash takes without growing
    past ``limits.max_remembered_tasks`` entries: updates of tasks it has, new ones while there
    is room."""
    cap = limits.max_remembered_tasks
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
                        f"{len(ids) - len(out)} new task(s) not remembered", limits.warn_interval_s)
    return out


_WARNED: dict[str, float] = {}


def _warn_once(key: str, message: str, every_s: float) -> None:
    """A warning at most every ``every_s`` per ``key`` (a full hash must not flood the log)."""
    now = time.monotonic()
    if now - _WARNED.get(key, -1e9) >= every_s:
        _WARNED[key] = now
        log.warning("%s", message)


# ------------------------------------------------------------------------------- append
def _dedup(pipe, seen: str, event: WebhookEvent) -> list[dict]:
    """The events of ``event`` whose identity the project's recent-events set does not hold."""
    eids = list(dict.fromkeys(e["eid"] for e in event.events))
    known = set()
    if eids:
        known = {eid for eid, score in zip(eids, pipe.zmscore(seen, eids)) if score is not None}
    fresh = []
    for fields in event.events:
        if fields["eid"] not in known:
            known.add(fields["eid"])
            fresh.append(fields)
    return fresh


def _append(redis, p, event: WebhookEvent, fresh: list[dict], tasks: dict[str, str], settings: Settings,
            also: tuple | list) -> None:
    """Queue the writes of one webhook in the transaction ``p``."""
    keys, limits, project = keys_for(settings), settings.redis, event.project
    p.sadd(keys.projects, project)
    if event.project_info:
        p.hset(keys.project(project), mapping=event.project_info)
    if tasks:
        p.hset(keys.tasks(project), mapping=tasks)
    gone = [e["task_id"] for e in fresh if e["action"] == "task_deleted"]
    if gone:
        p.hdel(keys.tasks(project), *gone)
    for fields in fresh:
        p.xadd(keys.events(project), fields)
    if fresh:
        now = time.time()
        seen = keys.seen(project)
        p.zadd(seen, {e["eid"]: now for e in fresh})
        p.zremrangebyscore(seen, "-inf", now - limits.dedup_ttl_s)
        p.zremrangebyrank(seen, 0, -(limits.dedup_window + 1))
    if fresh or not event.events:  # duplicates queue no review job again
        for job in event.review_jobs:
            p.xadd(keys.review, {"job": json.dumps(job, separators=(",", ":"), default=str), "ts": event.received})
        for key, fields in also:  # written by an older version into the disk spool
            p.xadd(key, fields)
    if event.action in TASK_CREATE and tasks and settings.worker.prefetch_features:
        contract.enqueue_features(redis, p, project, tasks, settings)


def record_webhook(redis, payload: Any, settings: Settings | None = None, *,
                   also: tuple | list = ()) -> WebhookResult:
    """Persist (before returning) and act on one Label Studio webhook.

    ``payload``: a :class:`~.webhook.WebhookEvent` (or the JSON payload, parsed here). Its
    events whose identity the project's recent-events set already holds are not stored again
    (``duplicates``), so a replay or a resend is a no-op; its review jobs are appended to the
    review stream unless every event was a duplicate. Raises
    :class:`~backend.errors.InvalidWebhook` (nothing stored) for a payload it cannot use,
    :class:`redis.RedisError` when Redis fails (nothing stored: one transaction).
    """
    settings = settings or get_settings()
    event = payload if isinstance(payload, WebhookEvent) else parse_webhook(payload, settings)
    if event.project is None:
        return WebhookResult(event.action, None, ignored=True, reason=f"{event.action} is not used")
    keys, project = keys_for(settings), event.project
    seen = keys.seen(project)
    result = WebhookResult(event.action, project)

    def prepare(pipe):
        fresh = _dedup(pipe, seen, event)
        result.duplicates, result.stored = len(event.events) - len(fresh), len(fresh)
        tasks = _task_room(pipe, keys.tasks(project), event.task_data, settings.redis)
        return len(fresh), lambda p: _append(redis, p, event, fresh, tasks, settings, also)

    if event.action == START_TRAINING:
        result.training = schedule(redis, project, settings, Trigger("START_TRAINING", urgent=True),
                                   prepare=prepare, watch=(seen,))
        result.reason = "training requested"
    elif event.action in TRAINING_ACTIONS:
        result.training = schedule(redis, project, settings, Trigger(event.action), prepare=prepare, watch=(seen,))
        result.reason = (f"{result.stored} event(s) recorded" if result.stored
                         else f"{result.duplicates} event(s) already recorded")
    else:
        _write_only(redis, seen, prepare)
        result.reason = "task data recorded" if event.action in TASK_CREATE else "project information recorded"
    return result


def _write_only(redis, seen: str, prepare) -> None:
    """The writes of a webhook that triggers no training, in one transaction."""
    with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(seen)
                _, writes = prepare(pipe)
                pipe.multi()
                writes(pipe)
                pipe.execute()
                return
            except _redis.WatchError:
                continue


# ------------------------------------------------------------------------- reading
def read_events(redis, project: str | int, settings: Settings | None = None, upto: str | None = None,
                after: str | None = None) -> list[dict]:
    """The project's events in the stream, in order (after stream id ``after``, up to and
    including ``upto``), decoded. Events folded into the snapshot are no longer there."""
    settings = settings or get_settings()
    key = keys_for(settings).events(str(project))
    out = []
    start = f"({after}" if after else "-"
    while True:
        batch = redis.xrange(key, min=start, max=upto or "+", count=settings.redis.read_batch)
        if not batch:
            break
        for sid, fields in batch:
            event = {k.decode(): v.decode() for k, v in fields.items()}
            event["id"] = sid.decode()
            out.append(event)
        if len(batch) < settings.redis.read_batch:
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
                tid = as_id(task.get("id"), "task id")
            except InvalidWebhook:
                continue
            text = compact_json(task["data"])
            if len(text) <= limits.max_task_data_kb * 1024:
                mapping[tid] = text
    if not mapping:
        return 0
    key = keys_for(settings).tasks(str(project))
    room = _task_room(redis, key, mapping, limits)
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


def known_projects(redis, settings: Settings | None = None) -> list[str]:
    return sorted(p.decode() for p in redis.smembers(keys_for(settings).projects))
