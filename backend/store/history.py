"""A project's story in the store: ``history.jsonl`` and ``refused.json``.

``history.jsonl`` holds one JSON record a line, appended and fsynced: ``publish`` (with the
gate's decision), ``current`` (the pointer moved), ``promote``, ``rollback`` and ``refuse`` (a
backend could not load a version). ``refused.json`` maps each refused version to its reason.
:func:`latest_unserved` reads from the records what a user who pressed *Start training* needs
to see when the served model did not change.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

from .files import atomic_write_json, utc_iso

HISTORY = "history.jsonl"
REFUSED = "refused.json"
REASON_CHARS = 500  # a refusal reason is an exception's message: keep the files small


def append(project_dir: Path, record: dict) -> None:
    """Append ``record`` (stamped with the time and this host) to the project's history."""
    record = {"ts": utc_iso(), "host": socket.gethostname(), **record}
    with open(project_dir / HISTORY, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read(project_dir: Path) -> list[dict]:
    """The project's history records, oldest first (unreadable lines skipped)."""
    out = []
    try:
        with open(project_dir / HISTORY, encoding="utf-8") as fh:
            for line in fh:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
    except FileNotFoundError:
        pass
    return out


def refusals(project_dir: Path) -> dict[str, dict]:
    """Version → ``{"reason", "ts", "host"}`` of the versions a backend refused to load."""
    try:
        with open(project_dir / REFUSED, encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def add_refusal(project_dir: Path, version: str, reason: str) -> None:
    """Record that ``version`` failed to load (the caller holds the project lock)."""
    reason = reason[:REASON_CHARS]
    data = refusals(project_dir)
    data[version] = {"reason": reason, "ts": utc_iso(), "host": socket.gethostname()}
    atomic_write_json(project_dir / REFUSED, data)
    append(project_dir, {"action": "refuse", "version": version, "reason": reason})


def latest_unserved(records: list[dict]) -> dict | None:
    """The latest ``publish`` record kept out by the gate, or ``refuse`` record, when no
    ``current`` record came after it (nothing changed what is served since); else None."""
    for record in reversed(records):
        action = record.get("action")
        if action == "current":
            return None
        if action in ("publish", "refuse") and not record.get("promoted"):
            return record
    return None
