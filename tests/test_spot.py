"""Spot suggestions: a point or box drawn with a smart tool ranks labels by the local evidence
there. Real weights (packaged backbone), real photos, the app through Flask's test client."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import redis as redis_lib

from tests.helpers.label_configs import multilabel_config
from tests.helpers.photos import PHOTO_DIR, copy_photos

FIXTURE = Path(__file__).parent / "data" / "spot_points.json"
LABELS = ["dog", "horse", "person", "giraffe", "bird", "kite", "car", "cat", "coffee cup", "rocket"]
CONFIG = multilabel_config(LABELS, smart=True)  # the README's
HORSE_POINT = (0.78, 0.52)  # the white horse in person.jpg
SIZES = {"person": (640, 424), "dog": (768, 576), "giraffe": (500, 500), "horses": (773, 512)}


# -- geometry (pure) ----------------------------------------------------------------------
def test_a_point_weighs_the_patches_around_it_inside_the_centre_crop():
    from backend.model.spot import Spot, patch_weights

    centre = patch_weights(Spot(0.5, 0.5, width=100, height=100), 49, 1.0, 0.75)
    assert centre.sum().item() == pytest.approx(1.0) and int(centre.argmax()) == 24  # row 3, col 3
    corner = patch_weights(Spot(0.0, 0.0, width=100, height=100), 49, 1.0, 0.75)
    assert int(corner.argmax()) == 0
    # A 2:1 image: the crop is the centred square, so x = 0.25 is the crop's left edge
    # and a point left of it falls on the first column.
    wide = patch_weights(Spot(0.1, 0.5, width=200, height=100), 49, 1.0, 0.75)
    assert int(wide.argmax()) == 3 * 7 + 0
    # The packaged backbone crops 224 of 256: the same point lands further in.
    assert int(patch_weights(Spot(0.05, 0.05, width=100, height=100), 49, 0.875, 0.75).argmax()) == 0
    edge = patch_weights(Spot(0.1, 0.5, width=100, height=100), 49, 0.875, 0.75)
    assert int(edge.argmax()) == 3 * 7 + 0


def test_a_box_weighs_the_patches_it_covers_by_area():
    from backend.model.spot import Spot, patch_weights

    left = patch_weights(Spot(0.0, 0.0, 0.5, 1.0, width=100, height=100), 49, 1.0, 0.75).reshape(7, 7)
    assert left[:, :3].sum().item() == pytest.approx(6 / 7)  # 3 full columns of 3.5
    assert left[:, 3].sum().item() == pytest.approx(1 / 7)  # half of the middle column
    assert left[:, 4:].sum().item() == 0.0
    outside = patch_weights(Spot(0.0, 0.0, 0.05, 0.05, width=400, height=100), 49, 1.0, 0.75)
    assert outside.sum().item() == pytest.approx(1.0) and int(outside.argmax()) == 0  # nearest patch


def test_spots_are_read_from_label_studio_keypoints_and_rectangles():
    from backend.ls.config import parse_label_config
    from backend.ls.results import spots

    config = parse_label_config(CONFIG)
    found = spots(config, [
        {"from_name": "point", "to_name": "image", "type": "keypoint", "original_width": 768,
         "original_height": 576, "value": {"x": 76.2, "y": 21.0, "width": 0.26}},
        {"from_name": "box", "to_name": "image", "type": "rectangle",
         "value": {"x": 10, "y": 20, "width": 30, "height": 40}},
        {"from_name": "point", "to_name": "elsewhere", "type": "keypoint", "value": {"x": 1, "y": 1}},
        {"from_name": "point", "to_name": "image", "type": "keypoint", "value": {"x": "left"}},
        {"from_name": "labels", "to_name": "image", "type": "choices", "value": {"choices": ["dog"]}},
    ])
    point, box = found["image"]
    assert (point.x, point.y, point.is_box, point.width, point.height) == (pytest.approx(0.762), 0.21, False, 768, 576)
    assert (box.x, box.y, box.w, box.h, box.is_box, box.width) == (0.1, 0.2, 0.3, 0.4, True, None)
    assert point.describe() == "point (76%, 21%)"


def test_current_choices_prefer_the_newest_draft_then_the_annotation_then_the_preannotation():
    from backend.ls.config import parse_label_config
    from backend.ls.results import current_choices

    config = parse_label_config(CONFIG)

    def res(*names):
        return [{"from_name": "labels", "to_name": "image", "type": "choices", "value": {"choices": list(names)}}]

    task = {"drafts": [{"result": res("dog"), "updated_at": "2026-01-01T10:00:00Z"},
                       {"result": res("dog", "horse"), "updated_at": "2026-01-01T10:05:00Z"}],
            "annotations": [{"result": res("cat")}],
            "predictions": [{"result": res("bird"), "model_version": "v1"}]}
    assert current_choices(config, task, "v1") == ({"labels": ["dog", "horse"]}, "draft")
    assert current_choices(config, {**task, "drafts": []}, "v1") == ({"labels": ["cat"]}, "annotation")
    preds = [{"result": res("bird"), "model_version": "v1", "created_at": "1"},
             {"result": res("kite"), "model_version": "other", "created_at": "2"}]
    assert current_choices(config, {"predictions": preds}, "v1") == ({"labels": ["bird"]}, "prediction")
    assert current_choices(config, {"id": 1}, "v1") == ({"labels": []}, "none")


# -- through the app ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(settings, runtime, redis_url, tmp_path_factory):
    from tests.test_app import app_settings, make_app

    photos = copy_photos(tmp_path_factory.mktemp("photos"))
    app = make_app(app_settings(settings, photos), runtime, redis_lib.Redis.from_url(redis_url),
                   tmp_path_factory.mktemp("store"))
    yield app.test_client(), photos
    app.extensions["semlabel"].close()


def _point(name, x, y, kind="keypoint", w=None, h=None):
    W, H = SIZES[name]
    value = {"x": 100 * x, "y": 100 * y, "width": 0.3}
    if kind == "rectangle":
        value = {"x": 100 * x, "y": 100 * y, "width": 100 * w, "height": 100 * h}
    return {"from_name": "point" if kind == "keypoint" else "box", "to_name": "image", "type": kind,
            "original_width": W, "original_height": H, "value": value, "origin": "manual"}


def _choices(*names):
    return [{"from_name": "labels", "to_name": "image", "type": "choices", "value": {"choices": list(names)}}]


_TASK_IDS = itertools.count(1000)


def _interactive(client, photos, name, spot, **task_extra):
    """One interactive /predict; each call is a new task unless ``id`` is given (the backend
    remembers its last answer per task)."""
    body = {"tasks": [{"id": next(_TASK_IDS), **task_extra, "data": {"image": str(photos / f"{name}.jpg")}}],
            "project": "41.1", "label_config": CONFIG, "params": {"context": {"result": [spot]}}}
    resp = client.post("/predict", json=body)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()["results"][0]


def test_a_point_on_the_unlabelled_dog_ticks_dog_and_keeps_the_draft_choices(client):
    c, photos = client
    draft = {"result": _choices("person", "horse"), "updated_at": "2026-01-01T10:00:00Z"}
    out = _interactive(c, photos, "person", _point("person", 0.22, 0.70), drafts=[draft],
                       predictions=[{"result": _choices("person"), "model_version": "x"}])
    labels = next(r for r in out["result"] if r["from_name"] == "labels")
    assert labels["value"]["choices"] == ["person", "horse", "dog"]
    meta = labels["meta"]
    assert meta["chosen"] == ["person", "horse"] and meta["chosen_from"] == "draft"
    spot = meta["spots"][0]
    assert spot["where"] == "point (22%, 70%)" and spot["ticked"] == ["dog"]
    first = spot["suggested"][0]
    assert first["label"] == "dog" and first["reasons"]["local"] > first["reasons"]["mean_local"]
    assert first["reasons"]["neighbours"] and first["reasons"]["spot"] == "point (22%, 70%)"
    assert out["score"] == pytest.approx(first["probability"], abs=1e-4)  # P(missing) of what was ticked
    text = next(r for r in out["result"] if r["from_name"] == "semlabel_reasons")["value"]["text"]
    assert text[0].startswith("point (22%, 70%) (ticked): dog ") and "here " in text[0] and "vs image" in text[0]
    assert any(line.startswith("likely missing in the image: ") for line in text)


def test_a_box_around_the_zebra_region_ranks_by_what_is_inside_it(client):
    c, photos = client
    # the config has no zebra: the box on the zebra gets horse (its nearest label), the
    # chosen giraffe stays
    spot = _point("giraffe", 0.5, 0.4, kind="rectangle", w=0.35, h=0.45)
    out = _interactive(c, photos, "giraffe", spot, predictions=[{"result": _choices("giraffe"), "model_version": "v"}])
    labels = next(r for r in out["result"] if r["from_name"] == "labels")
    assert labels["value"]["choices"][0] == "giraffe" and len(labels["value"]["choices"]) == 2
    assert labels["meta"]["chosen_from"] == "prediction"
    assert labels["meta"]["spots"][0]["where"].startswith("box 50–85% × 40–85%")


def test_the_annotators_choices_are_never_removed_wherever_they_point(client):
    """Every point of a 5 × 5 grid on three photos, with chosen labels taken from the
    draft: the answer's choices always start with all of them (Label Studio replaces the
    annotation's choices by the answer's)."""
    c, photos = client
    chosen = {"person": ["person", "kite", "cat"], "dog": ["dog"], "giraffe": ["giraffe", "bird", "rocket"]}
    for name, labels in chosen.items():
        for x in (0.1, 0.3, 0.5, 0.7, 0.9):
            for y in (0.1, 0.3, 0.5, 0.7, 0.9):
                out = _interactive(c, photos, name, _point(name, x, y), drafts=[{"result": _choices(*labels)}])
                choices = next(r for r in out["result"] if r["from_name"] == "labels")["value"]["choices"]
                assert choices[: len(labels)] == labels and len(choices) <= len(labels) + 1
                assert len(set(choices)) == len(choices)


def test_choices_in_the_context_still_get_the_images_likely_missing_labels(client):
    c, photos = client
    body = {"tasks": [{"id": 1, "data": {"image": str(photos / "dog.jpg")}}], "project": "41.1",
            "label_config": CONFIG, "params": {"context": {"result": _choices("dog")}}}
    out = c.post("/predict", json=body).get_json()["results"][0]
    labels = next(r for r in out["result"] if r["from_name"] == "labels")
    assert labels["value"]["choices"][0] == "dog" and "spots" not in labels["meta"]
    assert len(labels["value"]["choices"]) > 1


def test_the_fixture_points_stay_on_their_photos():
    data = json.loads(FIXTURE.read_text())
    for item in data["images"]:
        if item["source"] == "darknet":
            assert (PHOTO_DIR / f"{item['photo']}.jpg").is_file()
        for obj in item["objects"]:
            assert obj["target"] in item["labels"] and obj["target"] in data["labels"]
            x, y, w, h = obj["box"]
            assert 0 <= x <= x + w <= 1 and 0 <= y <= y + h <= 1
            assert all(0 <= v <= 1 for v in obj["point"])


def test_a_sigrl_model_scores_the_spot_with_its_adapted_features_attention_and_chosen_labels(runtime):
    """An untrained SigRL model (the zero-shot model plus heads at their initial values) with
    co-occurrence counts: the spot's reasons carry SVFR's attention and the chosen labels that
    co-occur with the suggestion."""
    from backend.images import ImageBlob
    from backend.model.checkpoint import TrainedModel
    from backend.model.cooccurrence import CooccurrenceStats
    from backend.model.serving import SigRLPredictor
    from backend.model.sigrl import SigRL
    from backend.model.spot import Spot, crop_fraction, suggest_at_spot

    bb = runtime.backbone
    module = SigRL(bb.dim, runtime.settings.model, bb.zero_shot_scale, bb.zero_shot_bias)
    stats = CooccurrenceStats.from_label_sets([["dog", "person", "horse"], ["person", "horse"], ["dog"]])
    model = TrainedModel(module, ["dog", "person", "horse"], stats, {"name": bb.name, "fingerprint": bb.fingerprint,
                                                                      "dim": bb.dim}, model_id="t1")
    predictor = SigRLPredictor.from_settings(model, runtime.settings, zero_shot=runtime.zero_shot_predictor())
    path = PHOTO_DIR / "person.jpg"
    feats = runtime.features.get_or_compute([ImageBlob(str(path), path.read_bytes())])[0]
    space = runtime.label_space(LABELS)
    items = suggest_at_spot(predictor, feats, space, ["dog", "person"], Spot(0.78, 0.52, width=640, height=424),
                            top_k=3, min_probability=0.0, sigma=1.5, gain=5.0, fraction=crop_fraction(bb),
                            co_occurring=runtime.settings.suggest.co_occurring,
                            neighbours=runtime.settings.suggest.neighbours)
    assert len(items) == 3 and all(s.label not in ("dog", "person") for s in items)
    assert [s.probability for s in items] == sorted((s.probability for s in items), reverse=True)
    horse = next((s for s in items if s.label == "horse"), None)
    assert horse is not None and horse.reasons.attention is not None and horse.reasons.attention > 0
    assert dict(horse.reasons.co_occurring) == {"person": 1.0, "dog": 0.5}  # P(horse | chosen)


def test_two_quick_points_keep_the_first_points_label(client):
    """Label Studio's draft lags 5 s behind the page: a second point before it is saved
    builds on the backend's previous answer for the task, so the first point's label stays
    ticked."""
    c, photos = client
    draft = {"result": _choices("dog", "person"), "updated_at": "2026-01-01T10:00:00Z"}

    def labels_of(out):
        return next(r for r in out["result"] if r["from_name"] == "labels")

    first = _interactive(c, photos, "person", _point("person", *HORSE_POINT), drafts=[draft], id=77)
    ticked = labels_of(first)["value"]["choices"]
    assert ticked[:2] == ["dog", "person"] and len(ticked) == 3  # one label added for the spot
    second = _interactive(c, photos, "person", _point("person", 0.36, 0.45), drafts=[draft], id=77)
    region = labels_of(second)
    assert region["value"]["choices"][:3] == ticked  # the first point's label is still ticked
    assert region["meta"]["chosen_from"] == "draft+last answer"
    # a draft saved after the answer is the page's state again
    newer = {"result": _choices("dog"), "updated_at": "2099-01-01T10:00:00Z"}
    third = _interactive(c, photos, "person", _point("person", *HORSE_POINT), drafts=[newer], id=77)
    assert labels_of(third)["meta"]["chosen"] == ["dog"]
