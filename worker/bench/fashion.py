"""The real-image benchmark data: Fashion-MNIST outfit mosaics as Label Studio exports.

Source: the Fashion-MNIST idx files (Debian package ``dataset-fashion-mnist``, 70 000 real
photographs of clothing items, 28 × 28 greyscale). An image of the benchmark is a 2 × 2
mosaic of real items forming one *outfit* drawn from the structure in
``configs/bench/fashion_outfits.yaml`` (styles, slots, probabilities), so that label
co-occurrence is real and learnable. Train mosaics only use items of the training file,
test mosaics only items of the test file.

Everything is written the way a Label Studio user would have it: PNG files plus JSON
exports whose annotations carry a ``choices`` result. Test exports carry every label of
the image (complete truth); train exports carry *partial* labels (see
:func:`partial_labels`).
"""

from __future__ import annotations

import gzip
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from backend.errors import ConfigError

IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
#: where the Debian package installs the idx files; ``SEMLABEL_FASHION_MNIST_DIR`` overrides
DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
CELL = 28


def fashion_dir() -> Path:
    return Path(os.environ.get("SEMLABEL_FASHION_MNIST_DIR", DEFAULT_FASHION_DIR))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (optionally gzipped) as a numpy array (uint8 images or labels)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{path} not found: install the Fashion-MNIST idx files (Debian package "
            "dataset-fashion-mnist) or point SEMLABEL_FASHION_MNIST_DIR at them"
        ) from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ConfigError(f"{path}: not an idx file")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ConfigError(f"{path}: only unsigned-byte idx files are supported")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ConfigError(f"{path}: {array.size} values for shape {shape}")
    return array.reshape(shape)


def load_split(split: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images ``[N, 28, 28]`` uint8, labels ``[N]``) of ``train`` or ``test``."""
    root = Path(root) if root else fashion_dir()
    images_file, labels_file = IDX_FILES[split]
    images, labels = read_idx(root / images_file), read_idx(root / labels_file)
    if images.shape[0] != labels.shape[0]:
        raise ConfigError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


# ----------------------------------------------------------------------------- outfits
@dataclass
class OutfitStructure:
    classes: list[str]
    styles: dict[str, dict]
    min_items: int = 2

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "OutfitStructure":
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
        try:
            out = cls(list(raw["classes"]), dict(raw["styles"]), int(raw.get("min_items", 2)))
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: outfit structure needs `classes` and `styles` ({exc})") from exc
        for name, style in out.styles.items():
            for slot in style.get("slots", []):
                unknown = set(slot["choose"]) - set(out.classes)
                if unknown:
                    raise ConfigError(f"{path}: style {name!r} names unknown classes {sorted(unknown)}")
        if len(out.styles) == 0:
            raise ConfigError(f"{path}: no styles")
        return out

    def draw(self, rng: np.random.Generator) -> tuple[str, list[int]]:
        """One outfit: (style name, distinct class indices, 1..4 of them)."""
        names = list(self.styles)
        weights = np.array([float(self.styles[n].get("weight", 1.0)) for n in names])
        for _ in range(1000):
            style = names[rng.choice(len(names), p=weights / weights.sum())]
            picked: list[int] = []
            for slot in self.styles[style]["slots"]:
                if rng.random() >= float(slot.get("p", 1.0)):
                    continue
                options = list(slot["choose"])
                probs = np.array([float(slot["choose"][o]) for o in options])
                cls_index = self.classes.index(options[rng.choice(len(options), p=probs / probs.sum())])
                if cls_index not in picked:
                    picked.append(cls_index)
            if self.min_items <= len(picked) <= 4:
                return style, picked
        raise ConfigError("outfit structure never yields min_items distinct classes")


def mosaic(items: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """2 × 2 mosaic (56 × 56 uint8) with the items in random cells, empty cells black."""
    canvas = np.zeros((2 * CELL, 2 * CELL), dtype=np.uint8)
    cells = rng.permutation(4)[: len(items)]
    for item, cell in zip(items, cells):
        r, c = divmod(int(cell), 2)
        canvas[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = item
    return canvas


@dataclass
class MosaicSet:
    """Mosaics of one split: image file paths and their complete label sets (names)."""

    paths: list[Path]
    labels: list[list[str]]
    styles: list[str]
    items: list[list[int]]  # indices of the items (in their idx file) of every mosaic


def build_mosaics(
    structure: OutfitStructure,
    split: str,
    count: int,
    out_dir: str | os.PathLike,
    seed: int,
    source_root: str | os.PathLike | None = None,
    exclude_items: Sequence[int] = (),
) -> MosaicSet:
    """Write ``count`` outfit mosaics of the ``split`` items as PNG files under ``out_dir``.

    Deterministic for a given seed; existing identical files are left alone (so the
    feature cache, keyed by content, is reused by a second run). ``exclude_items``: item
    indices never used (validation mosaics leave out the training mosaics' items).
    """
    from PIL import Image

    images, labels = load_split(split, source_root)
    usable = np.ones(len(labels), dtype=bool)
    usable[np.asarray(list(exclude_items), dtype=np.int64)] = False
    by_class = [np.flatnonzero((labels == k) & usable) for k in range(len(structure.classes))]
    empty = [structure.classes[k] for k, items in enumerate(by_class) if len(items) == 0]
    if empty:
        raise ConfigError(f"{split}: no item of {', '.join(empty)} is left to build mosaics from")
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, label_sets, styles, used = [], [], [], []
    for i in range(count):
        style, classes = structure.draw(rng)
        chosen = [int(rng.choice(by_class[k])) for k in classes]
        pixels = mosaic([images[j] for j in chosen], rng)
        path = out_dir / f"{split}-{i:05d}.png"
        _write_png_if_changed(Image.fromarray(pixels, mode="L"), path)
        paths.append(path)
        label_sets.append([structure.classes[k] for k in classes])
        styles.append(style)
        used.append(chosen)
    return MosaicSet(paths, label_sets, styles, used)


def _write_png_if_changed(image, path: Path) -> None:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = buf.getvalue()
    if path.is_file() and path.read_bytes() == data:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------- partial labels
def partial_labels(
    label_sets: Sequence[Sequence[str]], mode: str, rng: np.random.Generator, keep: float = 0.5
) -> list[list[str]]:
    """What an annotator leaves behind.

    - ``single``: one positive per image, uniformly among its labels (the papers' setting);
    - ``partial``: each label kept with probability ``keep``, at least one per image;
    - ``full``: every label.
    """
    out = []
    for labels in label_sets:
        labels = list(labels)
        if mode == "full":
            out.append(labels)
        elif mode == "single":
            out.append([labels[rng.integers(len(labels))]])
        elif mode == "partial":
            kept = [name for name in labels if rng.random() < keep]
            if not kept:
                kept = [labels[rng.integers(len(labels))]]
            out.append(kept)
        else:
            raise ValueError(f"unknown label mode {mode!r} (single, partial, full)")
    return out


def label_studio_export(
    paths: Sequence[Path], labels: Sequence[Sequence[str]], from_name: str = "label", to_name: str = "image",
    first_id: int = 1,
) -> list[dict]:
    """Tasks in Label Studio's JSON export format, one annotation each."""
    tasks = []
    for i, (path, names) in enumerate(zip(paths, labels)):
        task_id = first_id + i
        tasks.append(
            {
                "id": task_id,
                "data": {"image": str(path)},
                "annotations": [
                    {
                        "id": task_id,
                        "completed_by": 1,
                        "was_cancelled": False,
                        "ground_truth": False,
                        "result": [
                            {
                                "id": f"r{task_id}",
                                "type": "choices",
                                "from_name": from_name,
                                "to_name": to_name,
                                "origin": "manual",
                                "value": {"choices": list(names)},
                            }
                        ],
                    }
                ],
                "predictions": [],
            }
        )
    return tasks


def label_config_xml(classes: Sequence[str], from_name: str = "label", to_name: str = "image") -> str:
    """The Label Studio labelling config of a multi-label image project over ``classes``."""
    from xml.sax.saxutils import quoteattr

    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    return (
        "<View>\n"
        f'  <Image name="{to_name}" value="$image"/>\n'
        f'  <Choices name="{from_name}" toName="{to_name}" choice="multiple">\n{choices}\n  </Choices>\n'
        "</View>\n"
    )


def write_json(path: Path, payload) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
