"""Typed sections of ``configs/default.yaml`` for the services: backbone, prompts, features,
images, auth, limits, redis, worker, store and the Label Studio-facing backend (the model's
sections are in :mod:`backend.model.config`; :mod:`backend.settings` reads the files).

Every field is required: its one default is its line in ``configs/default.yaml``, where each
is documented. A key a section does not declare is an error (``extra="forbid"``).
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """Base of every settings section: no field has a default (each value comes from
    ``configs/default.yaml``) and a key the section does not declare is an error."""

    model_config = ConfigDict(extra="forbid")

    def with_changes(self, **changes: Any) -> Self:
        """A validated copy with ``changes`` (a tool's or a test's variant of the defaults)."""
        return type(self).model_validate({**self.model_dump(), **changes})


class OpenClipSettings(Section):
    model: str
    pretrained: str | None
    model_configs: list[str]
    zero_shot_scale: float
    zero_shot_bias: float


class PackagedSettings(Section):
    resize: int
    image_size: int
    mean: list[float]
    std: list[float]
    class_temperature: float
    class_synonyms: int
    zero_shot_scale: float
    zero_shot_bias: float


class BackboneSettings(Section):
    kind: Literal["auto", "open_clip", "packaged"]
    device: str
    batch_size: int = Field(ge=1)
    text_batch_size: int = Field(ge=1)
    network_probe_timeout_s: float
    image_fit: Literal["pad", "crop"]
    open_clip: OpenClipSettings
    packaged: PackagedSettings


class PromptSettings(Section):
    templates: list[str]
    name_weight: float


class ZeroShotSettings(Section):
    global_weight: float = Field(ge=0.0, le=1.0)
    local_top_k: int = Field(ge=1)


class FeatureSettings(Section):
    dtype: Literal["float16", "float32"]
    max_size_gb: float
    gc_every_writes: int = Field(ge=1)
    stale_tmp_s: float = Field(gt=0.0)


class ImageSettings(Section):
    max_pixels: int
    max_bytes: int
    http_timeout_s: float
    download_deadline_s: float = Field(gt=0.0)
    max_redirects: int = Field(ge=0)
    decode_max_side: int = Field(ge=64)
    allowed_hosts: list[str]
    local_roots: list[str]
    fetch_threads: int = Field(ge=1)


class AuthSettings(Section):
    """Who may talk to the backend and which Label Studio it talks to (backend/ls/guard.py)."""

    url_secret: str
    allowed_label_studio_urls: list[str]
    refused_log_interval_s: float = Field(gt=0.0)


class LimitSettings(Section):
    """Bounds on what one request may make the backend do (backend/ls/guard.py)."""

    max_request_mb: float = Field(gt=0.0)
    max_json_depth: int = Field(ge=2)
    max_tasks: int = Field(ge=1)
    max_labels: int = Field(ge=1)
    max_label_chars: int = Field(ge=1)
    max_label_config_chars: int = Field(ge=100)
    text_cache_max_rows: int = Field(ge=1000)
    text_cache_wait_s: float = Field(gt=0.0)


class EmbeddedRedisSettings(Section):
    port: int = Field(ge=0, le=65535)
    appendfsync: Literal["always", "everysec", "no"]
    start_timeout_s: float


class SpoolSettings(Section):
    dir: str
    max_entries: int = Field(ge=1)
    max_mb: float = Field(gt=0.0)
    retry_s: float = Field(gt=0.0)
    batch: int = Field(ge=1)
    max_replay_attempts: int = Field(ge=1)
    note_interval_s: float = Field(gt=0.0)
    sqlite_timeout_s: float = Field(gt=0.0)
    writer_threads: int = Field(ge=1)


class RedisSettings(Section):
    connect_timeout_s: float
    socket_timeout_s: float = Field(gt=0.0)
    webhook_timeout_s: float = Field(gt=0.0)
    webhook_deadline_s: float = Field(gt=0.0)
    key_prefix: str
    embedded: EmbeddedRedisSettings
    spool: SpoolSettings
    dedup_window: int = Field(ge=1)
    dedup_ttl_s: float = Field(gt=0.0)
    max_event_kb: int = Field(ge=1)
    max_result_items: int = Field(ge=1)
    max_label_config_kb: int = Field(ge=1)
    max_remembered_tasks: int = Field(ge=1)
    max_task_data_kb: int = Field(ge=1)
    compact_after_training: bool
    health_check_interval_s: int = Field(ge=1)
    recheck_s: float = Field(gt=0.0)
    read_batch: int = Field(ge=1)
    warn_interval_s: float = Field(gt=0.0)
    stop_timeout_s: float = Field(gt=0.0)


class QueueNames(Section):
    train: str
    features: str


class DebounceSettings(Section):
    annotations: int = Field(ge=1)
    quiet_s: float = Field(ge=0.0)
    max_wait_s: float = Field(ge=0.0)


class WorkerSettings(Section):
    queues: QueueNames
    prefetch_features: bool
    debounce: DebounceSettings
    busy_retry_s: float = Field(gt=0.0)
    lock_ttl_s: float = Field(gt=0.0)
    job_timeout_s: int = Field(ge=1)
    retry_intervals_s: list[int]
    result_ttl_s: int
    failure_ttl_s: int
    job_monitoring_interval_s: int = Field(ge=1)
    holdout_fraction: float = Field(ge=0.0, lt=1.0)
    holdout_seed: int
    min_holdout_tasks: int = Field(ge=1)
    trainer: str
    preload: bool
    maintenance_interval_s: int = Field(ge=1)
    heartbeat_grace_s: int = Field(ge=0)
    worker_ttl_margin_s: int = Field(ge=0)
    features_result_ttl_s: int = Field(ge=0)
    jobs_kept: int = Field(ge=1)
    jobs_shown: int = Field(ge=1)
    failures_kept: int = Field(ge=1)


class StoreSettings(Section):
    root: str
    gate_metric: str
    gate_margin: float = Field(ge=0.0)
    keep_versions: int = Field(ge=2)
    stale_staging_s: float
    poll_interval_s: float = Field(gt=0.0)
    max_watched_projects: int = Field(ge=1)
    watch_idle_s: float = Field(gt=0.0)
    previous_kept: int = Field(ge=1)
    max_backoff_s: float = Field(gt=0.0)


class PreannotationSettings(Section):
    threshold: float = Field(ge=0.0, le=1.0)
    max_labels: int = Field(ge=1)
    wrong_tick_cost: float = Field(ge=0.0)
    missed_tick_cost: float = Field(ge=0.0)
    reasons_labels: int = Field(ge=1)


class ReviewSettings(Section):
    enabled: bool
    model_version: str
    live_version: bool
    tab: str
    top_k: int = Field(ge=1)
    min_probability: float = Field(ge=0.0, le=1.0)
    max_attempts: int = Field(ge=1)
    retry_after_s: float = Field(gt=0.0)
    claim_interval_s: float = Field(gt=0.0)
    read_batch: int = Field(ge=1)
    claim_batch: int = Field(ge=1)
    max_backoff_s: float = Field(gt=0.0)
    live_version_ttl_s: float = Field(gt=0.0)


class ServerSettings(Section):
    """``semlabel serve`` / ``python -m backend.ls`` (gunicorn)."""

    port: int = Field(ge=1, le=65535)
    threads: int = Field(ge=1)
    timeout_s: int = Field(ge=1)
    graceful_timeout_s: int = Field(ge=0)


class LabelStudioApiSettings(Section):
    """Calls the backend makes to Label Studio's API (webhook registration, tabs)."""

    timeout_s: float = Field(gt=0.0)
    retry_delays_s: list[float]
    failure_backoff_s: float = Field(gt=0.0)


class BackendSettings(Section):
    """The Label Studio-facing server (backend/ls/)."""

    preannotation: PreannotationSettings
    review: ReviewSettings
    reasons_textarea: str
    taxonomy: str
    setup_wait_s: float = Field(gt=0.0)
    predict_wait_s: float = Field(gt=0.0)
    server: ServerSettings
    label_studio_api: LabelStudioApiSettings
    max_models: int = Field(ge=1)
    max_label_configs: int = Field(ge=1)
    max_label_spaces: int = Field(ge=1)
    max_upload_keys: int = Field(ge=1)
    max_answers: int = Field(ge=1)
    answer_ttl_s: float = Field(gt=0.0)
    max_background_loads: int = Field(ge=1)
    stale_download_s: float = Field(gt=0.0)
