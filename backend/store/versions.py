"""ModelStore: versioned trained models, a current version per project, publish/promote/rollback.

Layout under the store root (a directory; a volume shared by backend and workers in a
deployment)::

    <root>/<project>/versions/<version>/     complete versions only, each with manifest.json
    <root>/<project>/staging/<version>.*/    publishes in progress (never visible as versions)
    <root>/<project>/CURRENT                 the current-version pointer (JSON, replaced atomically)
    <root>/<project>/history.jsonl           publish / promote / rollback / refusal records
    <root>/<project>/refused.json            versions a backend refused to load, with the reason

A version is written into ``staging/``, every file is fsynced, ``manifest.json`` (file sizes and
SHA-256, metrics, training-data summary, the promotion decision; :mod:`.manifest`) is written
last, and the directory is renamed into ``versions/`` — one atomic step on the same filesystem.
A crash at any point leaves no half-written version visible. Whether a new version becomes
current is the gate's decision (:mod:`.gate`); the history is :mod:`.history`.

Which version is current is the pointer (:mod:`.pointer`: the ``CURRENT`` file, mirrored into
Redis and announced at every change to :class:`~.served.ServedModels`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import ModelStoreError
from . import history
from .files import atomic_write_json, file_stamp, flocked, fsync_dir, utc_iso
from .gate import GateDecision, decide
from .ids import PROJECT_RE, check_project, check_version, is_version_id, new_version_id
from .manifest import FORMAT, MANIFEST, check_files, digest_files, read_manifest
from .pointer import Pointers

log = logging.getLogger(__name__)


@dataclass
class PublishResult:
    project: str
    version: str
    path: Path
    promoted: bool
    reason: str
    gate: GateDecision


@dataclass
class VersionInfo:
    project: str
    version: str
    path: Path
    created_at: str | None
    metrics: dict = field(default_factory=dict)
    data_summary: dict = field(default_factory=dict)
    gate: dict = field(default_factory=dict)
    current: bool = False
    refused: str | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


class ModelStore:
    """Versions, current pointers, atomic publish, the promotion gate, promote and rollback."""

    def __init__(
        self,
        root: str | Path,
        redis=None,
        *,
        gate_metric: str,
        gate_margin: float,
        keep_versions: int,
        stale_staging_s: float,
        previous_kept: int,
        key_prefix: str,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.redis = redis
        self.gate_metric = gate_metric
        self.gate_margin = gate_margin
        self.keep_versions = keep_versions
        self.stale_staging_s = stale_staging_s
        self.key_prefix = key_prefix
        self.pointers = Pointers(self.root, redis, key_prefix, previous_kept)

    @classmethod
    def from_settings(cls, settings=None, redis=None, *, root: str | Path | None = None,
                      **changes) -> "ModelStore":
        """The store the settings' ``store`` section describes (under ``root`` when given, else
        ``settings.models_path``); ``changes`` override its keyword arguments (a test's variant)."""
        from ..settings import get_settings

        settings = settings or get_settings()
        st = settings.store
        options = dict(gate_metric=st.gate_metric, gate_margin=st.gate_margin, keep_versions=st.keep_versions,
                       stale_staging_s=st.stale_staging_s, previous_kept=st.previous_kept,
                       key_prefix=settings.redis.key_prefix)
        return cls(settings.models_path if root is None else root, redis, **{**options, **changes})

    # -- paths -------------------------------------------------------------------------
    @property
    def channel(self) -> str:
        """The Redis pub/sub channel announcing pointer changes."""
        return self.pointers.channel

    def project_dir(self, project: str | int) -> Path:
        return self.root / check_project(project)

    def version_dir(self, project: str | int, version: str) -> Path:
        return self.project_dir(project) / "versions" / check_version(version)

    def _locked(self, project: str | int):
        """Serialises pointer changes of one project between processes of this machine."""
        pdir = self.project_dir(project)
        pdir.mkdir(parents=True, exist_ok=True)
        return flocked(pdir / ".lock")

    # -- reading -----------------------------------------------------------------------
    def projects(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and PROJECT_RE.match(p.name))

    def pointer(self, project: str | int) -> dict | None:
        """The pointer record (:meth:`.pointer.Pointers.read`); None: no current version."""
        return self.pointers.read(project)

    def current(self, project: str | int) -> str | None:
        record = self.pointer(project)
        return record["version"] if record else None

    def pointer_stamp(self, project: str | int) -> tuple | None:
        """A cheap value that changes whenever the pointer file is replaced."""
        return self.pointers.stamp(project)

    def redis_current(self, project: str | int) -> str | None:
        return self.pointers.redis_current(project)

    def manifest(self, project: str | int, version: str) -> dict:
        return read_manifest(self.version_dir(project, version), f"{project}/{version}", version)

    def verify(self, project: str | int, version: str) -> dict:
        """The manifest, after checking every listed file's size and SHA-256 (CorruptVersion if not)."""
        data = self.manifest(project, version)
        check_files(self.version_dir(project, version), f"{project}/{version}", data)
        return data

    def versions(self, project: str | int) -> list[VersionInfo]:
        """Complete versions of a project, oldest first."""
        vroot = self.project_dir(project) / "versions"
        if not vroot.is_dir():
            return []
        current = self.current(project)
        refused = self.refusals(project)
        out = []
        for vdir in sorted(vroot.iterdir()):
            if not is_version_id(vdir.name):
                continue
            is_current = vdir.name == current
            try:
                data = self.manifest(project, vdir.name)
            except ModelStoreError as exc:
                out.append(VersionInfo(str(project), vdir.name, vdir, None, refused=str(exc), current=is_current))
                continue
            out.append(VersionInfo(
                str(project), vdir.name, vdir, data.get("created_at"),
                metrics=data.get("metrics") or {}, data_summary=data.get("data_summary") or {},
                gate=data.get("gate") or {}, current=is_current,
                refused=(refused.get(vdir.name) or {}).get("reason"),
            ))
        return out

    def find(self, version: str) -> str:
        """The project holding ``version`` (version ids are unique across projects)."""
        check_version(version)
        hits = [p for p in self.projects() if (self.root / p / "versions" / version).is_dir()]
        if not hits:
            raise ModelStoreError(f"no version {version} in {self.root}")
        return hits[0]

    def history(self, project: str | int) -> list[dict]:
        return history.read(self.project_dir(project))

    def history_stamp(self, project: str | int) -> tuple | None:
        """A cheap value that changes whenever the history grows (None: no history)."""
        try:
            return file_stamp(self.project_dir(project) / history.HISTORY)
        except ModelStoreError:
            return None

    def refusals(self, project: str | int) -> dict[str, dict]:
        return history.refusals(self.project_dir(project))

    def unserved(self, project: str | int) -> dict | None:
        """The latest version that did not become what is served, when nothing changed the
        served version since: ``{"version", "ts", "kind", "reason", "gate", "data_summary"}``
        with kind ``gate`` (published, kept out by the promotion gate or on request) or
        ``load`` (current, but a backend refused to load it); ``None`` otherwise.

        This is what a user who pressed *Start training* needs to see in Label Studio when the
        served model did not change (``backend.ls.service`` puts it into the model version
        and the reasons text)."""
        record = history.latest_unserved(self.history(project))
        if record is None:
            return None
        version = str(record.get("version") or "")
        summary: dict = {}
        with contextlib.suppress(ModelStoreError):
            summary = self.manifest(project, version).get("data_summary") or {}
        return {"version": version, "ts": record.get("ts"),
                "kind": "gate" if record.get("action") == "publish" else "load",
                "reason": record.get("reason") or "", "gate": record.get("gate") or {},
                "data_summary": summary}

    # -- writing -----------------------------------------------------------------------
    def record_refusal(self, project: str | int, version: str, reason: str) -> None:
        """Remember that ``version`` failed to load (shown by ``semlabel models status``)."""
        with self._locked(project):
            history.add_refusal(self.project_dir(project), version, reason)

    @contextlib.contextmanager
    def staging(self, project: str | int) -> Iterator[Path]:
        """A fresh directory on the store's filesystem to write a model into; removed on
        exit unless :meth:`publish` moved it into ``versions/``."""
        sdir = self.project_dir(project) / "staging"
        sdir.mkdir(parents=True, exist_ok=True)
        path = sdir / f"{new_version_id()}.{socket.gethostname()[:32]}.{os.getpid()}.partial"
        path.mkdir()
        try:
            yield path
        finally:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)

    def gate(self, project: str | int, metrics: dict | None, baseline: dict | None = None,
             promote: bool | None = None, promote_reason: str | None = None) -> GateDecision:
        """Would a version with held-out ``metrics`` be promoted over the current one?
        (:func:`.gate.decide`: ``baseline`` is ``{"version", "metrics"}``.)"""
        current = self.current(project)
        recorded = None
        if current is not None:
            with contextlib.suppress(ModelStoreError):
                recorded = self.manifest(project, current).get("metrics")
        return decide(metrics, metric=self.gate_metric, margin=self.gate_margin, current=current,
                      current_metrics=recorded, baseline=baseline, promote=promote,
                      promote_reason=promote_reason)

    def publish(
        self,
        project: str | int,
        src: str | Path,
        *,
        metrics: dict | None = None,
        data_summary: dict | None = None,
        config: dict | None = None,
        labels: list[str] | None = None,
        baseline: dict | None = None,
        promote: bool | None = None,
        promote_reason: str | None = None,
        extra: dict | None = None,
    ) -> PublishResult:
        """Make the model written in ``src`` (a :meth:`staging` directory, or any directory on
        the same filesystem, which is moved) a new version, and promote it if the gate allows.

        ``metrics`` default to ``src/metrics.json``. ``promote=True`` skips the gate (the
        decision records ``promote_reason``), ``False`` never promotes. The version is always
        kept; the decision and its reason are in its manifest and in the history.
        """
        project = check_project(project)
        src = Path(src)
        if not src.is_dir():
            raise ModelStoreError(f"{src} is not a directory")
        if metrics is None and (src / "metrics.json").is_file():
            with open(src / "metrics.json", encoding="utf-8") as fh:
                metrics = json.load(fh)
        version = new_version_id()
        src = self._onto_store_fs(project, src, version)
        files = digest_files(src)
        if not files:
            raise ModelStoreError(f"{src} holds no model files")
        vroot = self.project_dir(project) / "versions"
        vroot.mkdir(parents=True, exist_ok=True)
        with self._locked(project):
            decision = self.gate(project, metrics, baseline, promote, promote_reason)
            atomic_write_json(src / MANIFEST, {
                "format": FORMAT, "version": version, "project": project, "created_at": utc_iso(),
                "host": socket.gethostname(), "files": files, "metrics": metrics or {},
                "data_summary": data_summary or {}, "config": config or {}, "labels": labels or [],
                "gate": asdict(decision), **(extra or {}),
            })
            os.rename(src, vroot / version)  # the atomic publish
            fsync_dir(vroot)
            history.append(self.project_dir(project), {
                "action": "publish", "version": version, "promoted": decision.promoted,
                "reason": decision.reason, "gate": asdict(decision)})
            if decision.promoted:
                self._set_current(project, version, f"published: {decision.reason}")
            else:
                log.warning("project %s: version %s kept but not promoted: %s", project, version, decision.reason)
        self.prune(project)
        return PublishResult(project, version, vroot / version, decision.promoted, decision.reason, decision)

    def _onto_store_fs(self, project: str, src: Path, version: str) -> Path:
        """``src`` itself when it is in the project's staging directory, else a copy there:
        the rename that publishes it must be atomic, so on the store's filesystem."""
        staging = self.project_dir(project) / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        if src.parent.resolve() == staging.resolve():
            return src
        moved = staging / f"{version}.{os.getpid()}.partial"
        shutil.copytree(src, moved)
        return moved

    def _set_current(self, project: str, version: str, reason: str, previous: list[str] | None = None) -> None:
        """Replace the pointer (caller holds the project lock), record it, then announce it."""
        old = self.pointers.write(project, version, reason, previous)
        history.append(self.project_dir(project), {"action": "current", "version": version,
                                                   "from": old.get("version") if old else None, "reason": reason})
        self.pointers.notify(project, version)
        log.info("project %s: current version is now %s (%s)", project, version, reason)

    def promote(self, project: str | int, version: str, reason: str = "promoted by hand") -> None:
        """Make ``version`` current (after checking its files); the gate does not apply."""
        project = check_project(project)
        self.verify(project, version)
        with self._locked(project):
            if self.current(project) == version:
                return
            self._set_current(project, version, reason)
            history.append(self.project_dir(project), {"action": "promote", "version": version, "reason": reason})

    def rollback(self, project: str | int, reason: str = "rolled back by hand") -> str:
        """Make the version that was current before the current one current again (skipping
        versions that no longer exist, fail their checks or a backend refused to load).
        Returns it."""
        project = check_project(project)
        with self._locked(project):
            record = self.pointer(project)
            if not record:
                raise ModelStoreError(f"project {project} has no current version to roll back from")
            previous = list(record.get("previous") or [])
            refused = self.refusals(project)
            skipped = []
            while previous:
                candidate = previous.pop(0)
                if candidate in refused:
                    skipped.append(f"{candidate} (refused at load: {refused[candidate].get('reason')})")
                    continue
                try:
                    self.verify(project, candidate)
                except ModelStoreError as exc:
                    skipped.append(f"{candidate} ({exc})")
                    continue
                self._set_current(project, candidate, f"{reason} from {record['version']}", previous=previous)
                history.append(self.project_dir(project), {"action": "rollback", "version": candidate,
                                                           "from": record["version"], "skipped": skipped})
                return candidate
        raise ModelStoreError(
            f"project {project}: no earlier version to roll back to"
            + (f" (unusable: {'; '.join(skipped)})" if skipped else "")
        )

    def prune(self, project: str | int) -> list[str]:
        """Delete old versions beyond ``keep_versions`` (never the current one or its rollback
        targets) and staging directories older than ``stale_staging_s``."""
        removed = []
        record = self.pointer(project) or {}
        protected = {record.get("version")} | set((record.get("previous") or [])[:2])
        vers = [v.version for v in self.versions(project)]
        excess = len(vers) - self.keep_versions
        for version in vers:
            if excess <= 0:
                break
            if version in protected:
                continue
            shutil.rmtree(self.version_dir(project, version), ignore_errors=True)
            removed.append(version)
            excess -= 1
        staging = self.project_dir(project) / "staging"
        if staging.is_dir():
            cutoff = time.time() - self.stale_staging_s
            for sdir in staging.iterdir():
                with contextlib.suppress(OSError):
                    if sdir.stat().st_mtime < cutoff:
                        shutil.rmtree(sdir, ignore_errors=True)
        return removed
