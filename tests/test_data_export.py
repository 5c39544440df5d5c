"""Label Studio exports and label configs → partial-label examples."""

from __future__ import annotations

import json

import pytest

from backend.errors import ConfigError
from worker.training.data import examples_from_tasks, label_config_binding, read_export, resolve_image

LABELS = ["Coat", "Bag", "Sandal"]


def _choices(names, from_name="label", cancelled=False, updated="2024-01-01T00:00:00Z", ann_id=1):
    return {
        "id": ann_id,
        "was_cancelled": cancelled,
        "updated_at": updated,
        "result": [{"type": "choices", "from_name": from_name, "to_name": "image", "value": {"choices": names}}],
    }


def test_union_latest_cancelled_predictions_and_unknown_labels():
    tasks = [
        {"id": 1, "data": {"image": "a.png"},
         "annotations": [_choices(["Coat"], ann_id=1, updated="2024-01-02T00:00:00Z"),
                         _choices(["Bag"], ann_id=2, updated="2024-01-03T00:00:00Z")]},
        # cancelled annotation and an empty one: nothing usable → skipped
        {"id": 2, "data": {"image": "b.png"},
         "annotations": [_choices(["Coat"], cancelled=True), {"id": 3, "result": [], "was_cancelled": False}]},
        # predictions are never labels
        {"id": 3, "data": {"image": "c.png"}, "annotations": [],
         "predictions": [{"result": [{"type": "choices", "value": {"choices": ["Sandal"]}}]}]},
        # a choice outside the label set is dropped and counted
        {"id": 4, "data": {"image": "d.png"}, "annotations": [_choices(["Sandal", "Hat"])]},
        # another control's choices (different from_name) and non-choice results are ignored
        {"id": 5, "data": {"image": "e.png"},
         "annotations": [{"id": 9, "result": [
             {"type": "choices", "from_name": "quality", "value": {"choices": ["Bag"]}},
             {"type": "rectanglelabels", "from_name": "label", "value": {"rectanglelabels": ["Coat"]}},
             {"type": "choices", "from_name": "label", "value": {"choices": ["Coat"]}}]}]},
        {"id": 6, "data": {}, "annotations": [_choices(["Coat"])]},  # no image
    ]
    examples, report = examples_from_tasks(tasks, LABELS, from_name="label")
    assert [(e.task_id, e.image, e.positives) for e in examples] == [
        (1, "a.png", ["Coat", "Bag"]), (4, "d.png", ["Sandal"]), (5, "e.png", ["Coat"])]
    assert report.to_dict() == {
        "tasks": 6, "examples": 3, "skipped_no_image": 1, "skipped_no_labels": 2,
        "cancelled_annotations": 1, "unknown_labels": {"Hat": 1}}
    latest, _ = examples_from_tasks(tasks[:1], LABELS, policy="latest")
    assert latest[0].positives == ["Bag"]  # the annotation updated last


def test_label_config_parsing():
    xml = """<View>
      <Image name="img" value="$photo" zoom="true"/>
      <Choices name="tags" toName="img" choice="multiple">
        <Choice value="Coat"/><Choice value="Bag" hint="a handbag"/><Choice alias="sandal" value="Sandal"/>
      </Choices>
    </View>"""
    cfg = label_config_binding(xml)
    # Label Studio stores a choice's alias when it has one: that is the label's name.
    assert (cfg.names, cfg.control, cfg.object, cfg.data_key) == (["Coat", "Bag", "sandal"], "tags", "img", "photo")
    assert [label.texts for label in cfg.labels] == [(), ("a handbag",), ("Sandal",)]
    tasks = [{"id": 1, "data": {"photo": "p.png", "other": "x"},
              "annotations": [_choices(["Bag", "sandal"], from_name="tags")]}]
    examples, report = examples_from_tasks(tasks, cfg.names, from_name=cfg.control, image_field=cfg.data_key)
    assert examples[0].image == "p.png" and examples[0].positives == ["Bag", "sandal"]
    assert not report.unknown_labels
    with pytest.raises(ConfigError, match="no <Choices> bound to an <Image>"):
        label_config_binding("<View><Image name='i' value='$image'/></View>")
    with pytest.raises(ConfigError):
        label_config_binding("<View><Choices>")


def test_read_export_and_image_resolution(tmp_path):
    (tmp_path / "images").mkdir()
    image = tmp_path / "images" / "x.png"
    image.write_bytes(b"png")
    upload = tmp_path / "upload" / "3"
    upload.mkdir(parents=True)
    (upload / "5f2a-y.png").write_bytes(b"png")
    assert resolve_image("/data/local-files/?d=images/x.png", tmp_path) == str(image)
    assert resolve_image("/data/upload/3/5f2a-y.png", tmp_path) == str(upload / "5f2a-y.png")
    assert resolve_image("images/x.png", tmp_path) == str(image)
    assert resolve_image("https://example.com/x.png", tmp_path) == "https://example.com/x.png"
    assert resolve_image("/data/upload/9/missing.png", tmp_path) == "/data/upload/9/missing.png"

    path = tmp_path / "export.json"
    path.write_text(json.dumps([{"id": 1, "data": {"image": "/data/local-files/?d=images/x.png"},
                                 "annotations": [_choices(["Coat"])]}]))
    examples, _ = examples_from_tasks(read_export(path), LABELS, images_root=tmp_path)
    assert examples[0].image == str(image)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a JSON export"):
        read_export(path)
    path.write_text(json.dumps({"a": 1}))
    with pytest.raises(ConfigError, match="list of tasks"):
        read_export(path)
