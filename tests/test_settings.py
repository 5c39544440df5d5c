"""Settings: configs/default.yaml, a user YAML file, environment overrides."""

from __future__ import annotations

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from backend.settings import Settings, UnknownSetting, config_dir, unknown_keys


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


def test_a_misspelt_key_in_a_yaml_file_names_the_key_and_the_file(tmp_path, monkeypatch):
    user = tmp_path / "mine.yaml"
    user.write_text("backbone:\n  kind: packaged\n  batch_sise: 4\nworker:\n  debounce:\n    quiet: 5\n")
    monkeypatch.setenv("SEMLABEL_CONFIG", str(user))
    with pytest.raises(UnknownSetting) as err:
        Settings()
    message = str(err.value)
    assert str(user) in message
    assert "backbone.batch_sise" in message and "worker.debounce.quiet" in message
    user.write_text("bakbone:\n  kind: packaged\n")  # a misspelt section too
    with pytest.raises(UnknownSetting, match=r"mine\.yaml: unknown setting\(s\) bakbone"):
        Settings()


def test_a_misspelt_environment_override_names_the_key_and_the_variable(monkeypatch):
    monkeypatch.setenv("SEMLABEL_WORKER__DEBOUNCE__QUIET", "5")
    with pytest.raises(UnknownSetting) as err:
        Settings()
    assert "SEMLABEL_WORKER__DEBOUNCE__QUIET" in str(err.value) and "worker.debounce.quiet" in str(err.value)
    monkeypatch.delenv("SEMLABEL_WORKER__DEBOUNCE__QUIET")
    monkeypatch.setenv("SEMLABEL_WORKER__DEBOUNCE__QUIET_S", "5")  # the right name still works
    assert Settings().worker.debounce.quiet_s == 5.0


def test_unknown_keyword_and_wrong_type_are_refused():
    with pytest.raises(ValidationError, match="extra"):
        Settings(backbone={"kindd": "packaged"})
    with pytest.raises(ValidationError, match="batch_size"):
        Settings(backbone={"batch_size": "many"})


def _sections(model: type[BaseModel]):
    yield model
    for field in model.model_fields.values():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _sections(field.annotation)


def test_default_yaml_is_the_only_home_of_a_default():
    """No section declares a default of its own (the connection fields, set only from the
    environment, excepted) and default.yaml sets every key the sections declare."""
    connection = {"redis_url", "label_studio_url", "label_studio_api_key", "basic_auth_user", "basic_auth_pass"}
    for section in _sections(Settings):
        with_default = {n for n, f in section.model_fields.items() if not f.is_required()}
        if section is Settings:
            with_default -= connection
        assert not with_default, f"{section.__name__} declares defaults for {sorted(with_default)}"
        assert section.model_config.get("extra") == "forbid", section.__name__
    data = yaml.safe_load((config_dir() / "default.yaml").read_text())
    assert unknown_keys(Settings, data) == []
    Settings.model_validate(data)  # complete: nothing is missing
