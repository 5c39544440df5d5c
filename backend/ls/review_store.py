"""Review predictions in Label Studio: stored, replaced and removed through label-studio-sdk,
and the Data Manager tab the reviewer works from.

**Where the reviewer finds them.** Label Studio 1.23's Data Manager shows and sorts the
*Prediction score* of the predictions whose model_version equals the project's model-version
setting — which, while the project uses the connected backend live (the default after
*Connect model*), is the backend's *title*, a version no pre-annotation carries. So with
``backend.review.live_version`` the review prediction takes that title as its model_version:
the score column shows P(missing) for reviewed tasks only, annotators' pre-labelling is
untouched (Label Studio pre-labels with the served version's predictions). Otherwise (a project
set to a stored version) it is ``backend.review.model_version``. The backend also adds a Data
Manager tab ``backend.review.tab`` to the project — annotated tasks, *Prediction score* shown,
highest first — so the queue is one click away.
"""

from __future__ import annotations

import logging
import time
from typing import Mapping

log = logging.getLogger(__name__)


def _review_metas(pred) -> list[Mapping]:
    """The ``meta`` of a prediction's review regions (``kind: review``)."""
    metas = (item.get("meta") for item in pred.result or [] if isinstance(item, Mapping))
    return [m for m in metas if isinstance(m, Mapping) and m.get("kind") == "review"]


def remove_review_predictions(client, task_id: int, ann_id: int, superseded_version: str | None = None) -> int:
    """Delete, in one listing of the task's predictions (label-studio-sdk client), the review
    predictions of annotation ``ann_id`` and — with ``superseded_version`` — the task's other
    non-review predictions of that model version (the pre-annotation an annotation has
    superseded). Returns how many were deleted."""
    removed = 0
    for pred in client.predictions.list(task=task_id):
        metas = _review_metas(pred)
        mine = any(m.get("annotation_id") == ann_id for m in metas)
        superseded = (superseded_version is not None and not metas
                      and getattr(pred, "model_version", None) == superseded_version)
        if mine or superseded:
            client.predictions.delete(id=pred.id)
            removed += 1
    return removed


def store_review_prediction(client, task_id: int, ann_id: int, entry: Mapping | None,
                            project: int | None = None, live: bool = True, *,
                            live_ttl_s: float) -> int | None:
    """Replace the annotation's review prediction by ``entry`` (only remove it when ``None``).
    With ``live`` the prediction takes the project's live model version (see the module doc;
    read again from Label Studio after ``live_ttl_s``, ``backend.review.live_version_ttl_s``);
    ``entry["model_version"]`` is set to the version stored. Returns the new prediction's id."""
    if entry is None:
        remove_review_predictions(client, task_id, ann_id)
        return None
    extra = {"project": int(project)} if project is not None else {}
    version = entry["model_version"]
    superseded = None
    if live and project is not None:
        version = live_model_version(client, int(project), live_ttl_s) or version
        entry["model_version"] = version
        # The Data Manager's score column averages the task's predictions of the live version:
        # the pre-annotation the annotation has superseded would blur P(missing) there.
        superseded = version
    remove_review_predictions(client, task_id, ann_id, superseded_version=superseded)
    created = client.predictions.create(
        task=task_id, result=entry["result"], score=entry["score"],
        model_version=version, mislabeling=entry["score"], **extra,
    )
    return getattr(created, "id", None)


_LIVE: dict[tuple[int, int], tuple[float, str | None]] = {}
_TABS: set[tuple[int, int, str]] = set()


def live_model_version(client, project: int, ttl_s: float) -> str | None:
    """The project's model-version setting when it names one of its ML backends (Label Studio
    then pre-labels live from that backend and the Data Manager's score column reads
    predictions of that name), else None. Cached for ``ttl_s`` seconds per client."""
    key = (id(client), project)
    hit = _LIVE.get(key)
    if hit is not None and time.monotonic() - hit[0] < ttl_s:
        return hit[1]
    setting = client.projects.get(id=project).model_version or ""
    titles = {getattr(ml, "title", None) for ml in client.ml.list(project=project) or []}
    value = setting if setting and setting in titles else None
    _LIVE[key] = (time.monotonic(), value)
    return value


def review_tab_data(title: str) -> dict:
    """A Data Manager tab: annotated tasks, most likely missing labels first (Label Studio 1.23
    view format)."""
    return {
        "title": title,
        "type": "list",
        "target": "tasks",
        "ordering": ["-tasks:predictions_score"],
        "filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0}]},
        "hiddenColumns": {
            "explore": ["tasks:inner_id", "tasks:annotations_results", "tasks:annotations_ids",
                        "tasks:predictions_model_versions", "tasks:predictions_results", "tasks:file_upload",
                        "tasks:storage_filename", "tasks:created_at", "tasks:updated_at", "tasks:updated_by",
                        "tasks:avg_lead_time", "tasks:draft_exists", "tasks:comment_count",
                        "tasks:unresolved_comment_count", "tasks:last_comment_updated_at", "tasks:comment_authors"],
            "labeling": ["tasks:id", "tasks:inner_id", "tasks:completed_at", "tasks:cancelled_annotations",
                         "tasks:total_predictions", "tasks:annotators", "tasks:annotations_results",
                         "tasks:annotations_ids", "tasks:predictions_score", "tasks:predictions_model_versions",
                         "tasks:predictions_results", "tasks:file_upload", "tasks:storage_filename",
                         "tasks:created_at", "tasks:updated_at", "tasks:updated_by", "tasks:avg_lead_time",
                         "tasks:draft_exists"],
        },
    }


def ensure_review_tab(client, project: int, title: str) -> bool:
    """Add the reviewer's tab to the project's Data Manager unless a tab of that title exists
    (checked once per process). Returns whether one was created."""
    key = (id(client), project, title)
    if key in _TABS:
        return False
    wrapper = client._client_wrapper  # the SDK's typed view models lag the Data Manager's format
    views = wrapper.httpx_client.request("api/dm/views/", method="GET", params={"project": project})
    views.raise_for_status()
    if any((v.get("data") or {}).get("title") == title for v in views.json()):
        _TABS.add(key)
        return False
    made = wrapper.httpx_client.request("api/dm/views/", method="POST",
                                        json={"project": project, "data": review_tab_data(title)})
    made.raise_for_status()
    _TABS.add(key)
    log.info("project %s: added the Data Manager tab %r (annotated tasks, most likely missing first)",
             project, title)
    return True
