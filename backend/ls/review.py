"""Review predictions after submit, computed off the webhook's 1-second path.

``/webhook`` answers at once; for ``ANNOTATION_CREATED``/``ANNOTATION_UPDATED`` it also appends a
*review job* (made by :func:`backend.queue.webhook.parse_webhook`) to the Redis stream
``<prefix>:review``, in the transaction of :func:`backend.queue.eventlog.record_webhook` that
persists the event itself. Every backend process drains that stream in a background thread
through one consumer group, so:

- a job is in Redis before the webhook answers — a backend that is down or restarting loses
  nothing: the stream waits for the next process;
- each job is handled by one process; a job whose process died before acknowledging it is
  claimed by another after ``backend.review.retry_after_s`` (``XAUTOCLAIM``);
- a job that fails (Label Studio unreachable, image unreadable) is retried at the same pace, at
  most ``backend.review.max_attempts`` times, then dropped with an error line (and counted in
  ``semlabel_review_jobs_total{outcome="failed"}``).

Handling a job: the annotation's chosen labels → suggestions of the served model → a prediction
stored through label-studio-sdk (score = P(something missing)), replacing the previous review
prediction of the same annotation. ``ANNOTATIONS_DELETED`` queues a job that removes the review
predictions of the deleted annotations.

Where the reviewer finds them in Label Studio: :mod:`.review_store`.

The backend computes these itself (not an RQ job): it already holds the model and the task's
cached features, and review predictions must not wait behind hour-long trainings on the ``gpu``
queue.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any, Mapping

import redis as _redis

from ..errors import ConfigError, ImageError
from ..redis.keys import keys_for
from . import metrics
from .review_store import ensure_review_tab, remove_review_predictions, store_review_prediction

log = logging.getLogger(__name__)

GROUP = "semlabel-backend"


class PermanentFailure(Exception):
    """A job retrying cannot fix."""


class ReviewQueue:
    """The durable review-job stream and this process's consumer (see the module doc)."""

    def __init__(self, service, *, block_ms: int = 1000):
        self.service = service
        self.settings = service.settings
        self.cfg = service.settings.backend.review
        self.key = keys_for(service.settings).review
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{id(self) & 0xffff:x}"
        self.block_ms = block_ms
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._group_ready = False
        self.handled = 0

    # -- producer ----------------------------------------------------------------------
    def push(self, redis, jobs: list[dict]) -> list[str]:
        """Append jobs to the stream (one round trip). Raises redis errors to the caller."""
        if not jobs:
            return []
        pipe = redis.pipeline(transaction=True)
        now = f"{time.time():.6f}"
        for job in jobs:
            pipe.xadd(self.key, {"job": json.dumps(job, separators=(",", ":"), default=str), "ts": now})
        return [i.decode() if isinstance(i, bytes) else i for i in pipe.execute()]

    # -- consumer ----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="semlabel-review", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _ensure_group(self, redis) -> None:
        if self._group_ready:
            return
        try:
            redis.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except _redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _run(self) -> None:
        delay = 1.0
        last_claim = 0.0
        while not self._stop.is_set():
            redis = self.service.redis
            if redis is None or not self.service.ready:
                self._stop.wait(1.0)
                continue
            try:
                self._ensure_group(redis)
                if time.monotonic() - last_claim >= min(self.cfg.claim_interval_s, self.cfg.retry_after_s):
                    last_claim = time.monotonic()
                    self.claim_stale(redis)
                batch = redis.xreadgroup(GROUP, self.consumer, {self.key: ">"}, count=self.cfg.read_batch, block=self.block_ms)
                for _, messages in batch or []:
                    for message_id, fields in messages:
                        self.handle(redis, message_id, fields)
                delay = 1.0
            except Exception as exc:  # noqa: BLE001 - Redis may come and go
                if self._stop.is_set():
                    break
                self._group_ready = False
                log.warning("review queue: %s: %s; retrying in %.0f s", type(exc).__name__, exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self.cfg.max_backoff_s)

    def claim_stale(self, redis) -> int:
        """Take over jobs delivered more than ``retry_after_s`` ago and not acknowledged (a
        failed attempt, or a process that died) and handle them now."""
        idle_ms = int(self.cfg.retry_after_s * 1000)
        start = "0-0"
        n = 0
        while True:
            reply = redis.xautoclaim(self.key, GROUP, self.consumer, idle_ms, start_id=start, count=self.cfg.claim_batch)
            start, messages = reply[0], reply[1]
            for message_id, fields in messages:
                if fields:
                    self.handle(redis, message_id, fields)
                    n += 1
            if not messages or start in (b"0-0", "0-0"):
                return n

    def drain(self, redis, timeout: float = 30.0) -> int:
        """Handle what is waiting now in this thread (tests, ``semlabel`` tools)."""
        self._ensure_group(redis)
        deadline = time.monotonic() + timeout
        n = 0
        while time.monotonic() < deadline:
            batch = redis.xreadgroup(GROUP, self.consumer, {self.key: ">"}, count=self.cfg.claim_batch, block=100)
            if not batch or not batch[0][1]:
                break
            for message_id, fields in batch[0][1]:
                self.handle(redis, message_id, fields)
                n += 1
        return n

    def _attempts(self, redis, message_id) -> int:
        info = redis.xpending_range(self.key, GROUP, min=message_id, max=message_id, count=1)
        return int(info[0]["times_delivered"]) if info else 1

    def handle(self, redis, message_id, fields) -> str:
        """Run one job; acknowledge it unless it should be retried. Returns the outcome."""
        raw = fields.get(b"job") or fields.get("job")
        outcome = "failed"
        try:
            job = json.loads(raw)
            outcome = self.run_job(job)
        except PermanentFailure as exc:
            log.error("review job %s dropped: %s", _s(message_id), exc)
        except Exception as exc:  # noqa: BLE001 - retried, then dropped
            attempts = self._attempts(redis, message_id)
            if attempts < self.cfg.max_attempts:
                log.warning("review job %s failed (attempt %d of %d, retried in %.0f s): %s: %s",
                            _s(message_id), attempts, self.cfg.max_attempts, self.cfg.retry_after_s,
                            type(exc).__name__, exc)
                metrics.REVIEWS.labels("retried").inc()
                return "retried"
            log.error("review job %s dropped after %d attempts: %s: %s", _s(message_id), attempts,
                      type(exc).__name__, exc)
        pipe = redis.pipeline(transaction=True)
        pipe.xack(self.key, GROUP, message_id)
        pipe.xdel(self.key, message_id)
        pipe.execute()
        metrics.REVIEWS.labels(outcome).inc()
        self.handled += 1
        return outcome

    # -- the work ----------------------------------------------------------------------
    def run_job(self, job: Mapping[str, Any]) -> str:
        kind = job.get("kind")
        if kind == "review":
            return self._review(job)
        if kind == "delete":
            return self._delete(job)
        raise PermanentFailure(f"unknown job kind {kind!r}")

    def _client(self, project: str):
        conn = self.service.connections.get(project)
        if conn is None or not conn.api_key:
            raise RuntimeError(
                f"no Label Studio host/token for project {project} yet (LABEL_STUDIO_URL and "
                "LABEL_STUDIO_API_KEY, or a /setup call from Label Studio)"
            )
        return conn.client

    def _review(self, job: Mapping[str, Any]) -> str:
        project = str(job["project"])
        ann = job.get("annotation") or {}
        ann_id = ann.get("id")
        task_id = job.get("task_id")
        if ann_id is None or task_id is None:
            raise PermanentFailure("a review job without annotation or task id")
        redis = self.service.redis
        stamp = str(ann.get("updated_at") or ann.get("created_at") or "")
        seen_key = keys_for(self.settings).review_seen(project)
        if stamp and redis is not None:
            last = redis.hget(seen_key, str(ann_id))
            if last is not None and last.decode() > stamp:
                return "skipped"  # a newer edit of this annotation was already reviewed
        client = self._client(project)
        xml = job.get("label_config")
        if not xml:
            xml = client.projects.get(id=int(project)).label_config
        data = job.get("task_data")
        if not isinstance(data, Mapping):
            data = client.tasks.get(id=int(task_id)).data
        task = {"id": int(task_id), "data": data}
        try:
            entry = self.service.predictions.review(project, self.service.configs.get(xml), task, ann)
        except (ConfigError, ImageError) as exc:
            if isinstance(exc, ConfigError):
                raise PermanentFailure(f"project {project}: {exc}") from exc
            raise
        created = store_review_prediction(client, int(task_id), int(ann_id), entry, project=int(project),
                                          live=self.cfg.live_version, live_ttl_s=self.cfg.live_version_ttl_s)
        if created is not None and self.cfg.tab:
            ensure_review_tab(client, int(project), self.cfg.tab)
        if created is None:
            outcome = "skipped"
        else:
            log.info("project %s task %s: review prediction %s (P(missing) %.3f)", project, task_id,
                     created, entry["score"])
            outcome = "stored"
        if redis is not None:
            pipe = redis.pipeline(transaction=False)
            pipe.hset(keys_for(self.settings).review_annotations(project), str(ann_id), str(task_id))
            if stamp:
                pipe.hset(seen_key, str(ann_id), stamp)
            pipe.execute()
        return outcome

    def _delete(self, job: Mapping[str, Any]) -> str:
        project = str(job["project"])
        redis = self.service.redis
        key = keys_for(self.settings).review_annotations(project)
        targets = []
        for ann_id in job.get("annotation_ids") or []:
            task = redis.hget(key, str(ann_id)) if redis is not None else None
            if task is not None:
                targets.append((int(ann_id), int(task)))
        if not targets:
            return "skipped"
        client = self._client(project)
        removed = 0
        for ann_id, task_id in targets:
            removed += remove_review_predictions(client, task_id, ann_id)
            if redis is not None:
                redis.hdel(key, str(ann_id))
        log.info("project %s: removed %d review prediction(s) of deleted annotations", project, removed)
        return "deleted"


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
