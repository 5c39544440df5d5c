"""The bodies of ``/predict`` and ``/setup`` as Label Studio 1.23 sends them, parsed once at
the edge (pydantic) and passed on typed.

:func:`parse` turns a raw body into a request model or a :class:`~.guard.BadRequest` with the
status and the one-line reason the client gets (and the log shows): a body that is not a
bounded JSON object, a ``/predict`` without tasks, too many tasks (413), a ``/setup`` naming a
Label Studio address that is not an http(s) URL. What Label Studio sends besides the fields
below is ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Mapping, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from . import guard

M = TypeVar("M", bound=BaseModel)


def project_key(value: Any) -> str | None:
    """Label Studio's project reference → the project id as a string (None when it has none).

    ``/setup`` and ``/predict`` send ``"<id>.<created_at timestamp>"``, webhooks an object with
    ``id``, the API an integer."""
    if isinstance(value, Mapping):
        value = value.get("id")
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    head = str(value).strip().split(".", 1)[0]
    return head if head.isdigit() else None


def _text_or_none(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


ProjectRef = Annotated[str | None, BeforeValidator(project_key)]
OptionalText = Annotated[str | None, BeforeValidator(_text_or_none)]


class PredictRequest(BaseModel):
    """``POST /predict``: the tasks to predict, in order, and the project's label config.

    ``context`` (interactive pre-annotation) is ``params.context`` or a top-level
    ``context``; the label config is ``label_config`` or ``schema``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    tasks: Annotated[list[Any], Field(min_length=1)]
    label_config: str
    project: ProjectRef = None
    context: Any = None

    @classmethod
    def from_label_studio(cls, data: Mapping) -> dict:
        params = data.get("params") if isinstance(data.get("params"), Mapping) else {}
        out = {k: data[k] for k in ("tasks", "project") if k in data}
        xml = data.get("label_config") or data.get("schema")
        if xml:
            out["label_config"] = xml
        out["context"] = params.get("context", data.get("context"))
        return out

    @field_validator("tasks")
    @classmethod
    def _at_most_max_tasks(cls, tasks: list, info: ValidationInfo) -> list:
        limit = (info.context or {}).get("max_tasks")
        if limit is not None and len(tasks) > limit:
            raise PydanticCustomError("too_many_tasks", "{n} tasks in one request, over limits.max_tasks={limit}",
                                      {"n": len(tasks), "limit": limit})
        return tasks


class SetupRequest(BaseModel):
    """``POST /setup``: the project, its label config (``schema`` or ``label_config``) and what
    Label Studio says about itself (its address and the project creator's token)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    project: ProjectRef = None
    label_config: str | None = None
    hostname: str | None = None
    access_token: OptionalText = None

    @classmethod
    def from_label_studio(cls, data: Mapping) -> dict:
        out = {k: data[k] for k in ("project", "hostname", "access_token") if k in data}
        xml = data.get("schema") or data.get("label_config")
        if xml:
            out["label_config"] = xml
        return out

    @field_validator("hostname", mode="before")
    @classmethod
    def _http_url(cls, value: Any) -> str | None:
        if not value:
            return None
        if not (isinstance(value, str) and value.strip().startswith(("http://", "https://"))):
            raise PydanticCustomError("hostname", "'hostname' must be Label Studio's http(s) URL, got {given}",
                                      {"given": guard.clip(repr(value), 80)})
        return value.strip().rstrip("/")


#: what each of pydantic's error types means in a Label Studio request
_REASONS = {
    ("tasks", "missing"): "no 'tasks' in the request",
    ("tasks", "list_type"): "'tasks' must be a list, got {type}",
    ("tasks", "too_short"): "'tasks' is empty",
    ("label_config", "missing"): "no label config in the request ('label_config' or 'schema')",
    ("label_config", "string_type"): "the label config must be a string, got {type}",
}
_STATUS = {"too_many_tasks": 413}


def _bad_request(exc: ValidationError) -> guard.BadRequest:
    """The first error, as the status and reason the client gets."""
    err = exc.errors(include_url=False)[0]
    field = str(err["loc"][0]) if err.get("loc") else ""
    template = _REASONS.get((field, err["type"]))
    reason = template.format(type=type(err.get("input")).__name__) if template else (
        err["msg"] if err["type"] in ("hostname", "too_many_tasks") else f"{field or 'body'}: {err['msg']}")
    return guard.BadRequest(_STATUS.get(err["type"], 400), guard.clip(reason, 300))


def json_object(raw: bytes, max_depth: int, *, optional: bool = False) -> dict:
    """The body as a JSON object (bounded depth); :class:`~.guard.BadRequest` otherwise.
    ``optional``: an empty or non-object body is an empty object (``/versions``, ``/train``)."""
    if optional and not raw.strip():
        return {}
    data = guard.parse_json(raw, max_depth)
    if not isinstance(data, dict):
        if optional:
            return {}
        raise guard.BadRequest(400, f"expected a JSON object, got {type(data).__name__}")
    return data


def parse(model: type[M], raw: bytes, limits) -> M:
    """``raw`` (a request body) as ``model``, within ``limits`` (the settings' section)."""
    data = json_object(raw, limits.max_json_depth)
    try:
        return model.model_validate(model.from_label_studio(data), context={"max_tasks": limits.max_tasks})
    except ValidationError as exc:
        raise _bad_request(exc) from None
