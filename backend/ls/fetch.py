"""Tasks → image features: each task's image source (its label config's ``<Image>``), the
bytes (:class:`~backend.images.ImageLoader`, with the project's Label Studio connection), the
features (:class:`~backend.features.FeatureStore`, cached by content hash).

Downloads run in parallel, outside the compute lock, each request into its own temporary
directory (removed afterwards: features are cached by content, not the files). Label Studio
uploads never change (Label Studio names each with a random prefix), so an upload seen before
comes straight from the feature cache, without downloading it again.
"""

from __future__ import annotations

import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

from ..errors import ImageError
from ..features import Features
from ..images import ImageLoader
from ..lru import LRU
from . import metrics
from .config import ProjectConfig, TaskDataError
from .connection import LabelStudioConnection


def is_upload(source: str) -> bool:
    """A file uploaded to Label Studio (``/data/upload/…``, relative or absolute URL)."""
    path = source.split("://", 1)[-1]
    path = path[path.find("/"):] if "://" in source else path
    return path.startswith(("/data/upload/", "data/upload/"))


def _task_name(tasks: Sequence[Any], i: int) -> str:
    return f"task {tasks[i].get('id', '#' + str(i))}"


def task_sources(config: ProjectConfig, tasks: Sequence[Any]) -> tuple[list[dict[str, str]], list[str | None]]:
    """Per task: ``{image object name: source}`` and the error message (or None) of a task
    whose data lacks an image the config needs."""
    errors: list[str | None] = [None] * len(tasks)
    wanted: list[dict[str, str]] = [{} for _ in tasks]
    for i, task in enumerate(tasks):
        if not isinstance(task, Mapping):
            errors[i] = f"task #{i} is not an object"
            continue
        for b in config.bindings:
            try:
                wanted[i][b.object] = b.source(task)
            except TaskDataError as exc:
                errors[i] = f"{_task_name(tasks, i)}: {exc}"
                break
    return wanted, errors


class TaskImages:
    """The image features of tasks, for one backend process.

    Args:
        settings: the backend's settings (``images``, ``data_dir``).
        runtime: returns the loaded :class:`~backend.runtime.Runtime` (its feature store).
        compute: the lock that serialises the CPU/GPU work of the process.
    """

    def __init__(self, settings, runtime, compute: threading.Lock):
        self.settings = settings
        self._runtime = runtime
        self._compute = compute
        self._pool = ThreadPoolExecutor(max_workers=settings.images.fetch_threads, thread_name_prefix="semlabel-fetch")
        self._upload_keys: LRU[tuple[str, str], str] = LRU(settings.backend.max_upload_keys)

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def of_tasks(self, config: ProjectConfig, tasks: Sequence[Any], conn) -> tuple[list, list]:
        """Per task: ``{object name: Features}`` or None, and the error message or None."""
        wanted, errors = task_sources(config, tasks)
        order: dict[str, int] = {}  # each distinct source once, with the first task that has it
        owners: list[int | None] = []
        for i, srcs in enumerate(wanted):
            for src in srcs.values() if errors[i] is None else ():
                if src not in order:
                    order[src] = len(order)
                    task_id = tasks[i].get("id")
                    owners.append(task_id if isinstance(task_id, int) else None)
        feats = self.features(list(order), conn, owners)
        out: list[dict | None] = [None] * len(tasks)
        for i, srcs in enumerate(wanted):
            if errors[i] is not None:
                continue
            failed = next((feats[order[s]] for s in srcs.values() if isinstance(feats[order[s]], ImageError)), None)
            if failed is not None:
                errors[i] = f"{_task_name(tasks, i)}: {failed}"
            else:
                out[i] = {obj: feats[order[src]] for obj, src in srcs.items()}
        return out, errors

    def features(self, sources: Sequence[str], conn: LabelStudioConnection | None, task_ids=None) -> list:
        """Features (or the ImageError) of each source, in order."""
        if not sources:
            return []
        store = self._runtime().features
        known = {}
        for i, source in enumerate(sources):
            key = self._upload_keys.get((conn.url, source)) if conn is not None and is_upload(source) else None
            feats = store.get(key) if key is not None else None
            if feats is not None:
                known[i] = feats
        if known:
            metrics.FEATURES.labels("cache").inc(len(known))
        todo = [i for i in range(len(sources)) if i not in known]
        fetched = self._fetch([sources[i] for i in todo], conn,
                              [task_ids[i] for i in todo] if task_ids else None) if todo else []
        out = [known.get(i) for i in range(len(sources))]
        for i, feats in zip(todo, fetched):
            out[i] = feats
            if isinstance(feats, Features) and is_upload(sources[i]) and conn is not None:
                self._upload_keys.put((conn.url, sources[i]), feats.key)
        return out

    def _fetch(self, sources: Sequence[str], conn, task_ids) -> list:
        downloads = self.settings.data_path / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            loader = ImageLoader(self.settings.images, label_studio=conn,
                                 local_roots=self.settings.images.local_roots, cache_dir=tmp)

            def fetch(i):
                try:
                    return loader.fetch(sources[i], task_ids[i] if task_ids else None)
                except ImageError as err:
                    return err

            blobs = [fetch(0)] if len(sources) == 1 else list(self._pool.map(fetch, range(len(sources))))
        store = self._runtime().features
        with self._compute:
            hits, computed = store.hits, store.computed
            feats = store.get_or_compute(blobs, progress=False)
            metrics.FEATURES.labels("cache").inc(store.hits - hits)
            metrics.FEATURES.labels("computed").inc(store.computed - computed)
        return feats


def clean_downloads(settings) -> None:
    """Downloads live in memory; ``<data_dir>/downloads`` only ever holds per-request temporary
    directories, and those a killed process left behind (older than ``backend.stale_download_s``)
    are removed at start."""
    import shutil
    import time

    root = settings.data_path / "downloads"
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if time.time() - entry.stat().st_mtime > settings.backend.stale_download_s:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
