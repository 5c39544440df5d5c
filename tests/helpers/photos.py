"""Real photographs the tests read, all shipped with the repository or the dev extra.

- :data:`PHOTO_DIR`: the darknet sample photos committed under ``tests/data/photos``
  (multi-object scenes; licence in that folder).
- :func:`skimage_photo`: the photographs inside the scikit-image wheel (``skimage.data``,
  no download needed), written as PNG.
"""

from __future__ import annotations

import shutil
from pathlib import Path

PHOTO_DIR = Path(__file__).resolve().parent.parent / "data" / "photos"
#: The darknet sample photos, by stem.
PHOTOS = ("dog", "eagle", "giraffe", "horses", "person", "kite", "scream")
#: scikit-image photographs that load from the wheel itself (no pooch download).
SKIMAGE_PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "camera")


def photo(name: str) -> Path:
    """Path of the committed darknet photo ``name`` (``"dog"`` → ``.../dog.jpg``)."""
    path = PHOTO_DIR / f"{name}.jpg"
    if not path.is_file():
        raise FileNotFoundError(f"no committed test photo {path}")
    return path


def copy_photos(root: Path, names=PHOTOS, broken: bool = False, not_an_image: bool = False) -> Path:
    """Copy photos into ``root`` (created); with ``broken``, add a truncated JPEG
    ``broken.jpg``; with ``not_an_image``, a text file named ``notes.jpg``."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(photo(name), root / f"{name}.jpg")
    if broken:
        data = photo("dog").read_bytes()
        (root / "broken.jpg").write_bytes(data[: len(data) // 3])
    if not_an_image:
        (root / "notes.jpg").write_text("these are not pixels")
    return root


def skimage_photo(name: str, root: Path, suffix: str = ".png") -> Path:
    """Write the scikit-image photograph ``name`` into ``root`` and return its path."""
    from PIL import Image
    from skimage import data

    path = root / f"{name}{suffix}"
    Image.fromarray(getattr(data, name)()).convert("RGB").save(path)
    return path
