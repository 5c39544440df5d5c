"""What a job writes into ``job.meta`` (readable with ``rq info`` and ``semlabel models
status``): its stage and progress, and the one-line reason of each failure."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

log = logging.getLogger(__name__)


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


def note_failure(job, reason: str, kept: int) -> None:
    """Keep a failure's one-line reason in ``job.meta`` (``error`` and the newest ``kept`` in
    ``failures``, ``worker.failures_kept``), also when RQ retries the job and keeps no result
    of the failed attempt."""
    try:
        meta = job.get_meta(refresh=True)
    except Exception:  # noqa: BLE001
        meta = job.meta
    failures = [*(meta.get("failures") or []), {"ts": time.time(), "error": reason[:500]}][-kept:]
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
    from backend.settings import get_settings

    note_failure(job, reason + retry, get_settings().worker.failures_kept)
