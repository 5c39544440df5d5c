"""Durable file writes of the model store: fsync, atomic JSON replace, SHA-256, a lock file,
UTC stamps.

Everything the store writes survives a crash whole or not at all: a file is written beside its
final name, fsynced, renamed over it, and its directory fsynced.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import IO, Any, Iterator


def utc_iso(ts: float | None = None) -> str:
    """``ts`` (default: now) as an ISO-8601 UTC time with milliseconds."""
    when = _dt.datetime.fromtimestamp(ts if ts is not None else time.time(), tz=_dt.timezone.utc)
    return when.isoformat(timespec="milliseconds")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(fh: IO[bytes]) -> str:
    """Hex SHA-256 of an open binary file, read from where it stands in 1 MiB chunks."""
    h = hashlib.sha256()
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
    fsync_dir(path.parent)


def file_stamp(path: Path) -> tuple | None:
    """A cheap value that changes whenever ``path`` is replaced or grows (None: no such file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


@contextlib.contextmanager
def flocked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed): one writer at a time among
    the processes of this machine."""
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
