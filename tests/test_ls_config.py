"""Label config parsing (label-studio-sdk LabelInterface) and Label Studio result JSON."""

from __future__ import annotations

import pytest

from backend.errors import ConfigError
from backend.labels import Label
from backend.ls.config import ConfigCache, TaskDataError, parse_label_config
from backend.ls.results import p_missing, preannotation, suggestions
from backend.model.predictor import Reasons, Suggestion
from backend.settings import get_settings

MULTI = """<View>
  <Image name="photo" value="$image"/>
  <Image name="detail" value="$closeup"/>
  <Text name="caption" value="$text"/>
  <Choices name="objects" toName="photo" choice="multiple">
    <Choice value="cat"/>
    <Choice value="dog" alias="puppy" hint="A young dog"/>
    <Choice value="Motor vehicle" alias="car"/>
  </Choices>
  <Choices name="scene" toName="detail">
    <Choice value="indoor"/><Choice value="outdoor"/>
  </Choices>
  <Choices name="sentiment" toName="caption"><Choice value="positive"/></Choices>
  <TextArea name="semlabel_reasons" toName="photo" editable="false"/>
</View>"""


def test_every_choices_bound_to_an_image_is_served_with_aliases_and_hints():
    cfg = parse_label_config(MULTI)
    assert [(b.control, b.object, b.data_key, b.multiple) for b in cfg.bindings] == [
        ("objects", "photo", "image", True),
        ("scene", "detail", "closeup", False),
    ]
    objects = cfg.bindings[0]
    # The stored value is the alias; the value and the hint become extra prompt texts.
    assert objects.labels == (
        Label("cat"),
        Label("puppy", ("dog", "A young dog")),
        Label("car", ("Motor vehicle",)),
    )
    assert cfg.reasons == {"semlabel_reasons": "photo"}
    assert any("sentiment" in note and "Text" in note for note in cfg.notes)


def test_a_config_without_choices_on_an_image_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="no <Choices> bound to an <Image>.*'sentiment'.*<Text"):
        parse_label_config('<View><Text name="t" value="$t"/><Choices name="sentiment" toName="t">'
                           '<Choice value="a"/></Choices></View>')
    with pytest.raises(ConfigError, match="no <Choices> at all"):
        parse_label_config('<View><Image name="i" value="$i"/><Labels name="l" toName="i">'
                           '<Label value="x"/></Labels></View>')
    with pytest.raises(ConfigError, match="not valid XML"):
        parse_label_config("<View><Image name='i' value='$i'/>")
    with pytest.raises(ConfigError, match="empty"):
        parse_label_config("  ")
    with pytest.raises(ConfigError, match="per region"):
        parse_label_config('<View><Image name="i" value="$i"/><Choices name="c" toName="i" perRegion="true">'
                           '<Choice value="a"/></Choices></View>')


def test_chosen_values_map_back_to_labels_and_unknown_ones_are_reported():
    cfg = parse_label_config(MULTI)
    result = [
        {"from_name": "objects", "to_name": "photo", "type": "choices", "value": {"choices": ["puppy", "bird"]}},
        {"from_name": "scene", "to_name": "detail", "type": "choices", "value": {"choices": ["outdoor"]}},
        {"from_name": "semlabel_reasons", "to_name": "photo", "type": "textarea", "value": {"text": ["x"]}},
        {"from_name": "nope", "to_name": "photo", "type": "choices", "value": {"choices": ["cat"]}},
    ]
    chosen, unknown = cfg.chosen(result)
    assert chosen == {"objects": ["puppy"], "scene": ["outdoor"]}
    assert unknown == ["objects:bird"]


def test_image_source_comes_from_the_task_data():
    cfg = parse_label_config(MULTI)
    photo = cfg.bindings[0]
    assert photo.source({"id": 1, "data": {"image": " /data/upload/1/a.jpg "}}) == "/data/upload/1/a.jpg"
    with pytest.raises(TaskDataError, match="no image under 'image'"):
        photo.source({"id": 1, "data": {"img": "x"}})
    with pytest.raises(TaskDataError, match="no 'data'"):
        photo.source({"id": 1})


def test_cache_returns_the_same_parse_and_repeats_errors():
    backend = get_settings().backend
    cache = ConfigCache(backend.reasons_textarea, backend.max_label_configs)
    assert cache.get(MULTI) is cache.get(MULTI)
    for _ in range(2):
        with pytest.raises(ConfigError):
            cache.get("<View/>")


def _sugg(label, p):
    return Suggestion(label, p, Reasons(visual=p, zero_shot=p - 0.1, co_occurring=[("cat", 0.5)],
                                        neighbours=[("dog", 0.8)], taxonomy_path=["animal", label]))


def test_preannotation_picks_labels_over_the_threshold_and_at_least_one():
    from label_studio_sdk.label_interface import LabelInterface

    cfg = parse_label_config(MULTI)
    scores = {("objects", "photo"): [0.9, 0.6, 0.2], ("scene", "detail"): [0.3, 0.4]}
    pred = preannotation(cfg, scores, "v1", threshold=0.5, max_labels=10, reasons_labels=10)
    objects, scene, reasons = pred["result"]
    assert objects["value"]["choices"] == ["cat", "puppy"]
    assert objects["score"] == pytest.approx(0.75)
    assert list(objects["meta"]["scores"]) == ["cat", "puppy", "car"]  # most likely first
    assert scene["value"]["choices"] == ["outdoor"]  # single choice: the best one, under the threshold
    assert pred["score"] == pytest.approx((0.75 + 0.4) / 2, abs=1e-4)
    assert reasons["type"] == "textarea" and reasons["readonly"] is True
    assert reasons["value"]["text"][0].startswith("objects: scores cat 90%, puppy 60%, car 20%")
    assert LabelInterface(MULTI).validate_prediction(pred, return_errors=True) == []
    # nothing over the threshold: still one label; max_labels caps
    low = preannotation(cfg, {("objects", "photo"): [0.1, 0.3, 0.2], ("scene", "detail"): [0.6, 0.4]}, "v1",
                        threshold=0.5, max_labels=10, reasons_labels=10)
    assert low["result"][0]["value"]["choices"] == ["puppy"]
    capped = preannotation(cfg, {("objects", "photo"): [0.9, 0.8, 0.7], ("scene", "detail"): [0.6, 0.4]}, "v1",
                           threshold=0.5, max_labels=2, reasons_labels=10)
    assert capped["result"][0]["value"]["choices"] == ["cat", "puppy"]


def test_suggestions_keep_the_chosen_labels_first_and_score_p_missing():
    from label_studio_sdk.label_interface import LabelInterface

    cfg = parse_label_config(MULTI)
    pred = suggestions(cfg, {"objects": ["cat"], "scene": ["indoor"]},
                       {("objects", "photo"): [_sugg("puppy", 0.6), _sugg("car", 0.5)],
                        ("scene", "detail"): [_sugg("outdoor", 0.9)]},
                       "v1", ignored=["objects:bird"])
    objects, scene, reasons = pred["result"]
    assert objects["value"]["choices"] == ["cat", "puppy", "car"]
    assert objects["meta"]["chosen"] == ["cat"]
    assert [s["label"] for s in objects["meta"]["suggested"]] == ["puppy", "car"]
    assert objects["meta"]["suggested"][0]["reasons"] == {
        "visual": 0.6, "zero_shot": 0.5, "co_occurring": [["cat", 0.5]], "neighbours": [["dog", 0.8]],
        "taxonomy_path": ["animal", "puppy"]}
    assert objects["score"] == pytest.approx(1 - 0.4 * 0.5)
    # single choice with a chosen label: nothing is added
    assert scene["value"]["choices"] == ["indoor"] and scene["meta"]["suggested"] == []
    assert pred["score"] == pytest.approx(0.8)
    assert objects["meta"]["ignored"] == ["objects:bird"]
    text = reasons["value"]["text"]
    assert text[0] == ("objects: likely missing: puppy 60%: visual 0.60; zero-shot 0.50; often with cat (0.50); "
                       "near dog (0.80); taxonomy animal › puppy")
    assert text[-1] == "ignored (not in the label config): objects:bird"
    assert LabelInterface(MULTI).validate_prediction(pred, return_errors=True) == []


def test_p_missing():
    assert p_missing([]) == 0.0
    assert p_missing([0.5]) == 0.5
    assert p_missing([0.5, 0.5]) == 0.75
    assert p_missing([1.2, -1]) == 1.0


def test_the_tests_recommended_config_is_the_readmes():
    """The config the Label Studio tests send (``smart=True``) has the README's shape: the same
    elements with the same attributes, in order, but for the ``<Choice>`` list itself."""
    import re
    import xml.etree.ElementTree as ET
    from pathlib import Path

    from tests.helpers.label_configs import multilabel_config

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Recommended label config", 1)[1]
    block = re.search(r"```xml\n(.*?)```", section, re.S).group(1)

    def shape(xml: str):
        return [(e.tag, e.attrib) for e in ET.fromstring(xml).iter() if e.tag != "Choice"]

    assert shape(multilabel_config(["dog"], smart=True)) == shape(block)
    assert parse_label_config(block).bindings[0].names == ["dog", "horse", "car"]
