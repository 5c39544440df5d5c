"""``manifest.json``: what a version holds, written last, checked before anything loads it.

The manifest lists every file of the version with its size and SHA-256, next to the metrics,
the training-data summary, the labels, the configuration and the promotion decision. It is the
one place model files are hashed: once when a version is published (:func:`digest_files`) and
once when a backend loads it (:func:`check_files`); the loader is handed the digests it needs
(:func:`backend.store.served.default_loader`) instead of hashing the files again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CorruptVersion, ModelStoreError
from .files import fsync_dir, sha256_of

MANIFEST = "manifest.json"
FORMAT = 1


def digest_files(src: Path) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``src`` but the manifest.

    Each file is fsynced as it is hashed, then every directory: the rename that publishes
    ``src`` must not make visible what is not yet on disk."""
    files = {}
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        if rel == MANIFEST:
            continue
        with open(path, "rb+") as fh:
            digest = sha256_of(fh)
            os.fsync(fh.fileno())
        files[rel] = {"size": path.stat().st_size, "sha256": digest}
    for sub in sorted({p.parent for p in src.rglob("*")} | {src}):
        fsync_dir(sub)
    return files


def read_manifest(vdir: Path, name: str, version: str) -> dict:
    """The manifest of the version in ``vdir`` (``name``: ``project/version``, for messages)."""
    path = vdir / MANIFEST
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        if not vdir.is_dir():
            project = name.partition("/")[0]
            raise ModelStoreError(f"project {project} has no version {version}") from None
        raise CorruptVersion(f"{name}: manifest.json is missing") from None
    except ValueError as exc:
        raise CorruptVersion(f"{name}: manifest.json is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("version") != version:
        raise CorruptVersion(f"{name}: manifest.json does not describe this version")
    return data


def check_files(vdir: Path, name: str, manifest: dict) -> None:
    """Raise :class:`CorruptVersion` unless every file the manifest lists has its size and SHA-256."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CorruptVersion(f"{name}: manifest lists no files")
    for rel, meta in files.items():
        path = vdir / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CorruptVersion(f"{name}: {rel} is missing") from None
        if size != meta.get("size"):
            raise CorruptVersion(f"{name}: {rel} has {size} bytes, manifest says {meta.get('size')}")
        with open(path, "rb") as fh:
            if sha256_of(fh) != meta.get("sha256"):
                raise CorruptVersion(f"{name}: {rel} does not match its checksum")


def file_digest(vdir: Path, rel: str) -> str | None:
    """The SHA-256 the manifest of the version in ``vdir`` records for ``rel`` (None: not listed)."""
    try:
        with open(vdir / MANIFEST, encoding="utf-8") as fh:
            files = json.load(fh).get("files") or {}
    except (OSError, ValueError, AttributeError):
        return None
    meta = files.get(rel) if isinstance(files, dict) else None
    return meta.get("sha256") if isinstance(meta, dict) else None
