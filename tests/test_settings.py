"""Settings: configs/default.yaml, a user YAML file, environment overrides."""

from __future__ import annotations

from backend.settings import Settings, config_dir


def test_defaults_come_from_the_config_file():
    s = Settings()
    assert config_dir().joinpath("default.yaml").is_file()
    assert s.backbone.kind == "auto"
    assert s.zero_shot.local_top_k >= 1
    assert s.prompts.templates and all("{}" in t for t in s.prompts.templates)


def test_user_file_and_environment_override_in_order(tmp_path, monkeypatch):
    user = tmp_path / "mine.yaml"
    user.write_text("backbone:\n  kind: packaged\n  batch_size: 4\nzero_shot:\n  local_top_k: 7\n")
    monkeypatch.setenv("SEMLABEL_CONFIG", str(user))
    monkeypatch.setenv("SEMLABEL_ZERO_SHOT__LOCAL_TOP_K", "9")
    monkeypatch.setenv("REDIS_URL", "redis://example.invalid:6379/3")
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://ls.invalid:8080")
    s = Settings()
    assert s.backbone.kind == "packaged" and s.backbone.batch_size == 4
    assert s.backbone.packaged.image_size == 224  # untouched keys keep their defaults
    assert s.zero_shot.local_top_k == 9  # environment beats the file
    assert s.redis_url == "redis://example.invalid:6379/3"
    assert s.label_studio_url == "http://ls.invalid:8080"


def test_data_dir_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMLABEL_DATA_DIR", str(tmp_path))
    s = Settings()
    assert s.features_path == tmp_path / "features"
    assert s.models_path == tmp_path / "models"
