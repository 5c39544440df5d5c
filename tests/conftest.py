"""Shared fixtures. Everything runs against the real packaged weights, a real Redis and real
image files; the data directory is a fresh temporary one per test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Isolation before any semlabel import reads the settings.
_SESSION_DATA = Path(tempfile.mkdtemp(prefix="semlabel-test-"))
os.environ["SEMLABEL_DATA_DIR"] = str(_SESSION_DATA)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

SAMPLE_NAMES = ("chelsea", "coffee", "rocket", "astronaut", "camera")


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
    """Real photos from scikit-image, written as PNG files."""
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("samples")
    out = {}
    for name in SAMPLE_NAMES:
        path = root / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(path)
        out[name] = path
    return out
