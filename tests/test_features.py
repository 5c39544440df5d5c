"""FeatureStore: computed once, safe under concurrent writers, bounded in size."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import numpy as np
import torch

from backend.features import Features, FeatureStore
from backend.settings import Settings


class _Named:
    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint


def test_second_request_reads_the_cache(runtime, sample_images):
    paths = [str(sample_images[n]) for n in ("chelsea", "coffee", "rocket")]
    before_hits, before_computed = runtime.features.hits, runtime.features.computed
    first = runtime.features_for(paths)
    computed_first = runtime.features.computed - before_computed
    second = runtime.features_for(paths + paths[:1])  # a duplicate in the batch too
    assert runtime.features.computed - before_computed == computed_first  # nothing recomputed
    assert runtime.features.hits - before_hits >= 4
    for a, b in zip(first, second):
        assert torch.equal(a.global_, b.global_) and torch.equal(a.local, b.local)
        # the native features are cached too, in the storage precision (fp16)
        assert torch.equal(a.native_global, b.native_global) and torch.equal(a.native_local, b.native_local)
        assert a.native_local.shape == (49, 1280)


def test_the_cache_key_changes_with_the_preprocessing(tmp_path, settings, runtime, sample_images):
    """Features made with another preprocessing (or feature version) live under another
    fingerprint: a store never returns features made another way."""
    from backend.backbones import create_backbone
    from backend.backbones.base import FEATURE_VERSION
    from backend.settings import Settings

    data = settings.model_dump()
    data["backbone"]["image_fit"] = "crop"
    crop = create_backbone(Settings(**data), kind="packaged", text_cache=runtime.text_cache)
    assert crop.fingerprint != runtime.backbone.fingerprint
    pad_store, crop_store = FeatureStore(tmp_path, runtime.backbone), FeatureStore(tmp_path, crop)
    assert pad_store.dir != crop_store.dir
    blob = runtime.loader.fetch(str(sample_images["astronaut"]))
    (padded,) = pad_store.get_or_compute([blob])
    assert crop_store.get(blob.key) is None  # not a hit for the other preprocessing
    (cropped,) = crop_store.get_or_compute([blob])
    assert crop_store.computed == 1 and not torch.equal(padded.native_global, cropped.native_global)
    # the feature version is part of the fingerprint as well
    import backend.backbones.base as base

    before = runtime.backbone.fingerprint
    base.FEATURE_VERSION = FEATURE_VERSION + 1
    try:
        assert runtime.backbone.fingerprint != before
    finally:
        base.FEATURE_VERSION = FEATURE_VERSION


def test_duplicates_within_one_batch_are_encoded_once(tmp_path, runtime, sample_images):
    store = FeatureStore(tmp_path, runtime.backbone, Settings(backbone={"batch_size": 2}))
    blob = runtime.loader.fetch(str(sample_images["camera"]))
    out = store.get_or_compute([blob, blob, blob])
    assert store.computed == 1 and len(out) == 3
    assert all(torch.equal(o.local, out[0].local) for o in out)


def test_one_bad_image_does_not_fail_the_batch(tmp_path, runtime, sample_images):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"GIF89a but not really")
    out = runtime.features_for([str(sample_images["chelsea"]), str(bad), str(tmp_path / "none.png")])
    assert isinstance(out[0], Features)
    assert "not an image" in str(out[1]) and "file not found" in str(out[2])


def _write_many(root: str, key: str, value: float, rounds: int) -> None:
    store = FeatureStore(root, _Named("fp"))
    for _ in range(rounds):
        store.put(Features(key, torch.full((8,), value), torch.full((4, 8), value)))


def _read_many(root: str, key: str, rounds: int, queue) -> None:
    store = FeatureStore(root, _Named("fp"))
    seen = set()
    reads, deadline = 0, time.monotonic() + 60
    # At least `rounds` reads of an existing entry (the writers may start after the reader).
    while reads < rounds and time.monotonic() < deadline:
        f = store.get(key)
        if f is not None:
            reads += 1
            # A reader sees one writer's complete entry, never a mix or a partial file.
            assert torch.unique(f.local).numel() == 1 and f.global_[0] == f.local[0, 0]
            seen.add(float(f.global_[0]))
    queue.put(sorted(seen))


def test_concurrent_writers_and_readers_never_see_a_broken_entry(tmp_path):
    key = "ab" + "0" * 62
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_write_many, args=(str(tmp_path), key, v, 300)) for v in (1.0, 2.0)]
    procs.append(ctx.Process(target=_read_many, args=(str(tmp_path), key, 2000, queue)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    seen = queue.get(timeout=5)
    assert seen and set(seen) <= {1.0, 2.0}
    final = FeatureStore(tmp_path, _Named("fp")).get(key)
    assert float(final.global_[0]) in (1.0, 2.0)
    leftovers = [p for p in (tmp_path / "fp").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_corrupt_entry_is_recomputed(tmp_path, runtime, sample_images):
    store = FeatureStore(tmp_path, runtime.backbone)
    blob = runtime.loader.fetch(str(sample_images["rocket"]))
    good = store.get_or_compute([blob])[0]
    store.path(blob.key).write_bytes(b"PK\x03\x04 truncated zip")
    assert store.get(blob.key) is None
    again = store.get_or_compute([blob])[0]
    assert store.computed == 2
    assert torch.allclose(again.global_, good.global_)


def test_fp16_storage_and_size(tmp_path, runtime, sample_images):
    store = FeatureStore(tmp_path, runtime.backbone, Settings(features={"dtype": "float16"}))
    blob = runtime.loader.fetch(str(sample_images["coffee"]))
    store.get_or_compute([blob])
    with np.load(store.path(blob.key)) as data:
        assert data["local"].dtype == np.float16 and data["local"].shape == (49, 384)
        assert data["native_local"].dtype == np.float16 and data["native_local"].shape == (49, 1280)
    width = 384 + 1280  # aligned + native, every location and the pooled vector, 2 bytes each
    assert store.path(blob.key).stat().st_size < 50 * width * 2 + 2048


def test_gc_drops_least_recently_used_first(tmp_path):
    store = FeatureStore(tmp_path, _Named("fp"))
    keys = [f"{i:02x}" + "f" * 62 for i in range(6)]
    for i, key in enumerate(keys):
        store.put(Features(key, torch.zeros(64), torch.zeros(16, 64)))
        os.utime(store.path(key), (1_000_000 + i, 1_000_000 + i))
    store.get(keys[0])  # reading refreshes recency
    size = store.path(keys[0]).stat().st_size
    result = store.gc(max_bytes=3 * size)
    assert result["removed"] == 3
    kept = {k for k in keys if store.path(k).exists()}
    assert kept == {keys[0], keys[4], keys[5]}


def test_automatic_gc_every_n_writes(tmp_path):
    store = FeatureStore(tmp_path, _Named("fp"), Settings(features={"max_size_gb": 1e-9, "gc_every_writes": 5}))
    for i in range(5):
        store.put(Features(f"{i:02x}" + "e" * 62, torch.zeros(64), torch.zeros(16, 64)))
    assert store.size_bytes() == 0
