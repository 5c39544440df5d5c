"""The trigger policy: one pending training job per project, and when it is due.

- ``START_TRAINING`` — train now;
- ``ANNOTATION(S)_CREATED`` / ``ANNOTATION_UPDATED`` / ``ANNOTATION(S)_DELETED`` /
  ``TASK(S)_DELETED`` — train once ``worker.debounce.annotations`` events have arrived, or after
  ``worker.debounce.quiet_s`` seconds without a new one (each event pushes that back), but no
  later than ``worker.debounce.max_wait_s`` after the first untrained event;
- ``PROJECT_UPDATED`` / ``PROJECT_CREATED`` / ``TASK(S)_CREATED`` — recorded, no training.

Each project has at most one *pending* training job (RQ job id ``train-<project>-<stamp>``,
recorded in the hash :meth:`Keys.pending <backend.redis.keys.Keys.pending>` with its due
time). It waits in RQ's ScheduledJobRegistry until its due time (the worker's scheduler
enqueues it) or sits in the queue; more events only move its due time, through the
registry's public ``schedule`` while the job is still ``scheduled`` (its key is WATCHed, so
the scheduler queueing it meanwhile retries the transaction). When a worker starts it, the
job *claims* the pending record (:func:`claim_pending`); events after
that create the next pending job. So a project has at most one queued and one running
training, and every event is trained on by the job that claimed it or by the next one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

import redis as _redis

from ..redis.keys import keys_for
from ..settings import Settings, get_settings
from . import contract
from .webhook import as_id

# RQ statuses of a pending job that can still pick up more events.
_WAITING = {b"scheduled", b"queued", b"deferred"}


@dataclass
class Trigger:
    """What asks for a training: ``count`` new events (0: none), ``urgent`` (train now),
    ``delay_s`` (train in that many seconds), ``exclude_job`` (a job that must not count as
    the pending one: the caller itself)."""

    reason: str
    urgent: bool = False
    count: int = 0
    delay_s: float | None = None
    exclude_job: str | None = None


def _due(trigger: Trigger, state: dict, waiting: bool, now: float, settings: Settings) -> tuple[float, int, bool]:
    """The pending job's due time, its event count and urgency after ``trigger``."""
    deb = settings.worker.debounce
    if waiting:
        first = float(state.get(b"first_ts", now))
        total = int(state.get(b"count", 0)) + trigger.count
        was_urgent = state.get(b"urgent") == b"1"
        old_due = float(state.get(b"due", now))
    else:
        first, total, was_urgent, old_due = now, trigger.count, False, None
    now_urgent = trigger.urgent or total >= deb.annotations
    if trigger.delay_s is not None:
        due = now + trigger.delay_s
    elif now_urgent:
        due = now
    else:
        due = min(now + deb.quiet_s, first + deb.max_wait_s)
    if old_due is not None and (was_urgent or trigger.delay_s is not None):
        # Joining a waiting job never postpones it: not past an urgent due time,
        # nor (with an explicit delay) past the quiet / max_wait_s bound it has.
        due = min(due, old_due)
    return due, total, now_urgent or was_urgent


def _waiting_job(pipe, state: dict, exclude_job: str | None) -> tuple[str | None, bytes | None]:
    """The pending job's id and RQ status, its key WATCHed (``(None, None)``: none)."""
    job_id = (state.get(b"job_id") or b"").decode() or None
    if not job_id or job_id == exclude_job:
        return None, None
    pipe.watch(contract.job_key(job_id))
    return job_id, pipe.hget(contract.job_key(job_id), "status")


def schedule(redis, project: str, settings: Settings, trigger: Trigger, *,
             prepare: Callable | None = None, writes: Callable | None = None,
             watch: tuple[str, ...] = ()) -> dict | None:
    """In one Redis transaction: write the trigger's events and make sure a pending training
    job covers them, creating it or moving its due time (see the module doc).

    ``writes(pipe)`` queues the writes in the transaction. ``prepare(pipe) -> (count, writes)``,
    when given, runs after the keys are watched (``watch`` too) and decides them; a count of 0
    for a non-urgent trigger writes nothing and returns ``None`` (every event was a duplicate)."""
    keys = keys_for(settings)
    pkey = keys.pending(project)
    with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(pkey, *watch)
                if prepare is not None:
                    trigger.count, writes = prepare(pipe)
                    if trigger.count == 0 and not trigger.urgent:
                        pipe.reset()
                        return None
                state = pipe.hgetall(pkey)
                job_id, status = _waiting_job(pipe, state, trigger.exclude_job)
                now = time.time()
                waiting = status in _WAITING
                due, total, urgent = _due(trigger, state, waiting, now, settings)
                pipe.multi()
                if writes is not None:
                    writes(pipe)
                info = {"project": project, "due_at": due, "due_in_s": round(max(0.0, due - now), 3),
                        "pending_events": total, "reason": trigger.reason}
                if waiting:
                    pipe.hset(pkey, mapping={"due": repr(due), "count": total, "urgent": int(urgent),
                                             "last_ts": repr(now)})
                    if status == b"scheduled":  # once queued, it runs as soon as a worker is free
                        contract.reschedule(redis, pipe, job_id, due, settings)
                    info.update(job_id=job_id, coalesced=True)
                else:
                    job_id = contract.new_train_job_id(project)
                    pipe.hset(pkey, mapping={"job_id": job_id, "first_ts": repr(now), "last_ts": repr(now),
                                             "due": repr(due), "count": total, "urgent": int(urgent),
                                             "reason": trigger.reason})
                    pipe.lpush(keys.jobs(project), job_id)
                    pipe.ltrim(keys.jobs(project), 0, settings.worker.jobs_kept - 1)
                    contract.enqueue_training(redis, pipe, project, job_id, due, trigger.reason, settings)
                    info.update(job_id=job_id, coalesced=False)
                pipe.execute()
                return info
            except _redis.WatchError:
                continue


def request_training(redis, project: str | int, settings: Settings | None = None, *, reason: str = "requested",
                     delay_s: float | None = None, exclude_job: str | None = None) -> dict:
    """Make sure a training job for ``project`` runs now (or in ``delay_s``), coalescing with
    the pending one. Used by ``START_TRAINING``, ``semlabel models train`` and by a job that
    finds its project busy (``exclude_job`` = itself)."""
    settings = settings or get_settings()
    project = as_id(project, "project id")

    trigger = Trigger(reason, urgent=delay_s is None, delay_s=delay_s, exclude_job=exclude_job)
    return schedule(redis, project, settings, trigger, writes=lambda p: p.sadd(keys_for(settings).projects, project))


# ----------------------------------------------------------------------- job side
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
        "jobs": [j.decode() for j in redis.lrange(keys.jobs(project), 0, settings.worker.jobs_shown - 1)],
    }
