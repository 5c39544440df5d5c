"""The ``collect`` step of a training: a project's annotations, from Label Studio's export
when its API is reachable, else from the event log the backend persisted; and the held-out
split by a hash of the task id."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

from backend.queue.eventlog import project_info, read_state, task_data
from backend.settings import Settings, get_settings

from .runtime import label_studio

log = logging.getLogger(__name__)


@dataclass
class ProjectData:
    """A project's labelled tasks, shaped like Label Studio's JSON export."""

    project: str
    tasks: list[dict]
    label_config: str | None
    source: str
    events_upto: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update((self.label_config or "").encode())
        for task in sorted(self.tasks, key=lambda t: t["id"]):
            anns = sorted(
                ([a.get("id"), a.get("result"), bool(a.get("was_cancelled"))] for a in task.get("annotations", [])),
                key=lambda a: str(a[0]),
            )
            h.update(json.dumps([task["id"], task.get("data"), anns], sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        anns = [a for t in self.tasks for a in t.get("annotations", [])]
        return {
            "source": self.source,
            "tasks": len(self.tasks),
            "annotations": len(anns),
            "cancelled": sum(1 for a in anns if a.get("was_cancelled")),
            "events_upto": self.events_upto,
            "fingerprint": self.fingerprint,
            "notes": self.notes,
        }


def _from_events(redis, project: str, upto: str | None, settings: Settings) -> ProjectData:
    # The snapshot earlier trainings folded the stream into, plus the events up to `upto`.
    state = read_state(redis, project, settings, upto=upto, with_events=upto is not None)
    known = task_data(redis, project, settings)
    known.update(state["task_data"])
    by_task: dict[int, list[dict]] = {}
    for ann in state["annotations"].values():
        by_task.setdefault(int(ann["task"]), []).append(ann)
    tasks, missing = [], 0
    for tid, anns in sorted(by_task.items()):
        if tid in state["deleted_tasks"]:
            continue
        if tid not in known:
            missing += 1
            continue
        tasks.append({"id": tid, "data": known[tid], "annotations": sorted(anns, key=lambda a: a["id"])})
    label_config = state["label_config"] or project_info(redis, project, settings).get("label_config")
    notes = []
    if missing:
        notes.append(f"{missing} annotated task(s) skipped: their image is unknown (no TASKS_CREATED webhook, "
                     "no /predict call, Label Studio API not configured)")
    return ProjectData(project, tasks, label_config, "events", upto, notes)


def _from_label_studio(project: str, settings: Settings, upto: str | None) -> ProjectData:
    conn = label_studio(settings)
    client = conn.client
    pid = int(project)
    label_config = client.projects.get(id=pid).label_config
    raw = b"".join(client.projects.exports.download_sync(id=pid, export_type="JSON", download_all_tasks=False))
    exported = json.loads(raw.decode("utf-8"))
    tasks = []
    for task in exported:
        anns = [
            {k: a.get(k) for k in ("id", "result", "was_cancelled", "ground_truth", "completed_by", "updated_at")}
            for a in task.get("annotations") or []
        ]
        if anns:
            tasks.append({"id": int(task["id"]), "data": task.get("data") or {}, "annotations": anns})
    return ProjectData(project, tasks, label_config, "label-studio", upto)


def collect(redis, project: str, upto: str | None, settings: Settings | None = None) -> ProjectData:
    """The project's current annotations (see the module doc)."""
    settings = settings or get_settings()
    if settings.label_studio_url and settings.label_studio_api_key:
        try:
            data = _from_label_studio(project, settings, upto)
            log.info("project %s: %d labelled task(s) from Label Studio's export", project, len(data.tasks))
            return data
        except Exception as exc:  # noqa: BLE001 - unreachable LS: the event log still has it all
            note = f"Label Studio API unavailable ({type(exc).__name__}: {str(exc)[:160]}); used the event log"
            log.warning("project %s: %s", project, note)
            data = _from_events(redis, project, upto, settings)
            data.notes.insert(0, note)
            return data
    return _from_events(redis, project, upto, settings)


def split_holdout(tasks: list[dict], fraction: float, seed: int = 0,
                  min_holdout: int = 1) -> tuple[list[dict], list[dict]]:
    """(train, held-out): a task is held out when a hash of its id falls under ``fraction``,
    so a task stays on its side as the project grows. No held-out split (everything trains)
    when fewer than ``min_holdout`` tasks would be held out, or nothing would be left."""
    if fraction <= 0 or len(tasks) < 2:
        return list(tasks), []

    def score(task):
        digest = hashlib.sha256(f"{seed}:{task['id']}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    held_ids = {t["id"] for t in tasks if score(t) < fraction}
    if len(held_ids) < min_holdout or len(held_ids) >= len(tasks):
        return list(tasks), []
    return [t for t in tasks if t["id"] not in held_ids], [t for t in tasks if t["id"] in held_ids]
