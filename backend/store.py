"""The model store: versioned trained models, a current version per project, safe reloads.

Layout under the store root (a directory; a volume shared by backend and workers in a
deployment)::

    <root>/<project>/versions/<version>/     complete versions only, each with manifest.json
    <root>/<project>/staging/<version>.*/    publishes in progress (never visible as versions)
    <root>/<project>/CURRENT                 the current-version pointer (JSON, replaced atomically)
    <root>/<project>/history.jsonl           publish / promote / rollback / refusal records
    <root>/<project>/refused.json            versions a backend refused to load, with the reason

A version is written into ``staging/``, every file is fsynced, ``manifest.json`` (file sizes and
SHA-256, metrics, training-data summary, the promotion decision) is written last, and the
directory is renamed into ``versions/`` — one atomic step on the same filesystem. A crash at any
point leaves no half-written version visible.

Version ids (``v20260314T101502123456Z-3fa9c1``) sort by creation time and carry a random
suffix, so workers on different machines never collide.

The pointer file is the truth (the backend starts without Redis); with a Redis client the store
also keeps ``<prefix>:current:<project>`` equal to it and publishes a message on
``<prefix>:models`` at every change, which :class:`ServedModels` listens to.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import CorruptVersion, ModelStoreError
from .redis.keys import Keys

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
POINTER = "CURRENT"
HISTORY = "history.jsonl"
REFUSED = "refused.json"
FORMAT = 1
_VERSION_RE = re.compile(r"^v\d{8}T\d{12}Z-[0-9a-f]{6}$")
_PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_PREVIOUS_KEPT = 20


def new_version_id(now: float | None = None) -> str:
    """``v<UTC yyyymmddTHHMMSSffffff>Z-<6 hex>``: sorts by time, unique across machines."""
    t = _dt.datetime.fromtimestamp(now if now is not None else time.time(), tz=_dt.timezone.utc)
    return f"v{t:%Y%m%dT%H%M%S%f}Z-{secrets.token_hex(3)}"


def is_version_id(value: str) -> bool:
    return bool(_VERSION_RE.match(value or ""))


def check_project(project: str | int) -> str:
    name = str(project)
    if not _PROJECT_RE.match(name):
        raise ModelStoreError(f"invalid project id {name!r}")
    return name


def _iso(ts: float | None = None) -> str:
    return _dt.datetime.fromtimestamp(ts if ts is not None else time.time(), tz=_dt.timezone.utc).isoformat(
        timespec="milliseconds"
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to a temporary file beside ``path``, fsync, rename over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass
class GateDecision:
    """Whether a new version replaces the current one, and why."""

    promoted: bool
    reason: str
    metric: str
    value: float | None = None
    baseline_version: str | None = None
    baseline_value: float | None = None
    margin: float = 0.0


@dataclass
class PublishResult:
    project: str
    version: str
    path: Path
    promoted: bool
    reason: str
    gate: GateDecision

    def to_dict(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


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
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def _metric(metrics: dict | None, name: str) -> float | None:
    if not metrics:
        return None
    value = metrics.get(name)
    if value is None and isinstance(metrics.get("holdout"), dict):
        value = metrics["holdout"].get(name)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if value == value else None  # NaN is no value


class ModelStore:
    """Versions, current pointers, atomic publish, the promotion gate, promote and rollback."""

    def __init__(
        self,
        root: str | Path,
        redis=None,
        *,
        gate_metric: str = "mAP",
        gate_margin: float = 0.02,
        keep_versions: int = 10,
        stale_staging_s: float = 86400.0,
        key_prefix: str = "semlabel",
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.redis = redis
        self.gate_metric = gate_metric
        self.gate_margin = gate_margin
        self.keep_versions = keep_versions
        self.stale_staging_s = stale_staging_s
        self.key_prefix = key_prefix

    @classmethod
    def from_settings(cls, settings=None, redis=None) -> "ModelStore":
        from .settings import get_settings

        settings = settings or get_settings()
        st = settings.store
        return cls(
            settings.models_path, redis,
            gate_metric=st.gate_metric, gate_margin=st.gate_margin, keep_versions=st.keep_versions,
            stale_staging_s=st.stale_staging_s, key_prefix=settings.redis.key_prefix,
        )

    # -- keys and paths ----------------------------------------------------------------
    @property
    def channel(self) -> str:
        """The Redis pub/sub channel announcing pointer changes."""
        return Keys(self.key_prefix).models

    def redis_key(self, project: str | int) -> str:
        return Keys(self.key_prefix).current(check_project(project))

    def project_dir(self, project: str | int) -> Path:
        return self.root / check_project(project)

    def version_dir(self, project: str | int, version: str) -> Path:
        if not is_version_id(version):
            raise ModelStoreError(f"invalid version id {version!r}")
        return self.project_dir(project) / "versions" / version

    def pointer_path(self, project: str | int) -> Path:
        return self.project_dir(project) / POINTER

    @contextlib.contextmanager
    def _locked(self, project: str | int) -> Iterator[None]:
        """Serialises pointer changes of one project between processes of this machine."""
        pdir = self.project_dir(project)
        pdir.mkdir(parents=True, exist_ok=True)
        with open(pdir / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- reading -----------------------------------------------------------------------
    def projects(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _PROJECT_RE.match(p.name))

    def pointer(self, project: str | int) -> dict | None:
        """The pointer record: ``version``, ``previous`` (rollback targets), ``updated_at``,
        ``reason``; ``None`` when the project has no current version."""
        try:
            with open(self.pointer_path(project), encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("unreadable pointer file %s: %s", self.pointer_path(project), exc)
            return None
        return data if isinstance(data, dict) and data.get("version") else None

    def current(self, project: str | int) -> str | None:
        record = self.pointer(project)
        return record["version"] if record else None

    def pointer_stamp(self, project: str | int) -> tuple | None:
        """A cheap value that changes whenever the pointer file is replaced."""
        try:
            st = os.stat(self.pointer_path(project))
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def redis_current(self, project: str | int) -> str | None:
        if self.redis is None:
            return None
        value = self.redis.get(self.redis_key(project))
        return value.decode() if isinstance(value, bytes) else value

    def manifest(self, project: str | int, version: str) -> dict:
        path = self.version_dir(project, version) / MANIFEST
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            if not path.parent.is_dir():
                raise ModelStoreError(f"project {project} has no version {version}") from None
            raise CorruptVersion(f"{project}/{version}: manifest.json is missing") from None
        except ValueError as exc:
            raise CorruptVersion(f"{project}/{version}: manifest.json is not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("version") != version:
            raise CorruptVersion(f"{project}/{version}: manifest.json does not describe this version")
        return data

    def verify(self, project: str | int, version: str) -> dict:
        """The manifest, after checking every listed file's size and SHA-256 (CorruptVersion if not)."""
        data = self.manifest(project, version)
        vdir = self.version_dir(project, version)
        files = data.get("files")
        if not isinstance(files, dict) or not files:
            raise CorruptVersion(f"{project}/{version}: manifest lists no files")
        for rel, meta in files.items():
            path = vdir / rel
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise CorruptVersion(f"{project}/{version}: {rel} is missing") from None
            if size != meta.get("size"):
                raise CorruptVersion(f"{project}/{version}: {rel} has {size} bytes, manifest says {meta.get('size')}")
            if _sha256(path) != meta.get("sha256"):
                raise CorruptVersion(f"{project}/{version}: {rel} does not match its checksum")
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
            try:
                data = self.manifest(project, vdir.name)
            except ModelStoreError as exc:
                out.append(VersionInfo(str(project), vdir.name, vdir, None, refused=str(exc),
                                       current=vdir.name == current))
                continue
            out.append(
                VersionInfo(
                    str(project), vdir.name, vdir, data.get("created_at"),
                    metrics=data.get("metrics") or {}, data_summary=data.get("data_summary") or {},
                    gate=data.get("gate") or {}, current=vdir.name == current,
                    refused=(refused.get(vdir.name) or {}).get("reason"),
                )
            )
        return out

    def find(self, version: str) -> str:
        """The project holding ``version`` (version ids are unique across projects)."""
        if not is_version_id(version):
            raise ModelStoreError(f"invalid version id {version!r}")
        hits = [p for p in self.projects() if (self.root / p / "versions" / version).is_dir()]
        if not hits:
            raise ModelStoreError(f"no version {version} in {self.root}")
        return hits[0]

    def history(self, project: str | int) -> list[dict]:
        path = self.project_dir(project) / HISTORY
        out = []
        try:
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    with contextlib.suppress(ValueError):
                        out.append(json.loads(line))
        except FileNotFoundError:
            pass
        return out

    def unserved(self, project: str | int) -> dict | None:
        """The latest version that did not become what is served, when nothing changed the
        served version since: ``{"version", "ts", "kind", "reason", "gate", "data_summary"}``
        with kind ``gate`` (published, kept out by the promotion gate or on request) or
        ``load`` (current, but a backend refused to load it); ``None`` otherwise.

        This is what a user who pressed *Start training* needs to see in Label Studio when the
        served model did not change (``backend.ls.service`` puts it into the model version
        and the reasons text)."""
        for record in reversed(self.history(project)):
            action = record.get("action")
            if action == "current":
                return None
            if action in ("publish", "refuse") and not record.get("promoted"):
                version = str(record.get("version") or "")
                summary: dict = {}
                with contextlib.suppress(ModelStoreError):
                    summary = self.manifest(project, version).get("data_summary") or {}
                return {"version": version, "ts": record.get("ts"),
                        "kind": "gate" if action == "publish" else "load",
                        "reason": record.get("reason") or "", "gate": record.get("gate") or {},
                        "data_summary": summary}
        return None

    def history_stamp(self, project: str | int) -> tuple | None:
        """A cheap value that changes whenever the history grows (None: no history)."""
        try:
            st = os.stat(self.project_dir(project) / HISTORY)
        except (FileNotFoundError, ModelStoreError):
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def refusals(self, project: str | int) -> dict[str, dict]:
        try:
            with open(self.project_dir(project) / REFUSED, encoding="utf-8") as fh:
                data = json.load(fh)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    # -- writing -----------------------------------------------------------------------
    def _append_history(self, project: str | int, record: dict) -> None:
        record = {"ts": _iso(), "host": socket.gethostname(), **record}
        path = self.project_dir(project) / HISTORY
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def record_refusal(self, project: str | int, version: str, reason: str) -> None:
        """Remember that ``version`` failed to load (shown by ``semlabel models status``)."""
        with self._locked(project):
            data = self.refusals(project)
            data[version] = {"reason": reason[:500], "ts": _iso(), "host": socket.gethostname()}
            atomic_write_json(self.project_dir(project) / REFUSED, data)
            self._append_history(project, {"action": "refuse", "version": version, "reason": reason[:500]})

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

    def gate(self, project: str | int, metrics: dict | None, baseline: dict | None = None) -> GateDecision:
        """Would a version with held-out ``metrics`` be promoted over the current one?

        ``baseline`` (``{"version", "metrics"}``) is the current version evaluated on the new
        version's held-out split; without it the current version's own recorded metrics are used.
        For a project's first version, a baseline named by a non-store version (the zero-shot
        predictor, e.g. ``zero-shot@<backbone>``) is what it must not be worse than.
        """
        name, margin = self.gate_metric, self.gate_margin
        value = _metric(metrics, name)
        current = self.current(project)
        if current is None:
            # What is served now is the zero-shot predictor; compare with it when the trainer
            # evaluated it on the same held-out tasks.
            zs = baseline.get("version") if baseline else None
            zs_value = _metric(baseline.get("metrics"), name) if zs and not is_version_id(zs) else None
            if zs_value is None or value is None:
                return GateDecision(True, "first version of the project", name, value, None, None, margin)
            if value < zs_value - margin:
                return GateDecision(False, f"held-out {name} {value:.4f} is worse than {zs} ({zs_value:.4f}) "
                                           f"by more than the margin {margin:g}", name, value, zs, zs_value, margin)
            return GateDecision(True, f"first version: held-out {name} {value:.4f} vs {zs} {zs_value:.4f} "
                                      f"(margin {margin:g})", name, value, zs, zs_value, margin)
        base_value = None
        if baseline and baseline.get("version") == current:
            base_value = _metric(baseline.get("metrics"), name)
        if base_value is None:
            with contextlib.suppress(ModelStoreError):
                base_value = _metric(self.manifest(project, current).get("metrics"), name)
        if base_value is None:
            return GateDecision(True, f"current version {current} has no held-out {name}", name, value,
                                current, None, margin)
        if value is None:
            return GateDecision(False, f"no held-out {name} to compare with {current} ({base_value:.4f})",
                                name, None, current, base_value, margin)
        if value < base_value - margin:
            return GateDecision(
                False,
                f"held-out {name} {value:.4f} is worse than current {current} ({base_value:.4f}) "
                f"by more than the margin {margin:g}",
                name, value, current, base_value, margin,
            )
        return GateDecision(True, f"held-out {name} {value:.4f} vs current {base_value:.4f} "
                                  f"(margin {margin:g})", name, value, current, base_value, margin)

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
        decision records ``promote_reason``), ``False`` never promotes. The version is always kept; the decision and its reason are
        in its manifest and in the history.
        """
        project = check_project(project)
        src = Path(src)
        if not src.is_dir():
            raise ModelStoreError(f"{src} is not a directory")
        if metrics is None and (src / "metrics.json").is_file():
            with open(src / "metrics.json", encoding="utf-8") as fh:
                metrics = json.load(fh)
        version = new_version_id()
        vroot = self.project_dir(project) / "versions"
        vroot.mkdir(parents=True, exist_ok=True)
        staging = self.project_dir(project) / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        if src.parent.resolve() != staging.resolve():
            # Bring it onto the store's filesystem first; the rename below must be atomic.
            moved = staging / f"{version}.{os.getpid()}.partial"
            shutil.copytree(src, moved)
            src = moved
        files = {}
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            rel = path.relative_to(src).as_posix()
            if rel == MANIFEST:
                continue
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
            files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        if not files:
            raise ModelStoreError(f"{src} holds no model files")
        for sub in sorted({p.parent for p in src.rglob("*")} | {src}):
            _fsync_dir(sub)
        with self._locked(project):
            decision = self.gate(project, metrics, baseline)
            if promote is True:
                decision = GateDecision(True, promote_reason or "promoted on request (gate skipped)", self.gate_metric,
                                        _metric(metrics, self.gate_metric), decision.baseline_version,
                                        decision.baseline_value, self.gate_margin)
            elif promote is False:
                decision.promoted, decision.reason = False, "kept without promotion on request"
            manifest = {
                "format": FORMAT,
                "version": version,
                "project": project,
                "created_at": _iso(),
                "host": socket.gethostname(),
                "files": files,
                "metrics": metrics or {},
                "data_summary": data_summary or {},
                "config": config or {},
                "labels": labels or [],
                "gate": asdict(decision),
                **(extra or {}),
            }
            atomic_write_json(src / MANIFEST, manifest)
            os.rename(src, vroot / version)  # the atomic publish
            _fsync_dir(vroot)
            self._append_history(project, {"action": "publish", "version": version,
                                           "promoted": decision.promoted, "reason": decision.reason,
                                           "gate": asdict(decision)})
            if decision.promoted:
                self._set_current(project, version, f"published: {decision.reason}")
            else:
                log.warning("project %s: version %s kept but not promoted: %s", project, version, decision.reason)
        self.prune(project)
        return PublishResult(project, version, vroot / version, decision.promoted, decision.reason, decision)

    def _set_current(self, project: str, version: str, reason: str, previous: list[str] | None = None) -> None:
        """Replace the pointer (caller holds the project lock), then mirror it into Redis."""
        old = self.pointer(project)
        if previous is None:
            previous = []
            if old and old.get("version") and old["version"] != version:
                previous = [old["version"]] + [v for v in old.get("previous", []) if v != version]
        record = {
            "project": project,
            "version": version,
            "previous": previous[:_PREVIOUS_KEPT],
            "updated_at": _iso(),
            "reason": reason,
            "host": socket.gethostname(),
        }
        atomic_write_json(self.pointer_path(project), record)
        self._append_history(project, {"action": "current", "version": version,
                                       "from": old.get("version") if old else None, "reason": reason})
        self.notify(project, version)
        log.info("project %s: current version is now %s (%s)", project, version, reason)

    def notify(self, project: str | int, version: str | None = None) -> bool:
        """Mirror the pointer into Redis and announce it; False when Redis is not reachable
        (the pointer file stays the truth and backends poll it)."""
        if self.redis is None:
            return False
        version = version if version is not None else self.current(project)
        try:
            pipe = self.redis.pipeline(transaction=True)
            if version:
                pipe.set(self.redis_key(project), version)
            else:
                pipe.delete(self.redis_key(project))
            pipe.publish(self.channel, json.dumps({"project": str(project), "version": version}))
            pipe.execute()
            return True
        except Exception as exc:  # noqa: BLE001 - Redis down must not undo a publish
            log.warning("could not announce project %s version %s on Redis: %s", project, version, exc)
            return False

    def promote(self, project: str | int, version: str, reason: str = "promoted by hand") -> None:
        """Make ``version`` current (after checking its files); the gate does not apply."""
        project = check_project(project)
        self.verify(project, version)
        with self._locked(project):
            if self.current(project) == version:
                return
            self._set_current(project, version, reason)
            self._append_history(project, {"action": "promote", "version": version, "reason": reason})

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
                self._append_history(project, {"action": "rollback", "version": candidate,
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


# ------------------------------------------------------------------------------------ serving
Loader = Callable[[Path, Any], Any]


def default_loader(model_dir: Path, runtime) -> Any:
    """The model engineer's ``backend.model.load_predictor(model_dir, runtime)``."""
    from .model import load_predictor  # type: ignore[attr-defined]

    return load_predictor(model_dir, runtime)


class ServedModels:
    """The predictor each project is served with in this process, kept current.

    ``get(project)`` returns the loaded predictor of the project's current version, or the
    zero-shot predictor while it has none. New versions are noticed through the store's Redis
    channel (when a client is given) and by polling the pointer files every
    ``poll_interval_s``; they are loaded off the request path and swapped in with one
    assignment, so requests in flight finish with the object they hold. A version whose files
    fail their checks or whose loader raises is refused: logged, recorded in the store
    (``semlabel models status``) and the previous predictor stays served.
    """

    def __init__(
        self,
        store: ModelStore,
        runtime,
        loader: Loader | None = None,
        redis=None,
        *,
        poll_interval_s: float = 2.0,
        fallback=None,
        start: bool = True,
        max_projects: int = 1000,
        idle_s: float = 3600.0,
    ):
        self.store = store
        self.runtime = runtime
        self.loader = loader or default_loader
        self.redis = redis if redis is not None else store.redis
        self.poll_interval_s = poll_interval_s
        self._fallback = fallback
        self._served: dict[str, Any] = {}      # project -> predictor
        self._versions: dict[str, str | None] = {}  # project -> served store version
        self._seen: dict[str, tuple | None] = {}    # project -> pointer stamp last acted on
        # project -> when it was last asked for, least recent first. The watcher polls these
        # only: at most `max_projects`, each forgotten `idle_s` after its last request (any
        # id a request names would otherwise be polled every few seconds for ever).
        self._asked: OrderedDict[str, float] = OrderedDict()
        self.max_projects = max_projects
        self.idle_s = idle_s
        self._lock = threading.RLock()
        self._load_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pubsub = None
        self.loads = 0
        self.refused = 0
        if start:
            self.start()

    # -- public ------------------------------------------------------------------------
    def get(self, project: str | int):
        """The predictor to use now for ``project`` (never blocks on a reload in progress,
        except the very first request of a project, which loads its current version)."""
        key = str(project)
        with self._lock:
            predictor = self._served.get(key)
            known = key in self._seen
            self._asked[key] = time.monotonic()
            self._asked.move_to_end(key)
            while len(self._asked) > self.max_projects:
                self._forget(next(iter(self._asked)))
        if predictor is not None:
            return predictor
        if not known:  # first request for this project in this process: load its version now
            self._refresh(key)
        with self._lock:
            return self._served.get(key) or self.fallback

    def served_version(self, project: str | int) -> str | None:
        """The store version served for ``project`` (``None``: zero-shot)."""
        with self._lock:
            return self._versions.get(str(project))

    @property
    def fallback(self):
        if self._fallback is None:
            self._fallback = self.runtime.zero_shot_predictor()
        return self._fallback

    def refresh(self, project: str | int | None = None) -> None:
        """Check pointers now (all known projects, or one) and load what changed."""
        keys = [str(project)] if project is not None else self._known()
        for key in keys:
            self._refresh(key)

    def status(self) -> dict:
        out = {}
        for key in self._known():
            out[key] = {
                "served": self.served_version(key),
                "current": self.store.current(key),
                "refused": self.store.refusals(key),
            }
        return out

    def start(self) -> None:
        if self._threads:
            return
        poller = threading.Thread(target=self._poll_loop, name="semlabel-model-poll", daemon=True)
        poller.start()
        self._threads.append(poller)
        if self.redis is not None:
            listener = threading.Thread(target=self._listen_loop, name="semlabel-model-pubsub", daemon=True)
            listener.start()
            self._threads.append(listener)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        pubsub = self._pubsub
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    def served_versions(self) -> dict[str, str | None]:
        """Project → version string of the predictor served now (None: the fallback), for
        the projects this process has been asked about. Loads nothing."""
        with self._lock:
            return {key: getattr(self._served.get(key), "version", None) for key in self._seen}

    # -- internals ---------------------------------------------------------------------
    def _known(self) -> list[str]:
        with self._lock:
            return list(self._seen)

    def _forget(self, key: str) -> None:
        """Stop watching ``key`` (caller holds ``_lock``); its next request loads it again."""
        self._asked.pop(key, None)
        self._seen.pop(key, None)
        self._served.pop(key, None)
        self._versions.pop(key, None)

    def _forget_idle(self) -> None:
        cutoff = time.monotonic() - self.idle_s
        with self._lock:
            while self._asked and next(iter(self._asked.values())) < cutoff:
                self._forget(next(iter(self._asked)))

    def _refresh(self, key: str) -> None:
        with self._load_lock:  # one load at a time per process; requests never wait on it
            stamp = self.store.pointer_stamp(key)
            with self._lock:
                if key in self._seen and self._seen[key] == stamp:
                    return
            record = self.store.pointer(key)
            target = record["version"] if record else None
            with self._lock:
                served = self._versions.get(key)
            if target is None or target == served:
                with self._lock:
                    self._asked.setdefault(key, time.monotonic())
                    self._seen[key] = stamp
                    self._versions.setdefault(key, served)
                return
            predictor = self._load(key, target)
            if predictor is None and key not in self._served:
                # First load of this process: serve the newest earlier version that loads.
                for candidate in record.get("previous") or []:
                    predictor = self._load(key, candidate, note=f"instead of refused {target}")
                    if predictor is not None:
                        target = candidate
                        break
            with self._lock:
                self._asked.setdefault(key, time.monotonic())  # every watched project is bounded
                self._seen[key] = stamp
                if predictor is not None:
                    self._served[key] = predictor  # the swap: one assignment
                    self._versions[key] = target
                else:
                    self._versions.setdefault(key, None)

    def _load(self, key: str, version: str, note: str = ""):
        try:
            self.store.verify(key, version)
            predictor = self.loader(self.store.version_dir(key, version), self.runtime)
            if predictor is None:
                raise CorruptVersion("the loader returned nothing")
            if version not in str(getattr(predictor, "version", "") or ""):
                # Label Studio shows this string: it names the store version and the backbone.
                backbone = getattr(getattr(self.runtime, "backbone", None), "name", None)
                predictor.version = f"{version}@{backbone}" if backbone else version
        except Exception as exc:  # noqa: BLE001 - any failure refuses the version
            reason = f"{type(exc).__name__}: {exc}"
            log.error("project %s: refusing version %s (%s); keeping %s", key, version, reason,
                      self._versions.get(key) or "zero-shot")
            self.refused += 1
            with contextlib.suppress(Exception):
                self.store.record_refusal(key, version, reason)
            return None
        self.loads += 1
        log.warning("project %s: now serving version %s%s", key, version, f" ({note})" if note else "")
        return predictor

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            self._forget_idle()
            for key in self._known():
                try:
                    self._refresh(key)
                except Exception:  # noqa: BLE001 - the watcher must survive anything
                    log.exception("project %s: checking for a new model version failed", key)

    def _listen_loop(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            try:
                self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                self._pubsub.subscribe(self.store.channel)
                delay = 1.0
                while not self._stop.is_set():
                    message = self._pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        self._wake.set()
            except Exception as exc:  # noqa: BLE001 - Redis may come and go; polling goes on
                if self._stop.is_set():
                    break
                log.warning("model-version notifications from Redis interrupted (%s); retrying in %.0f s",
                            exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)
            finally:
                with contextlib.suppress(Exception):
                    if self._pubsub is not None:
                        self._pubsub.close()
                self._pubsub = None
