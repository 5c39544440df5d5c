"""Label Studio webhooks: persist them, and keep the webhook authenticated.

:func:`handle_webhook` is the whole of ``POST /webhook`` after the payload was parsed once
(:func:`backend.queue.webhook.parse_webhook`): the event and its review jobs (:mod:`.review`)
go to Redis through :func:`backend.queue.eventlog.record_webhook` (persisted and debounced into
a training job on the RQ ``gpu`` queue before it returns, ~2 ms) — or, when Redis does not
answer within ``redis.webhook_timeout_s``, into the disk spool of :mod:`backend.queue.spool`,
replayed in order when it answers. Label Studio waits one second for the answer; nothing here
waits on a model or on a Redis that is away.

Basic auth and webhooks: Label Studio sends its webhooks **without** the ML backend's
credentials (only ``START_TRAINING`` carries them). semlabel does not exempt ``/webhook`` from
basic auth — an unauthenticated webhook could inject annotations into training — so when basic
auth is on, :class:`WebhookAuth` adds the ``Authorization`` header to the project's webhook in
Label Studio itself, right after Label Studio calls ``/setup`` (it does when the model is
connected, before any annotation can be sent).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from urllib.parse import urlparse

from ..queue.webhook import START_TRAINING, WebhookEvent, metric_action
from . import metrics

log = logging.getLogger(__name__)


def handle_webhook(service, event: WebhookEvent) -> dict:
    """Record one parsed webhook (in Redis — or, when Redis does not answer within
    ``redis.webhook_timeout_s``, in the disk spool: ``spooled``, replayed in order later)
    together with its review jobs, in one transaction. Raises
    :class:`~backend.queue.spool.SpoolFull` (nothing stored)."""
    result = service.events.record(event)
    out = result.to_dict()
    if result.ignored:
        return out
    queued = result.stored > 0 or not event.events  # duplicates queue no review job again
    out["review_jobs"] = [{"kind": j["kind"], "annotation": (j.get("annotation") or {}).get("id"),
                           "annotation_ids": j.get("annotation_ids")} for j in event.review_jobs] if queued else []
    if result.training and event.action == START_TRAINING:
        out["job"] = result.training.get("job_id")  # Label Studio records it as the train job
    return out


class WebhookAuth:
    """Makes the project's Label Studio webhook send this backend's basic-auth header.

    After ``/setup`` (which Label Studio sends with the credentials and the project creator's
    token), a background thread lists the project's webhooks and, for each one pointing at this
    backend (same host and port as the ``/setup`` request, path ending in ``/webhook``), sets the
    ``Authorization`` header. Retried a few times (the webhook is created while Label Studio is
    still connecting the model), then again on a later ``/setup``; done once per project and
    credential. ``api`` is the settings' ``backend.label_studio_api`` (per-call timeout, delays
    between attempts, how long a failed registration is not retried).
    """

    def __init__(self, header: str, api):
        self.header = header
        self.api = api
        self._done: set[tuple] = set()
        self._running: set[tuple] = set()
        self._failed_at: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def ensure(self, project: str | None, conn, host: str) -> threading.Thread | None:
        if project is None or conn is None or not conn.api_key or not host:
            return None
        key = (project, conn.url, host.lower(), hashlib.sha256(self.header.encode()).hexdigest()[:12])
        with self._lock:
            if key in self._done or key in self._running:
                return None
            if time.monotonic() - self._failed_at.get(key, -1e9) < self.api.failure_backoff_s:
                return None
            self._running.add(key)
        thread = threading.Thread(target=self._run, args=(key, project, conn, host), daemon=True,
                                  name="semlabel-webhook-auth")
        thread.start()
        return thread

    def _run(self, key, project, conn, host) -> None:
        ok = False
        try:
            for delay in self.api.retry_delays_s:
                time.sleep(delay)
                try:
                    if self.patch(project, conn, host):
                        ok = True
                        break
                except Exception as exc:  # noqa: BLE001 - logged, retried
                    log.warning("project %s: cannot set the webhook's credentials in Label Studio (%s: %s)",
                                project, type(exc).__name__, str(exc)[:200])
        finally:
            with self._lock:
                self._running.discard(key)
                if ok:
                    self._done.add(key)
                else:
                    self._failed_at[key] = time.monotonic()
        if not ok:
            log.error(
                "project %s: found no Label Studio webhook for this backend to add its basic-auth "
                "header to; annotation webhooks will be refused with 401. Set it by hand: "
                "PATCH /api/webhooks/<id> {\"headers\": {\"Authorization\": \"Basic ...\"}}", project)

    def patch(self, project: str, conn, host: str) -> bool:
        """One attempt; True when at least one webhook of this backend now sends the header.
        Through label-studio-sdk's webhooks client, on a client that never follows a
        redirect: the token goes to Label Studio's address only."""
        from label_studio_sdk.client import LabelStudio
        from label_studio_sdk.core.api_error import ApiError

        client = LabelStudio(base_url=conn.url, api_key=conn.api_key, timeout=self.api.timeout_s, follow_redirects=False,
                             max_retries=0)
        try:
            hooks = client.webhooks.list(project=str(project))
        except ApiError as exc:
            raise RuntimeError(f"GET /api/webhooks answered {exc.status_code}") from None
        found = False
        for hook in hooks:
            url = urlparse(str(hook.url or ""))
            if url.netloc.lower() != host.lower() or not url.path.rstrip("/").endswith("/webhook"):
                continue
            found = True
            current = dict(hook.headers or {})
            if current.get("Authorization") == self.header:
                continue
            current["Authorization"] = self.header
            try:
                client.webhooks.update(int(hook.id), headers=current)
            except ApiError as exc:
                raise RuntimeError(f"PATCH /api/webhooks/{hook.id} answered {exc.status_code}") from None
            log.warning("project %s: Label Studio webhook %s now sends this backend's basic-auth header",
                        project, hook.id)
        return found


def count(action: str, outcome: str) -> None:
    """Count a webhook by its action (a metric label, see :func:`~backend.queue.webhook.metric_action`)."""
    metrics.WEBHOOKS.labels(metric_action(action), outcome).inc()
