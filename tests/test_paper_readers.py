"""Readers of the paper protocol (`semlabel paper`) on tiny fixtures in each dataset's
official layout (the datasets themselves are not available here)."""

from __future__ import annotations

import json

import pytest

from backend.errors import ConfigError
from worker.bench.paper import VOC_CLASSES, read_coco, read_nuswide, read_voc, single_positive


def _voc(root, rows):
    """rows: phase → {image id: {class: value}} (missing classes are -1)."""
    main = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main"
    main.mkdir(parents=True)
    for phase, images in rows.items():
        for cls in VOC_CLASSES:
            lines = [f"{img} {values.get(cls, -1):>2}" for img, values in images.items()]
            (main / f"{cls}_{phase}.txt").write_text("\n".join(lines) + "\n")


def test_voc_2012_layout(tmp_path):
    _voc(tmp_path, {
        "train": {"2008_000008": {"horse": 1, "person": 1}, "2008_000015": {"bottle": 0, "dog": 1},
                  "2008_000019": {"bottle": 0}},
        "val": {"2008_000002": {"tvmonitor": 1}},
    })
    data = read_voc(tmp_path)
    assert data.classes == VOC_CLASSES and len(data.classes) == 20
    # 1 is positive; 0 ("difficult") is not; an image without any positive is dropped.
    assert data.train.labels == [["horse", "person"], ["dog"]]
    assert data.train.images[0].endswith("VOCdevkit/VOC2012/JPEGImages/2008_000008.jpg")
    assert data.test.labels == [["tvmonitor"]]
    # The VOC2012 directory itself is accepted as the root too.
    assert read_voc(tmp_path / "VOCdevkit" / "VOC2012").train.labels == data.train.labels
    with pytest.raises(ConfigError, match="official layout"):
        read_voc(tmp_path / "nothing")


def test_coco_2014_layout(tmp_path):
    (tmp_path / "annotations").mkdir()
    cats = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 3, "name": "car"}]
    for phase, images, anns in (
        ("train", [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg"},
                   {"id": 25, "file_name": "COCO_train2014_000000000025.jpg"},
                   {"id": 30, "file_name": "COCO_train2014_000000000030.jpg"}],
         [{"image_id": 9, "category_id": 18}, {"image_id": 9, "category_id": 1}, {"image_id": 9, "category_id": 1},
          {"image_id": 25, "category_id": 3}]),
        ("val", [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"}], [{"image_id": 42, "category_id": 1}]),
    ):
        (tmp_path / "annotations" / f"instances_{phase}2014.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
    data = read_coco(tmp_path)
    assert data.classes == ["person", "car", "dog"]  # category id order
    assert data.train.labels == [["person", "dog"], ["car"]]  # image 30 has no instance
    assert data.train.images[0] == str(tmp_path / "train2014" / "COCO_train2014_000000000009.jpg")
    assert data.test.labels == [["person"]]


def test_nuswide_layout(tmp_path):
    concepts = ["animal", "sky", "water"]
    (tmp_path / "Concepts81.txt").write_text("\n".join(concepts) + "\n")
    (tmp_path / "ImageList").mkdir()
    (tmp_path / "ImageList" / "TrainImagelist.txt").write_text(
        "actor\\0001_2124494179.jpg\nairport\\0001_2143985467.jpg\nanimal\\0003_1234.jpg\n")
    (tmp_path / "ImageList" / "TestImagelist.txt").write_text("beach\\0002_999.jpg\n")
    gt = tmp_path / "Groundtruth" / "TrainTestLabels"
    gt.mkdir(parents=True)
    train = {"animal": [1, 0, 0], "sky": [1, 1, 0], "water": [0, 0, 0]}
    test = {"animal": [0], "sky": [1], "water": [1]}
    for concept in concepts:
        (gt / f"Labels_{concept}_Train.txt").write_text("\n".join(map(str, train[concept])) + "\n")
        (gt / f"Labels_{concept}_Test.txt").write_text("\n".join(map(str, test[concept])) + "\n")
    data = read_nuswide(tmp_path)
    assert data.classes == concepts
    assert data.train.labels == [["animal", "sky"], ["sky"]]  # the third image has no label
    assert data.train.images[0] == str(tmp_path / "Flickr" / "actor" / "0001_2124494179.jpg")
    assert data.test.labels == [["sky", "water"]]
    (gt / "Labels_water_Test.txt").write_text("1\n0\n")
    with pytest.raises(ConfigError, match="2 labels for 1 images"):
        read_nuswide(tmp_path)


def test_single_positive_sampling_is_seeded():
    sets = [["a", "b", "c"], ["d"], ["e", "f"]] * 20
    one = single_positive(sets, seed=0)
    assert one == single_positive(sets, seed=0) and one != single_positive(sets, seed=1)
    assert all(len(o) == 1 and o[0] in s for o, s in zip(one, sets))
