"""``extract_features`` (``cpu`` queue): newly imported tasks' features into the shared
feature cache, so the next training encodes nothing."""

from __future__ import annotations

from backend.errors import SemlabelError
from backend.settings import get_settings

from .progress import Progress
from .runtime import runtime


def extract_features(project: str | int, tasks: list[dict]) -> dict:
    """``cpu`` queue: compute newly imported tasks' features into the shared feature cache."""
    from rq import get_current_job

    settings = get_settings()
    progress = Progress(get_current_job())
    rt = runtime(settings)
    sources, ids = [], []
    for task in tasks:
        source = _task_image(task)
        if source:
            sources.append(source)
            ids.append(task.get("id"))
    progress("features", tasks=len(tasks), images=len(sources))
    feats = rt.features_for(sources, ids, progress=False) if sources else []
    errors = [str(f) for f in feats if isinstance(f, SemlabelError)]
    progress("done", computed=rt.features.computed, cached=rt.features.hits, errors=errors[:20])
    return {"project": str(project), "images": len(sources), "errors": len(errors),
            "computed": rt.features.computed, "cached": rt.features.hits}


def _task_image(task: dict) -> str | None:
    data = task.get("data") or {}
    try:
        from worker.training.data import task_image

        return task_image(task)
    except Exception:  # noqa: BLE001 - fall back to the first string value that looks like an image
        for value in data.values():
            if isinstance(value, str) and value:
                return value
    return None
