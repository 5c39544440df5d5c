"""Label Studio's webhook payloads, parsed once at the edge into a typed :class:`WebhookEvent`.

:func:`parse_webhook` is the only reader of a webhook's JSON: the ``/webhook`` route calls it,
and everything after it — the event log (:mod:`.eventlog`), the trigger policy
(:mod:`.debounce`), the disk spool (:mod:`.spool`), the review jobs (:mod:`backend.ls.review`)
and the Prometheus label — reads the typed object. Pure: it touches nothing.

What Label Studio 1.23 sends, and what each action becomes:

- ``ANNOTATION(S)_CREATED`` / ``_UPDATED``: ``annotation`` (or ``annotations``) objects,
  checked against :class:`AnnotationRecord` → one ``annotation`` event each, and a review job
  for each annotation that has a result and was not cancelled;
- ``ANNOTATION(S)_DELETED``: annotation objects or ids → ``annotation_deleted`` events and one
  review job removing their review predictions;
- ``TASK(S)_DELETED``: task objects or ids → ``task_deleted`` events;
- ``TASK(S)_CREATED``: the tasks' ``data`` (remembered, no event);
- ``PROJECT_CREATED`` / ``PROJECT_UPDATED``: the label config → a ``project_updated`` event;
- ``START_TRAINING``: no event (the trigger itself);
- anything else: ignored (``project`` is ``None``), nothing stored.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Annotated, Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import InvalidWebhook
from ..settings import Settings, get_settings

ANNOTATION_UPSERT = frozenset({"ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED",
                               "ANNOTATIONS_UPDATED"})
ANNOTATION_DELETE = frozenset({"ANNOTATION_DELETED", "ANNOTATIONS_DELETED"})
TASK_DELETE = frozenset({"TASK_DELETED", "TASKS_DELETED"})
PROJECT_INFO = frozenset({"PROJECT_UPDATED", "PROJECT_CREATED"})
TASK_CREATE = frozenset({"TASK_CREATED", "TASKS_CREATED"})
START_TRAINING = "START_TRAINING"
TRAINING_ACTIONS = ANNOTATION_UPSERT | ANNOTATION_DELETE | TASK_DELETE
HANDLED = TRAINING_ACTIONS | PROJECT_INFO | TASK_CREATE | {START_TRAINING}

#: Label Studio 1.23's webhook actions. Any other value is counted as "other", so the
#: Prometheus label values stay a fixed, small set whatever a caller sends.
KNOWN_ACTIONS = frozenset({
    "PROJECT_CREATED", "PROJECT_UPDATED", "PROJECT_DELETED", "TASKS_CREATED", "TASKS_DELETED",
    "ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
    "LABEL_LINK_CREATED", "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED", "START_TRAINING",
    "REVIEW_CREATED", "REVIEW_UPDATED", "REVIEWS_DELETED",
})

_MAX_ID = 2**63 - 1


def metric_action(action: Any) -> str:
    """An action as a metric label: a known action, ``"?"`` (none) or ``"other"``."""
    if not action or action == "?":
        return "?"
    action = str(action)[:64].strip().upper()
    return action if action in KNOWN_ACTIONS else "other"


class WebhookEvent(BaseModel):
    """One webhook, parsed: what the event log stores and what the review queue gets.

    ``events``: flat string fields, one ``XADD`` each, every one with its identity ``eid``;
    ``project_info``: ``label_config``, ``title``, ``updated_at`` when sent; ``task_data``: task
    id → data JSON; ``review_jobs``: the review jobs it asks for; ``received``: when it arrived
    (``time.time()``, kept through the disk spool)."""

    action: str
    project: str | None
    events: list[dict[str, str]] = []
    project_info: dict[str, str] = {}
    task_data: dict[str, str] = {}
    review_jobs: list[dict[str, Any]] = []
    received: str = ""

    @property
    def metric_action(self) -> str:
        return metric_action(self.action)


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


# ---------------------------------------------------------------------------------- fields
def as_id(value: Any, what: str) -> str:
    """A Label Studio id (a positive integer, or its decimal string) as a string."""
    if value is None:
        raise InvalidWebhook(f"{what} is missing")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _MAX_ID:
        return str(value)
    raise InvalidWebhook(f"{what} must be a positive integer id, got {value!r}"[:200])


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "value"
    return f"{where}: {err.get('msg', 'invalid')}"[:200]


def _project_id(payload: Mapping) -> str | None:
    """The project id, wherever the payload carries one; every one it carries must be valid."""
    holders = [payload.get("project")]
    holders += [payload[n].get("project") for n in ("annotation", "task") if isinstance(payload.get(n), Mapping)]
    tasks = payload.get("tasks")
    if isinstance(tasks, list) and tasks and isinstance(tasks[0], Mapping):
        holders.append(tasks[0].get("project"))
    found = None
    for value in holders:
        if isinstance(value, Mapping):
            value = value.get("id")
        if value is not None:
            found = found or as_id(value, "project id")
    return found


def _listed(payload: Mapping, singular: str, plural: str) -> list:
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


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str, sort_keys=True)


def _identity(*parts: Any) -> str:
    """An event's identity: the same event received twice (a replay, a resend) has the same."""
    return hashlib.sha256(compact_json(parts).encode()).hexdigest()[:32]


def _project_info(payload: Mapping, limits) -> dict[str, str]:
    pj = payload.get("project")
    if not isinstance(pj, Mapping):
        return {}
    info = {key: pj[key] for key in ("label_config", "title", "updated_at") if isinstance(pj.get(key), str)}
    if len(info.get("label_config", "").encode()) > limits.max_label_config_kb * 1024:
        raise InvalidWebhook(f"the label config is larger than {limits.max_label_config_kb} KB")
    info["title"] = info.get("title", "")[:500]
    if "updated_at" in info:
        info["updated_at"] = info["updated_at"][:64]
    if not info["title"]:
        info.pop("title")
    return info


# ------------------------------------------------------------------------------- actions
class _Parser:
    """The per-action readers of one payload (see the module doc)."""

    def __init__(self, payload: Mapping, event: WebhookEvent, limits):
        self.payload, self.event, self.limits = payload, event, limits
        self.top_task = payload.get("task") if isinstance(payload.get("task"), Mapping) else None

    def task_json(self, data: dict, task_id: str) -> str:
        text = compact_json(data)
        if len(text) > self.limits.max_task_data_kb * 1024:
            raise InvalidWebhook(f"task {task_id}: its data is larger than {self.limits.max_task_data_kb} KB")
        return text

    def _record(self, ann: Mapping) -> tuple[dict, Mapping | None]:
        """The checked annotation record and the task object the payload sent with it."""
        ann_id = as_id(ann.get("id"), "annotation id")
        task = ann.get("task")
        task_obj = task if isinstance(task, Mapping) else self.top_task
        task_id = as_id(task.get("id") if isinstance(task, Mapping) else (
            task if task is not None else (self.top_task or {}).get("id")), "annotation's task id")
        result = ann.get("result")
        result = [] if result is None else result
        if not isinstance(result, list):
            raise InvalidWebhook(f"annotation {ann_id}: 'result' must be a list")
        if len(result) > self.limits.max_result_items:
            raise InvalidWebhook(f"annotation {ann_id}: more than {self.limits.max_result_items} result items")
        try:
            record = AnnotationRecord.model_validate({
                "id": int(ann_id), "task": int(task_id), "result": result,
                "was_cancelled": ann.get("was_cancelled", False), "ground_truth": ann.get("ground_truth", False),
                "completed_by": ann.get("completed_by"), "updated_at": ann.get("updated_at") or ann.get("created_at"),
            }).model_dump()
        except ValidationError as exc:
            raise InvalidWebhook(f"annotation {ann_id}: {_one_line(exc)}") from None
        if task_obj is not None and (str(task_obj.get("id")) != task_id or not isinstance(task_obj.get("data"), dict)):
            task_obj = None
        return record, task_obj

    def upsert(self) -> None:
        annotations = _listed(self.payload, "annotation", "annotations")
        if not annotations:
            raise InvalidWebhook(f"{self.event.action} without an annotation")
        for ann in annotations:
            if not isinstance(ann, Mapping):
                raise InvalidWebhook("an annotation is not an object")
            record, task_obj = self._record(ann)
            ann_id, task_id = str(record["id"]), str(record["task"])
            encoded = json.dumps(record, separators=(",", ":"), default=str)
            if len(encoded) > self.limits.max_event_kb * 1024:
                raise InvalidWebhook(f"annotation {ann_id} is larger than {self.limits.max_event_kb} KB")
            fields = {"action": "annotation", "source": self.event.action, "ts": self.event.received,
                      "annotation_id": ann_id, "task_id": task_id, "annotation": encoded,
                      "eid": _identity("annotation", ann_id, record["updated_at"], record["result"],
                                       record["was_cancelled"], record["ground_truth"])
                      if record["updated_at"] else secrets.token_hex(16)}
            if task_obj is not None:
                fields["task_data"] = self.event.task_data[task_id] = self.task_json(task_obj["data"], task_id)
            self.event.events.append(fields)
            if record["result"] and not record["was_cancelled"]:
                self.event.review_jobs.append(self._review_job(record, task_obj))

    def _review_job(self, record: dict, task_obj: Mapping | None) -> dict:
        label_config = self.event.project_info.get("label_config")
        return {"kind": "review", "project": self.event.project,
                "annotation": {k: record[k] for k in ("id", "result", "was_cancelled", "updated_at")},
                "task_id": record["task"], "task_data": task_obj["data"] if task_obj is not None else None,
                "label_config": label_config or None, "action": self.event.action}

    def delete(self) -> None:
        annotations = _listed(self.payload, "annotation", "annotations")
        if not annotations:
            raise InvalidWebhook(f"{self.event.action} without annotation ids")
        ids = []
        for ann in annotations:
            ann_id = as_id(ann.get("id") if isinstance(ann, Mapping) else ann, "annotation id")
            ids.append(int(ann_id))
            # Label Studio never reuses an id: deleting one twice is one event.
            self.event.events.append({"action": "annotation_deleted", "source": self.event.action,
                                      "ts": self.event.received, "annotation_id": ann_id,
                                      "eid": _identity("annotation_deleted", ann_id)})
        self.event.review_jobs.append({"kind": "delete", "project": self.event.project, "annotation_ids": ids,
                                       "action": self.event.action})

    def task_delete(self) -> None:
        tasks = _listed(self.payload, "task", "tasks")
        if not tasks and self.payload.get("id") is not None:
            tasks = [{"id": self.payload["id"]}]
        if not tasks:
            raise InvalidWebhook(f"{self.event.action} without task ids")
        for task in tasks:
            task_id = as_id(task.get("id") if isinstance(task, Mapping) else task, "task id")
            self.event.events.append({"action": "task_deleted", "source": self.event.action,
                                      "ts": self.event.received, "task_id": task_id,
                                      "eid": _identity("task_deleted", task_id)})

    def task_create(self) -> None:
        for task in _listed(self.payload, "task", "tasks"):
            if isinstance(task, Mapping) and isinstance(task.get("data"), dict) and task.get("id") is not None:
                task_id = as_id(task["id"], "task id")
                self.event.task_data[task_id] = self.task_json(task["data"], task_id)

    def project_updated(self) -> None:
        info = self.event.project_info
        config = info.get("label_config", "")
        self.event.events.append({"action": "project_updated", "source": self.event.action,
                                  "ts": self.event.received, "label_config": config,
                                  "eid": _identity("project_updated", config, info["updated_at"])
                                  if info.get("updated_at") else secrets.token_hex(16)})


def parse_webhook(payload: Any, settings: Settings | None = None) -> WebhookEvent:
    """Validate a Label Studio webhook payload; :class:`InvalidWebhook` with the reason if
    it cannot be used (and ``action``, the payload's action as a metric label). Pure: touches
    nothing. The review jobs are left out when ``backend.review.enabled`` is off.

    Ids must be positive integers (a project id wherever the payload carries one); an
    annotation must have the shape of :class:`AnnotationRecord`, at most
    ``redis.max_result_items`` result items and at most ``redis.max_event_kb`` of JSON; a label
    config at most ``redis.max_label_config_kb``, a task's data ``redis.max_task_data_kb``.
    Every event gets an identity (``eid``): the content and Label Studio's ``updated_at``
    where there is one (the same annotation state received twice is one event), else a
    random one fixed at receipt (kept through the disk spool)."""
    settings = settings or get_settings()
    try:
        event = _parse(payload, settings.redis)
    except InvalidWebhook as exc:
        exc.action = metric_action(payload.get("action") if isinstance(payload, Mapping) else None)
        raise
    if not settings.backend.review.enabled:
        event.review_jobs = []
    return event


def _parse(payload: Any, limits) -> WebhookEvent:
    if not isinstance(payload, Mapping):
        raise InvalidWebhook("payload is not a JSON object")
    project = _project_id(payload)
    action = payload.get("action")
    if not isinstance(action, str) or not action.strip():
        raise InvalidWebhook("no 'action'")
    action = action.strip().upper()
    if action not in HANDLED:
        return WebhookEvent(action=action[:64], project=None)
    if project is None:
        raise InvalidWebhook(f"{action} without a project id")
    event = WebhookEvent(action=action, project=project, project_info=_project_info(payload, limits),
                         received=f"{time.time():.6f}")
    parser = _Parser(payload, event, limits)
    if action in ANNOTATION_UPSERT:
        parser.upsert()
    elif action in ANNOTATION_DELETE:
        parser.delete()
    elif action in TASK_DELETE:
        parser.task_delete()
    elif action in TASK_CREATE:
        parser.task_create()
    elif action in PROJECT_INFO:
        parser.project_updated()
    return event
