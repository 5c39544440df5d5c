"""Shared fixtures. Everything runs against the real packaged weights, a real Redis and real
image files; the data directory is a fresh temporary one per test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Isolation before any semlabel import reads the settings.
_SESSION_DATA = Path(tempfile.mkdtemp(prefix="semlabel-test-"))
os.environ["SEMLABEL_DATA_DIR"] = str(_SESSION_DATA)
# The tests build their outfit mosaics from the Fashion-MNIST slice that ships in the repo
# (the full set is for `semlabel bench` only), so every machine sees the same images.
os.environ["SEMLABEL_FASHION_MNIST_DIR"] = str(Path(__file__).resolve().parent / "data" / "fashion-mnist")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.helpers.photos import SKIMAGE_PHOTOS as SAMPLE_NAMES  # noqa: E402


@pytest.fixture(scope="session")
def session_data_dir() -> Path:
    return _SESSION_DATA


@pytest.fixture(scope="session")
def settings():
    from backend.settings import reload_settings

    return reload_settings()


@pytest.fixture(scope="session")
def runtime(settings):
    """The packaged backbone with its caches in the session data dir (loaded once)."""
    from backend.runtime import Runtime

    return Runtime.create(settings, backbone_kind="packaged")


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> dict[str, Path]:
    """Real photos from the scikit-image wheel, written as PNG files."""
    from tests.helpers.photos import skimage_photo

    root = tmp_path_factory.mktemp("samples")
    return {name: skimage_photo(name, root) for name in SAMPLE_NAMES}


@pytest.fixture(scope="session")
def redis_url():
    """URL of a private database on a real Redis (the one on 127.0.0.1:6379, else an embedded
    valkey started for the session; see tests/helpers/redis_server.py), claimed for this session and
    flushed at the end."""
    from tests.helpers.redis_server import claim_db, release_db

    url, client = claim_db()
    yield url
    release_db(client)


@pytest.fixture
def redis_conn(redis_url):
    """A client of the session's private database, emptied after the test."""
    import redis

    from tests.helpers.redis_server import reset_db

    client = redis.Redis.from_url(redis_url)
    yield client
    reset_db(client)


@pytest.fixture(scope="session")
def fashion_set(runtime, tmp_path_factory):
    """Real Fashion-MNIST outfit mosaics (configs/bench/fashion_outfits.yaml) with their
    packaged-backbone features, built once per session: 320 train + 200 test images.

    A dict: ``classes``, ``train``/``test`` → ``{"paths", "labels" (complete), "G", "L",
    "features", "batch"}`` (``batch``: every feature, native ones included, as one
    EncodedImages), ``root`` (the image directory)."""
    import torch

    from backend.features import stack_all
    from backend.settings import config_dir
    from worker.bench.fashion import OutfitStructure, build_mosaics

    structure = OutfitStructure.from_yaml(config_dir() / "bench" / "fashion_outfits.yaml")
    root = tmp_path_factory.mktemp("fashion")
    out = {"classes": structure.classes, "root": root}
    for split, count, seed in (("train", 320, 0), ("test", 200, 1)):
        mosaics = build_mosaics(structure, split, count, root, seed=seed)
        feats = runtime.features_for([str(p) for p in mosaics.paths], progress=False)
        out[split] = {
            "paths": mosaics.paths,
            "labels": mosaics.labels,
            "features": feats,
            "G": torch.stack([f.global_ for f in feats]),
            "L": torch.stack([f.local for f in feats]),
            "batch": stack_all(feats),
        }
    return out
