"""FeatureStore: image features computed once, shared by backend and worker.

Layout: ``<root>/<backbone fingerprint>/<key[:2]>/<key>.npz`` where ``key`` is the SHA-256
of the image bytes. Each file holds the text-aligned ``global [D]`` and ``local [P, D]`` and,
unless the backbone's native space is the aligned one, its native ``native_global [N]`` and
``native_local [P, N]`` (fp16 by default). The fingerprint covers the backbone's weights, its
preprocessing (whole image or crop, size, ...) and the feature version, so features made
another way live in another directory and are never mixed.

Concurrency: a writer saves to a unique temporary file in the same directory and renames it
over the final name (``os.replace`` is atomic on POSIX), so readers see either no file or a
complete one, and two processes writing the same key both leave a valid file. A file that
fails to load (e.g. written by a crashed older version) counts as a miss and is rewritten.

Size: :meth:`FeatureStore.gc` deletes least-recently-used files until the store fits
``features.max_size_gb``; it also runs every ``features.gc_every_writes`` writes.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import ImageError
from .images import ImageBlob, decode
from .settings import get_settings

log = logging.getLogger(__name__)


@dataclass
class EncodedImages:
    """Features of a batch of images (what ``Backbone.encode_images`` returns, and what the
    heads take): native ``native_global [B, N]``, ``native_local [B, P, N]`` and text-aligned
    ``global_ [B, D]``, ``local [B, P, D]``. Indexing with image indices gives a sub-batch
    (of the same class: a subclass marking how its native parts were transformed keeps it)."""

    native_global: torch.Tensor
    native_local: torch.Tensor
    global_: torch.Tensor
    local: torch.Tensor

    def __len__(self) -> int:
        return int(self.global_.shape[0])

    def __getitem__(self, index) -> "EncodedImages":
        return type(self)(*(t[index] for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.native_global, self.native_local, self.global_, self.local

    def to(self, device, dtype: torch.dtype | None = None) -> "EncodedImages":
        return type(self)(*(t.to(device=device, dtype=dtype) for t in self.tensors()))

    def to_cpu_float(self) -> "EncodedImages":
        return type(self)(*(t.float().cpu() for t in self.tensors()))

    def nbytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in self.tensors())

    @classmethod
    def aligned_only(cls, global_: torch.Tensor, local: torch.Tensor) -> "EncodedImages":
        """A batch whose native space is the aligned one (e.g. features of older callers)."""
        return cls(global_, local, global_, local)


@dataclass
class Features:
    """Features of one image: text-aligned global ``[D]`` and local ``[P, D]``, and the
    backbone's native global ``[N]`` and local ``[P, N]`` (float32 tensors; the native ones are
    the aligned ones when the backbone's native space is aligned, or for older callers that
    pass none)."""

    key: str
    global_: torch.Tensor
    local: torch.Tensor
    native_global: torch.Tensor | None = None
    native_local: torch.Tensor | None = None

    def __post_init__(self):
        if self.native_global is None:
            self.native_global = self.global_
        if self.native_local is None:
            self.native_local = self.local


def stack(features: Sequence[Features]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of the aligned features: (global ``[B, D]``, local ``[B, P, D]``)."""
    return (
        torch.stack([f.global_ for f in features]),
        torch.stack([f.local for f in features]),
    )


def stack_all(features: Sequence[Features]) -> EncodedImages:
    """A batch of every feature of ``features`` (see :class:`EncodedImages`)."""
    return EncodedImages(
        torch.stack([f.native_global for f in features]),
        torch.stack([f.native_local for f in features]),
        torch.stack([f.global_ for f in features]),
        torch.stack([f.local for f in features]),
    )


class FeatureStore:
    """Content-addressed, on-disk cache of backbone features (see module docstring)."""

    def __init__(
        self,
        root: str | os.PathLike,
        backbone,
        settings=None,
    ):
        """``settings``: where ``features.*``, ``images.max_pixels`` and ``backbone.batch_size``
        are read (None: the process settings)."""
        settings = settings or get_settings()
        cfg = settings.features
        self.root = Path(root)
        self.backbone = backbone
        self.dir = self.root / backbone.fingerprint
        self.dtype = np.float16 if cfg.dtype == "float16" else np.float32
        self.max_bytes = int(cfg.max_size_gb * 2**30) if cfg.max_size_gb else None
        self.gc_every_writes = cfg.gc_every_writes
        self.stale_tmp_s = cfg.stale_tmp_s
        self.max_pixels = settings.images.max_pixels
        self.batch_size = settings.backbone.batch_size
        self._lock = threading.Lock()
        self._writes_since_gc = 0
        # Counters: how many images were served from disk / computed by the backbone.
        self.hits = 0
        self.computed = 0

    @classmethod
    def from_settings(cls, settings, backbone) -> "FeatureStore":
        return cls(settings.features_path, backbone, settings)

    # -- single entries --------------------------------------------------------------
    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npz"

    def get(self, key: str) -> Features | None:
        path = self.path(key)
        try:
            with np.load(path) as data:
                arrays = [data["global"], data["local"]]
                if "native_global" in data.files:
                    arrays += [data["native_global"], data["native_local"]]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("feature file %s unreadable (%s); recomputing", path, exc)
            return None
        try:
            os.utime(path)  # recency for the LRU clean-up
        except OSError:
            pass
        return Features(key, *(torch.from_numpy(a.astype(np.float32)) for a in arrays))

    def put(self, features: Features) -> None:
        path = self.path(features.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{features.key[:8]}-", suffix=".tmp", dir=path.parent)
        try:
            arrays = {"global": features.global_, "local": features.local}
            if features.native_global is not features.global_:  # aligned native: stored once
                arrays |= {"native_global": features.native_global, "native_local": features.native_local}
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **{name: t.numpy().astype(self.dtype) for name, t in arrays.items()})
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        with self._lock:
            self._writes_since_gc += 1
            due = self.max_bytes is not None and self._writes_since_gc >= self.gc_every_writes
            if due:
                self._writes_since_gc = 0
        if due:
            self.gc(self.max_bytes)

    # -- batches -----------------------------------------------------------------------
    def get_or_compute(
        self, blobs: Sequence[ImageBlob | ImageError], progress: bool | None = None
    ) -> list[Features | ImageError]:
        """Features for each blob, in order. Errors pass through; decode errors appear in
        place of the image that caused them and do not affect the others."""
        out: list[Features | ImageError | None] = [None] * len(blobs)
        todo: list[int] = []
        for i, blob in enumerate(blobs):
            if isinstance(blob, ImageError):
                out[i] = blob
                continue
            cached = self.get(blob.key)
            if cached is not None:
                out[i] = cached
                self.hits += 1
            else:
                todo.append(i)
        if todo:
            show = progress if progress is not None else len(todo) > self.batch_size
            bar = tqdm(total=len(todo), desc="image features", unit="img", disable=not show)
            # Same bytes twice in one call: compute once.
            first_of: dict[str, int] = {}
            for start in range(0, len(todo), self.batch_size):
                batch = todo[start : start + self.batch_size]
                images, owners = [], []
                for i in batch:
                    blob = blobs[i]
                    if blob.key in first_of:
                        continue
                    try:
                        images.append(decode(blob, self.max_pixels))
                    except ImageError as err:
                        out[i] = err
                        continue
                    first_of[blob.key] = i
                    owners.append(i)
                if images:
                    t0 = time.perf_counter()
                    encoded = self.backbone.encode_images(images)
                    log.debug("encoded %d images in %.2fs", len(images), time.perf_counter() - t0)
                    aligned = bool(getattr(self.backbone, "native_is_aligned", False))
                    for j, i in enumerate(owners):
                        # Round to the storage precision now, so a fresh result equals
                        # what the cache will return next time.
                        g, l = self._rounded(encoded.global_[j]), self._rounded(encoded.local[j])
                        if aligned:
                            feats = Features(blobs[i].key, g, l)
                        else:
                            feats = Features(blobs[i].key, g, l, self._rounded(encoded.native_global[j]),
                                             self._rounded(encoded.native_local[j]))
                        self.put(feats)
                        out[i] = feats
                    self.computed += len(images)
                bar.update(len(batch))
            bar.close()
            for i in todo:
                if out[i] is None:  # a duplicate of an earlier blob in this call
                    out[i] = out[first_of[blobs[i].key]]
        return out  # type: ignore[return-value]

    def _rounded(self, t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(t.numpy().astype(self.dtype).astype(np.float32))

    def load_features(self, keys: Sequence[str]) -> list[Features]:
        """The Features of already-cached keys; raises KeyError naming a missing one."""
        feats = []
        for key in keys:
            f = self.get(key)
            if f is None:
                raise KeyError(f"features of {key} are not in the store {self.dir}")
            feats.append(f)
        return feats

    def load_many(self, keys: Sequence[str]) -> EncodedImages:
        """Every feature of already-cached keys, stacked; raises KeyError naming a missing one."""
        return stack_all(self.load_features(keys))

    # -- housekeeping ------------------------------------------------------------------
    def entries(self) -> list[tuple[Path, os.stat_result]]:
        out = []
        if not self.root.exists():
            return out
        for path in self.root.glob("*/*/*.npz"):
            try:
                out.append((path, path.stat()))
            except FileNotFoundError:
                pass
        return out

    def size_bytes(self) -> int:
        return sum(st.st_size for _, st in self.entries())

    def gc(self, max_bytes: int | None = None, max_age_s: float | None = None) -> dict:
        """Delete least-recently-used feature files (all backbones) until the store is at
        most ``max_bytes``, and any older than ``max_age_s``. Stale temp files go too."""
        now = time.time()
        removed = freed = 0
        for tmp in self.root.glob("*/*/.*.tmp") if self.root.exists() else []:
            try:
                if now - tmp.stat().st_mtime > self.stale_tmp_s:
                    tmp.unlink()
            except FileNotFoundError:
                pass
        entries = sorted(self.entries(), key=lambda e: e[1].st_mtime)
        total = sum(st.st_size for _, st in entries)
        for path, st in entries:
            too_big = max_bytes is not None and total > max_bytes
            too_old = max_age_s is not None and now - st.st_mtime > max_age_s
            if not (too_big or too_old):
                break  # entries are oldest first: the rest are newer and fit
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            total -= st.st_size
            freed += st.st_size
            removed += 1
        return {"removed": removed, "freed_bytes": freed, "remaining_bytes": total}
