"""``extract_features`` (``cpu`` queue): newly imported tasks' features into the shared
feature cache, so the next training encodes nothing."""

from __future__ import annotations

import logging

from backend.errors import SemlabelError
from backend.settings import Settings, get_settings

from .progress import Progress
from .runtime import runtime

log = logging.getLogger(__name__)


def extract_features(project: str | int, tasks: list[dict]) -> dict:
    """``cpu`` queue: compute newly imported tasks' features into the shared feature cache.

    The image of a task is found as training finds it (:func:`worker.training.data.task_image`):
    the data key the project's label config binds the ``<Image>`` to (as webhooks stored it),
    else the usual keys (``image``, ``img``, ``url``, ``image_url``) or the task's only string."""
    from rq import get_current_job

    from worker.training.data import task_image

    settings = get_settings()
    job = get_current_job()
    progress = Progress(job)
    rt = runtime(settings)
    field = image_field(job.connection, project, settings) if job is not None else None
    sources, ids = [], []
    for task in tasks:
        source = task_image(task, field)  # the rule training reads images by
        if source:
            sources.append(source)
            ids.append(task.get("id"))
    progress("features", tasks=len(tasks), images=len(sources), image_field=field)
    feats = rt.features_for(sources, ids, progress=False) if sources else []
    errors = [str(f) for f in feats if isinstance(f, SemlabelError)]
    progress("done", computed=rt.features.computed, cached=rt.features.hits, errors=errors[:20])
    return {"project": str(project), "images": len(sources), "errors": len(errors),
            "computed": rt.features.computed, "cached": rt.features.hits, "image_field": field}


def image_field(redis, project: str | int, settings: Settings) -> str | None:
    """The task data key of the project's ``<Image>`` (from the label config webhooks
    stored), or None when no usable config is stored."""
    from backend.queue.eventlog import project_info
    from worker.training.data import label_config_binding

    xml = project_info(redis, project, settings).get("label_config")
    if not xml:
        return None
    try:
        return label_config_binding(xml).data_key
    except SemlabelError as exc:
        log.warning("project %s: stored label config not usable for features (%s); guessing the image key",
                    project, exc)
        return None

