"""Backbones: the packaged one's real zero-shot ranking, open_clip round trips, the factory."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from backend.backbones import create_backbone
from backend.backbones.openclip import OpenClipBackbone, _host_reachable
from backend.errors import BackboneUnavailable
from backend.images import ImageLoader, decode
from backend.settings import Settings

TINY_CONFIGS = str(Path(__file__).parent / "data" / "open_clip")
_BB = Settings().backbone
CLIP = dict(probe_timeout=_BB.network_probe_timeout_s, image_fit=_BB.image_fit, text_batch_size=_BB.text_batch_size)
ZERO_SHOT_LABELS = ["cat", "truck", "coffee cup", "rocket", "person"]


@pytest.mark.parametrize("image, expected", [("chelsea", "cat"), ("coffee", "coffee cup"), ("rocket", "rocket")])
def test_packaged_zero_shot_ranks_the_right_label_first(runtime, sample_images, image, expected):
    space = runtime.label_space(ZERO_SHOT_LABELS)
    (features,) = runtime.features_for([str(sample_images[image])])
    probs = runtime.zero_shot([features], space)[0]
    ranked = [space.names[i] for i in probs.argsort(descending=True)]
    assert ranked[0] == expected, dict(zip(space.names, probs.tolist()))
    # The calibration fitted from data is cautious: the weak packaged zero-shot pre-selects
    # nothing (no label above 0.5) rather than wrong labels; the ranking stays.
    assert (probs < 0.5).all() and probs[space.index[expected]] > probs[space.index["truck"]]


def test_packaged_features_are_normalised(runtime, sample_images):
    (features,) = runtime.features_for([str(sample_images["astronaut"])])
    assert features.global_.shape == (runtime.backbone.dim,) == (384,)
    assert features.local.shape == (49, 384)
    assert torch.allclose(features.global_.norm(), torch.tensor(1.0), atol=1e-2)  # fp16 on disk
    assert torch.allclose(features.local.norm(dim=-1), torch.ones(49), atol=1e-2)
    text = runtime.backbone.encode_texts(["a cat", "a dog"])
    assert text.shape == (2, 384) and torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_packaged_native_features_are_the_pooled_map_and_the_7x7_map(runtime):
    """EfficientNet-Lite0's own features: the 1280-d feature map at every one of the 7 × 7
    locations, and its average pool (what the ImageNet classifier reads)."""
    from PIL import Image

    from tests.helpers.photos import photo

    backbone = runtime.backbone
    assert not backbone.native_is_aligned and backbone.native_dim == 1280
    (features,) = runtime.features_for([str(photo("dog"))])
    assert features.native_global.shape == (1280,) and features.native_local.shape == (49, 1280)
    assert torch.allclose(features.native_local.mean(0), features.native_global, atol=2e-2)
    encoded = backbone.encode_images([Image.open(photo("dog")).convert("RGB")])
    assert torch.allclose(encoded.native_global[0], features.native_global, atol=2e-2, rtol=1e-2)  # fp16 cache
    with torch.inference_mode():
        logits = backbone.image_model.classifier(encoded.native_global)  # the pool feeds the classifier
    assert logits.shape == (1, 1000)


def test_whole_image_preprocessing_keeps_the_borders_and_changes_the_fingerprint(settings):
    """``pad`` (default) sees the whole image: a wide photo is letterboxed, not cropped; the
    choice is part of the feature fingerprint, so cached features of one never serve the other."""
    from PIL import Image

    from backend.backbones.base import pad_to_square
    from tests.helpers.photos import photo

    wide = Image.open(photo("dog")).convert("RGB")  # 768 × 576
    padded = pad_to_square(wide, 224, settings.backbone.packaged.mean)
    assert padded.size == (224, 224)
    assert padded.getpixel((112, 2)) == (128, 128, 128)  # padding band above the photo
    assert padded.getpixel((0, 112)) != (128, 128, 128)  # the left border of the photo is kept
    pad = create_backbone(settings, kind="packaged")
    data = settings.model_dump()
    data["backbone"]["image_fit"] = "crop"
    crop = create_backbone(Settings(**data), kind="packaged")
    assert pad.feature_config["image_fit"] == "pad" and crop.feature_config["image_fit"] == "crop"
    assert pad.fingerprint != crop.fingerprint
    a, b = pad.preprocess(wide), crop.preprocess(wide)
    assert a.shape == b.shape == (3, 224, 224) and not torch.allclose(a, b)


def _image(sample_images, name="chelsea"):
    from backend.settings import get_settings

    return decode(ImageLoader(get_settings().images).fetch(str(sample_images[name])), 10**8)


@pytest.mark.parametrize("model, patches", [("semlabel-tiny-vit", 16), ("semlabel-tiny-rn", 4)])
def test_open_clip_checkpoint_round_trip_is_exact(tmp_path, sample_images, model, patches):
    images = [_image(sample_images, "chelsea"), _image(sample_images, "coffee")]
    random_init = OpenClipBackbone(model, None, "cpu", model_configs=[TINY_CONFIGS], **CLIP)
    encoded = random_init.encode_images(images)
    g0, l0 = encoded.global_, encoded.local
    assert g0.shape == (2, 32) and l0.shape == (2, patches, 32)
    # A CLIP tower's own space is the text-aligned one: the interface says so, no copy is made.
    assert random_init.native_is_aligned and random_init.native_dim == random_init.dim == 32
    assert encoded.native_global is encoded.global_ and encoded.native_local is encoded.local
    assert torch.allclose(l0.norm(dim=-1), torch.ones(2, patches), atol=1e-5)

    checkpoint = tmp_path / f"{model}.pt"
    torch.save(random_init.model.state_dict(), checkpoint)
    reloaded = OpenClipBackbone(model, str(checkpoint), "cpu", model_configs=[TINY_CONFIGS], **CLIP)
    again = reloaded.encode_images(images)
    g1, l1 = again.global_, again.local
    assert torch.equal(g0, g1) and torch.equal(l0, l1)
    texts = ["a cat", "a cup of coffee"]
    assert torch.equal(random_init.encode_texts(texts), reloaded.encode_texts(texts))
    assert reloaded.name.startswith(f"open_clip:{model}/{checkpoint.name}#")
    # The same file gives the same feature namespace; a different file another one.
    other = tmp_path / "other.pt"
    torch.save({k: v + 1e-3 if v.is_floating_point() else v for k, v in random_init.model.state_dict().items()}, other)
    assert OpenClipBackbone(model, str(checkpoint), "cpu", model_configs=[TINY_CONFIGS], **CLIP).fingerprint == reloaded.fingerprint
    assert OpenClipBackbone(model, str(other), "cpu", model_configs=[TINY_CONFIGS], **CLIP).fingerprint != reloaded.fingerprint


def _settings(**backbone_overrides) -> Settings:
    from backend.settings import get_settings

    data = get_settings().model_dump()
    data["backbone"]["open_clip"].update(backbone_overrides)
    return Settings(**data)


def test_auto_uses_open_clip_when_the_checkpoint_loads(tmp_path):
    model = OpenClipBackbone("semlabel-tiny-vit", None, "cpu", model_configs=[TINY_CONFIGS], **CLIP)
    checkpoint = tmp_path / "tiny.pt"
    torch.save(model.model.state_dict(), checkpoint)
    settings = _settings(model="semlabel-tiny-vit", pretrained=str(checkpoint), model_configs=[TINY_CONFIGS])
    backbone = create_backbone(settings, kind="auto")
    assert isinstance(backbone, OpenClipBackbone)
    assert "open_clip weights loaded" in backbone.selection_reason


def test_auto_falls_back_to_packaged_offline_without_waiting(monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = _settings(model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    backbone = create_backbone(settings, kind="auto")
    assert backbone.name.startswith("packaged:")
    assert "not in the local hub cache (offline)" in backbone.selection_reason
    assert any("USING THE PACKAGED BACKBONE" in r.getMessage() for r in caplog.records)


def test_explicit_open_clip_with_missing_weights_is_an_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneUnavailable, match="offline"):
        create_backbone(_settings(model="ViT-B-32", pretrained="laion2b_s34b_b79k"), kind="open_clip")
    with pytest.raises(BackboneUnavailable, match="neither a file nor a known tag"):
        create_backbone(_settings(model="ViT-B-32", pretrained="/nonexistent/weights.pt"), kind="open_clip")


def test_network_probe():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        assert _host_reachable("127.0.0.1", listener.getsockname()[1], 1.0)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert not _host_reachable("127.0.0.1", port, 1.0)
