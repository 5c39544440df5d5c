"""One settings object for backend, worker and CLI.

The numbers live in ``configs/default.yaml``; this module only gives them types. Sources,
last one wins:

1. ``configs/default.yaml`` (found beside the source tree, or installed under
   ``<prefix>/share/semlabel/configs``),
2. the YAML file named by ``SEMLABEL_CONFIG`` (only the keys it sets),
3. environment variables ``SEMLABEL_<SECTION>__<KEY>`` (``SEMLABEL_BACKBONE__KIND=packaged``),
   and the conventional names ``REDIS_URL``, ``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``,
   ``BASIC_AUTH_USER``, ``BASIC_AUTH_PASS``.

Every value has exactly one default: its line in ``configs/default.yaml``. The classes here
and in :mod:`backend.model.config` declare types and bounds only (no field has a default),
and a key no class declares — misspelt in a YAML file or in a ``SEMLABEL_*__*`` variable —
is an error that names the key and where it was written (:class:`UnknownSetting`).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .model.config import (BenchSettings, CalibrationSettings, LossSettings, ModelSettings, ScoringSettings,
                           SuggestSettings, TrainSettings)
from .sections import (AuthSettings, BackboneSettings, BackendSettings, FeatureSettings, ImageSettings, LimitSettings,
                       PromptSettings, RedisSettings, StoreSettings, WorkerSettings, ZeroShotSettings)

CONFIG_ENV = "SEMLABEL_CONFIG"
CONFIG_DIR_ENV = "SEMLABEL_CONFIG_DIR"
ENV_PREFIX = "SEMLABEL_"


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


class UnknownSetting(ValueError):
    """A settings file or environment variable names a key no section declares."""


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _section_of(model: type[BaseModel], key: str) -> type[BaseModel] | None | bool:
    """The section class of ``model``'s field ``key`` (False: no such field; None: a leaf)."""
    field = model.model_fields.get(key)
    if field is None:
        return False
    kind = field.annotation
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def unknown_keys(model: type[BaseModel], data: dict, path: tuple[str, ...] = ()) -> list[str]:
    """Dotted paths of the keys of ``data`` (nested) that ``model`` does not declare."""
    out = []
    for key, value in data.items():
        sub = _section_of(model, str(key))
        if sub is False:
            out.append(".".join((*path, str(key))))
        elif sub is not None and isinstance(value, dict):
            out.extend(unknown_keys(sub, value, (*path, str(key))))
    return out


def _read_yaml(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    unknown = unknown_keys(Settings, data)
    if unknown:
        raise UnknownSetting(f"{path}: unknown setting(s) {', '.join(unknown)} (see configs/default.yaml)")
    return data


def _check_environment() -> None:
    """``SEMLABEL_<SECTION>__<KEY>`` variables must name a declared key (a misspelt override
    would otherwise be ignored). Plain ``SEMLABEL_*`` names without ``__`` may be other
    switches (tests, tools) and are left alone."""
    for name in os.environ:
        if not name.upper().startswith(ENV_PREFIX) or "__" not in name:
            continue
        parts = name[len(ENV_PREFIX):].lower().split("__")
        nested: dict = {}
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = None
        unknown = unknown_keys(Settings, nested)
        if unknown:
            raise UnknownSetting(f"environment variable {name}: unknown setting {unknown[0]} "
                                 "(see configs/default.yaml)")


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
    """Every section of ``configs/default.yaml``, typed; every field is required (its value
    comes from the file) and unknown keys are refused. The connection fields below are the
    exception: they name this deployment's services and secrets, come from the environment
    only, and ``None`` means "not configured"."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        populate_by_name=True,
    )

    data_dir: str
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
    auth: AuthSettings
    limits: LimitSettings
    redis: RedisSettings
    worker: WorkerSettings
    store: StoreSettings
    # The SigRL heads, their losses, training, suggestions, benchmark (backend/model/config.py).
    model: ModelSettings
    loss: LossSettings
    train: TrainSettings
    calibration: CalibrationSettings
    suggest: SuggestSettings
    scoring: ScoringSettings
    backend: BackendSettings
    bench: BenchSettings

    def __init__(self, **values: Any):
        _check_environment()
        super().__init__(**values)

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


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once; call ``reload_settings`` after changing env)."""
    return Settings()


def reload_settings() -> Settings:
    get_settings.cache_clear()
    return get_settings()
