"""The worker process's :class:`~backend.runtime.Runtime`: the backbone loaded once (in the
parent before forking, when the device allows) and shared by every job."""

from __future__ import annotations

import logging
import threading
import time

from backend.settings import Settings, get_settings

log = logging.getLogger(__name__)

_RUNTIME = None
_RUNTIME_LOCK = threading.Lock()


def label_studio(settings: Settings):
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
            _RUNTIME = Runtime.create(settings, label_studio=label_studio(settings),
                                      local_roots=settings.images.local_roots)
        return _RUNTIME


def preload(settings: Settings | None = None) -> None:
    """Load the backbone in the worker's parent process so every forked job shares it."""
    started = time.perf_counter()
    rt = runtime(settings)
    log.warning("worker: backbone %s loaded in %.1f s (shared by every job)", rt.backbone.name,
                time.perf_counter() - started)
