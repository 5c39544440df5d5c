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
ZERO_SHOT_LABELS = ["cat", "truck", "coffee cup", "rocket", "person"]


@pytest.mark.parametrize("image, expected", [("chelsea", "cat"), ("coffee", "coffee cup"), ("rocket", "rocket")])
def test_packaged_zero_shot_ranks_the_right_label_first(runtime, sample_images, image, expected):
    space = runtime.label_space(ZERO_SHOT_LABELS)
    (features,) = runtime.features_for([str(sample_images[image])])
    probs = runtime.zero_shot([features], space)[0]
    ranked = [space.names[i] for i in probs.argsort(descending=True)]
    assert ranked[0] == expected, dict(zip(space.names, probs.tolist()))
    # Calibrated enough to pre-annotate: the right label above 0.5, the clearly absent ones below.
    assert probs[space.index[expected]] > 0.5
    assert probs[space.index["truck"]] < 0.5


def test_packaged_features_are_normalised(runtime, sample_images):
    (features,) = runtime.features_for([str(sample_images["astronaut"])])
    assert features.global_.shape == (runtime.backbone.dim,) == (384,)
    assert features.local.shape == (49, 384)
    assert torch.allclose(features.global_.norm(), torch.tensor(1.0), atol=1e-2)  # fp16 on disk
    assert torch.allclose(features.local.norm(dim=-1), torch.ones(49), atol=1e-2)
    text = runtime.backbone.encode_texts(["a cat", "a dog"])
    assert text.shape == (2, 384) and torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)


def _image(sample_images, name="chelsea"):
    from backend.settings import get_settings

    return decode(ImageLoader(get_settings().images).fetch(str(sample_images[name])), 10**8)


@pytest.mark.parametrize("model, patches", [("semlabel-tiny-vit", 16), ("semlabel-tiny-rn", 4)])
def test_open_clip_checkpoint_round_trip_is_exact(tmp_path, sample_images, model, patches):
    images = [_image(sample_images, "chelsea"), _image(sample_images, "coffee")]
    random_init = OpenClipBackbone(model, None, "cpu", model_configs=[TINY_CONFIGS])
    g0, l0 = random_init.encode_images(images)
    assert g0.shape == (2, 32) and l0.shape == (2, patches, 32)
    assert torch.allclose(l0.norm(dim=-1), torch.ones(2, patches), atol=1e-5)

    checkpoint = tmp_path / f"{model}.pt"
    torch.save(random_init.model.state_dict(), checkpoint)
    reloaded = OpenClipBackbone(model, str(checkpoint), "cpu", model_configs=[TINY_CONFIGS])
    g1, l1 = reloaded.encode_images(images)
    assert torch.equal(g0, g1) and torch.equal(l0, l1)
    texts = ["a cat", "a cup of coffee"]
    assert torch.equal(random_init.encode_texts(texts), reloaded.encode_texts(texts))
    assert reloaded.name.startswith(f"open_clip:{model}/{checkpoint.name}#")
    # The same file gives the same feature namespace; a different file another one.
    other = tmp_path / "other.pt"
    torch.save({k: v + 1e-3 if v.is_floating_point() else v for k, v in random_init.model.state_dict().items()}, other)
    assert OpenClipBackbone(model, str(checkpoint), "cpu", model_configs=[TINY_CONFIGS]).fingerprint == reloaded.fingerprint
    assert OpenClipBackbone(model, str(other), "cpu", model_configs=[TINY_CONFIGS]).fingerprint != reloaded.fingerprint


def _settings(**backbone_overrides) -> Settings:
    from backend.settings import get_settings

    data = get_settings().model_dump()
    data["backbone"]["open_clip"].update(backbone_overrides)
    return Settings(**data)


def test_auto_uses_open_clip_when_the_checkpoint_loads(tmp_path):
    model = OpenClipBackbone("semlabel-tiny-vit", None, "cpu", model_configs=[TINY_CONFIGS])
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
