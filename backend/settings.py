"""One settings object for backend, worker and CLI.

The numbers live in ``configs/default.yaml``; this module only gives them types. Sources,
last one wins:

1. ``configs/default.yaml`` (found beside the source tree, or installed under
   ``<prefix>/share/semlabel/configs``),
2. the YAML file named by ``SEMLABEL_CONFIG`` (only the keys it sets),
3. environment variables ``SEMLABEL_<SECTION>__<KEY>`` (``SEMLABEL_BACKBONE__KIND=packaged``),
   and the conventional names ``REDIS_URL``, ``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``,
   ``BASIC_AUTH_USER``, ``BASIC_AUTH_PASS``.

Sections other modules own (model, training, worker, ...) are kept as plain dictionaries
here until their module declares a typed model for them; unknown keys are never dropped.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .model.config import (BenchSettings, CalibrationSettings, LossSettings, ModelSettings, SuggestSettings,
                           TrainSettings)

CONFIG_ENV = "SEMLABEL_CONFIG"
CONFIG_DIR_ENV = "SEMLABEL_CONFIG_DIR"


def config_dir() -> Path:
    """Directory holding ``default.yaml`` and the other shipped configs."""
    candidates = []
    if os.environ.get(CONFIG_DIR_ENV):
        candidates.append(Path(os.environ[CONFIG_DIR_ENV]))
    candidates.append(Path(__file__).resolve().parent.parent / "configs")
    candidates.append(Path(sys.prefix) / "share" / "semlabel" / "configs")
    for candidate in candidates:
        if (candidate / "default.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        "configs/default.yaml not found; looked in " + ", ".join(str(c) for c in candidates)
    )


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow")


class OpenClipSettings(_Section):
    model: str = "ViT-B-32"
    pretrained: str | None = None
    model_configs: list[str] = []
    zero_shot_scale: float
    zero_shot_bias: float


class PackagedSettings(_Section):
    resize: int
    image_size: int
    mean: list[float]
    std: list[float]
    class_temperature: float
    class_synonyms: int
    zero_shot_scale: float
    zero_shot_bias: float


class BackboneSettings(_Section):
    kind: Literal["auto", "open_clip", "packaged"] = "auto"
    device: str = "auto"
    batch_size: int = Field(16, ge=1)
    network_probe_timeout_s: float = 2.0
    image_fit: Literal["pad", "crop"] = "pad"
    open_clip: OpenClipSettings
    packaged: PackagedSettings


class PromptSettings(_Section):
    templates: list[str]
    name_weight: float = 1.0


class ZeroShotSettings(_Section):
    global_weight: float = Field(ge=0.0, le=1.0)
    local_top_k: int = Field(ge=1)


class FeatureSettings(_Section):
    dtype: Literal["float16", "float32"] = "float16"
    max_size_gb: float = 10.0
    gc_every_writes: int = 2000


class ImageSettings(_Section):
    max_pixels: int
    max_bytes: int
    http_timeout_s: float
    allowed_hosts: list[str] = []
    local_roots: list[str] = []


class EmbeddedRedisSettings(_Section):
    port: int = Field(6379, ge=0, le=65535)
    appendfsync: Literal["always", "everysec", "no"] = "everysec"
    start_timeout_s: float = 15.0


class RedisSettings(_Section):
    connect_timeout_s: float = 2.0
    key_prefix: str = "semlabel"
    embedded: EmbeddedRedisSettings = EmbeddedRedisSettings()


class QueueNames(_Section):
    train: str = "gpu"
    features: str = "cpu"


class DebounceSettings(_Section):
    annotations: int = Field(10, ge=1)
    quiet_s: float = Field(30.0, ge=0.0)
    max_wait_s: float = Field(600.0, ge=0.0)


class WorkerSettings(_Section):
    queues: QueueNames = QueueNames()
    prefetch_features: bool = True
    debounce: DebounceSettings = DebounceSettings()
    busy_retry_s: float = Field(10.0, gt=0.0)
    lock_ttl_s: float = Field(60.0, gt=0.0)
    job_timeout_s: int = Field(7200, ge=1)
    retry_intervals_s: list[int] = [15, 60, 300]
    result_ttl_s: int = 604800
    failure_ttl_s: int = 2592000
    job_monitoring_interval_s: int = Field(10, ge=1)
    holdout_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    holdout_seed: int = 0
    min_holdout_tasks: int = Field(5, ge=1)
    trainer: str = ""
    preload: bool = True
    maintenance_interval_s: int = Field(60, ge=1)


class StoreSettings(_Section):
    root: str = ""
    gate_metric: str = "mAP"
    gate_margin: float = Field(0.02, ge=0.0)
    keep_versions: int = Field(10, ge=2)
    stale_staging_s: float = 86400.0
    poll_interval_s: float = Field(2.0, gt=0.0)


class PreannotationSettings(_Section):
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    max_labels: int = Field(10, ge=1)
    wrong_tick_cost: float = Field(1.0, ge=0.0)
    missed_tick_cost: float = Field(1.0, ge=0.0)
    reasons_labels: int = Field(10, ge=1)


class ReviewSettings(_Section):
    enabled: bool = True
    model_version: str = "semlabel-review"
    top_k: int = Field(3, ge=1)
    min_probability: float = Field(0.5, ge=0.0, le=1.0)
    max_attempts: int = Field(5, ge=1)
    retry_after_s: float = Field(30.0, gt=0.0)


class BackendSettings(_Section):
    """The Label Studio-facing server (backend/ls/)."""

    preannotation: PreannotationSettings = PreannotationSettings()
    review: ReviewSettings = ReviewSettings()
    reasons_textarea: str = "semlabel_reasons"
    taxonomy: str = ""
    setup_wait_s: float = Field(2.5, gt=0.0)
    predict_wait_s: float = Field(60.0, gt=0.0)
    max_request_mb: float = Field(64.0, gt=0.0)


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


class _YamlSource(PydanticBaseSettingsSource):
    """default.yaml, then the file named by SEMLABEL_CONFIG, merged key by key."""

    def get_field_value(self, field, field_name):  # pragma: no cover - unused by __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        data = _read_yaml(config_dir() / "default.yaml")
        user = os.environ.get(CONFIG_ENV)
        if user:
            data = _deep_merge(data, _read_yaml(Path(user)))
        return data


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SEMLABEL_",
        env_nested_delimiter="__",
        extra="allow",
        populate_by_name=True,
    )

    data_dir: str = ""
    redis_url: str | None = Field(
        None, validation_alias=AliasChoices("REDIS_URL", "SEMLABEL_REDIS_URL", "redis_url")
    )
    label_studio_url: str | None = Field(
        None,
        validation_alias=AliasChoices(
            "LABEL_STUDIO_URL", "LABEL_STUDIO_HOST", "SEMLABEL_LABEL_STUDIO_URL", "label_studio_url"
        ),
    )
    label_studio_api_key: str | None = Field(
        None,
        validation_alias=AliasChoices(
            "LABEL_STUDIO_API_KEY",
            "LABEL_STUDIO_ACCESS_TOKEN",
            "SEMLABEL_LABEL_STUDIO_API_KEY",
            "label_studio_api_key",
        ),
    )
    basic_auth_user: str | None = Field(
        None, validation_alias=AliasChoices("BASIC_AUTH_USER", "basic_auth_user")
    )
    basic_auth_pass: str | None = Field(
        None, validation_alias=AliasChoices("BASIC_AUTH_PASS", "basic_auth_pass")
    )

    backbone: BackboneSettings
    prompts: PromptSettings
    zero_shot: ZeroShotSettings
    features: FeatureSettings
    images: ImageSettings
    redis: RedisSettings = RedisSettings()
    worker: WorkerSettings = WorkerSettings()
    store: StoreSettings = StoreSettings()
    # The SigRL heads, their losses, training, suggestions, benchmark (backend/model/config.py).
    model: ModelSettings = ModelSettings()
    loss: LossSettings = LossSettings()
    train: TrainSettings = TrainSettings()
    calibration: CalibrationSettings = CalibrationSettings()
    suggest: SuggestSettings = SuggestSettings()
    backend: BackendSettings = BackendSettings()
    bench: BenchSettings = BenchSettings()

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return (init_settings, env_settings, _YamlSource(settings_cls))

    # -- derived locations -------------------------------------------------------------
    @property
    def data_path(self) -> Path:
        if self.data_dir:
            return Path(self.data_dir).expanduser()
        import platformdirs

        return Path(platformdirs.user_data_dir("semlabel"))

    @property
    def features_path(self) -> Path:
        return self.data_path / "features"

    @property
    def text_cache_path(self) -> Path:
        return self.data_path / "text-embeddings.sqlite"

    @property
    def models_path(self) -> Path:
        """The model store (``store.root``, else ``<data_dir>/models``)."""
        return Path(self.store.root).expanduser() if self.store.root else self.data_path / "models"

    @property
    def redis_data_path(self) -> Path:
        """Where the embedded Redis keeps its append-only file."""
        return self.data_path / "redis"

    def section(self, name: str) -> dict[str, Any]:
        """A section that has no typed model here, as a plain dict (``{}`` when absent)."""
        value = getattr(self, name, None)
        if value is None:
            value = (self.model_extra or {}).get(name, {})
        if isinstance(value, BaseModel):
            return value.model_dump()
        return dict(value)


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once; call ``reload_settings`` after changing env)."""
    return Settings()


def reload_settings() -> Settings:
    get_settings.cache_clear()
    return get_settings()
