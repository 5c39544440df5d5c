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
    download_deadline_s: float = Field(30.0, gt=0.0)
    max_redirects: int = Field(5, ge=0)
    decode_max_side: int = Field(2048, ge=64)
    allowed_hosts: list[str] = []
    local_roots: list[str] = []


class AuthSettings(_Section):
    """Who may talk to the backend and which Label Studio it talks to (backend/ls/guard.py)."""

    url_secret: str = ""
    allowed_label_studio_urls: list[str] = []
    refused_log_interval_s: float = Field(60.0, gt=0.0)


class LimitSettings(_Section):
    """Bounds on what one request may make the backend do (backend/ls/guard.py)."""

    max_request_mb: float = Field(32.0, gt=0.0)
    max_json_depth: int = Field(64, ge=2)
    max_tasks: int = Field(10000, ge=1)
    max_labels: int = Field(10000, ge=1)
    max_label_chars: int = Field(200, ge=1)
    max_label_config_chars: int = Field(2000000, ge=100)
    text_cache_max_rows: int = Field(60000, ge=1000)


class EmbeddedRedisSettings(_Section):
    port: int = Field(6379, ge=0, le=65535)
    appendfsync: Literal["always", "everysec", "no"] = "everysec"
    start_timeout_s: float = 15.0


class SpoolSettings(_Section):
    dir: str = ""
    max_entries: int = Field(100000, ge=1)
    max_mb: float = Field(256.0, gt=0.0)
    retry_s: float = Field(0.5, gt=0.0)
    batch: int = Field(100, ge=1)
    max_replay_attempts: int = Field(100, ge=1)


class RedisSettings(_Section):
    connect_timeout_s: float = 2.0
    socket_timeout_s: float = Field(5.0, gt=0.0)
    webhook_timeout_s: float = Field(0.25, gt=0.0)
    webhook_deadline_s: float = Field(0.5, gt=0.0)
    key_prefix: str = "semlabel"
    embedded: EmbeddedRedisSettings = EmbeddedRedisSettings()
    spool: SpoolSettings = SpoolSettings()
    dedup_window: int = Field(50000, ge=1)
    dedup_ttl_s: float = Field(604800.0, gt=0.0)
    max_event_kb: int = Field(256, ge=1)
    max_result_items: int = Field(1000, ge=1)
    max_label_config_kb: int = Field(1024, ge=1)
    max_remembered_tasks: int = Field(100000, ge=1)
    max_task_data_kb: int = Field(16, ge=1)
    compact_after_training: bool = True


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
    max_watched_projects: int = Field(1000, ge=1)
    watch_idle_s: float = Field(3600.0, gt=0.0)


class PreannotationSettings(_Section):
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    max_labels: int = Field(10, ge=1)
    wrong_tick_cost: float = Field(1.0, ge=0.0)
    missed_tick_cost: float = Field(1.0, ge=0.0)
    reasons_labels: int = Field(10, ge=1)


class ReviewSettings(_Section):
    enabled: bool = True
    model_version: str = "semlabel-review"
    live_version: bool = True
    tab: str = "Likely missing"
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
    auth: AuthSettings = AuthSettings()
    limits: LimitSettings = LimitSettings()
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
    def spool_path(self) -> Path:
        """Where webhook events wait on disk while Redis is away (``backend.queue.spool``):
        ``redis.spool.dir``, else ``<data_dir>/spool``. One spool belongs to one Redis: its
        entries are replayed into whichever Redis the process that finds them talks to."""
        spool_dir = self.redis.spool.dir
        return Path(spool_dir).expanduser() if spool_dir else self.data_path / "spool"

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
