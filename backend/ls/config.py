"""A project's label config, as semlabel serves it (parsed with label-studio-sdk's LabelInterface).

semlabel serves every ``<Choices>`` bound to an ``<Image>`` (a *binding*; a config may have
several). Each ``<Choice>`` becomes a :class:`~backend.labels.Label` whose name is what Label
Studio stores for it — the ``alias`` when there is one, else the ``value`` — and whose extra
prompt texts are the ``value`` (when an alias replaced it) and the ``hint``.

An optional ``<TextArea name="semlabel_reasons" toName="image">`` (name from
``backend.reasons_textarea``) receives human-readable scores and reasons.

Parsing is pure and cached by the config's hash, so calling :func:`parse_label_config` on
every request costs a dictionary lookup.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ..errors import ConfigError
from ..labels import Label
from ..lru import LRU
from .guard import clip

log = logging.getLogger(__name__)

_TRUE = {"true", "1", "yes"}


class TaskDataError(ValueError):
    """A task whose data does not hold the image a binding needs."""


@dataclass(frozen=True)
class Binding:
    """One ``<Choices>`` (``control``) bound to one ``<Image>`` (``object``)."""

    control: str
    object: str
    data_key: str | None  # "$image" -> "image"; None when the Image value is a constant
    constant: str | None
    multiple: bool
    labels: tuple[Label, ...]

    @property
    def names(self) -> list[str]:
        return [label.name for label in self.labels]

    def source(self, task: Mapping[str, Any]) -> str:
        """The image reference of ``task`` for this binding (``TaskDataError`` if absent)."""
        if self.data_key is None:
            return str(self.constant)
        data = task.get("data") if isinstance(task, Mapping) else None
        if not isinstance(data, Mapping):
            raise TaskDataError("the task has no 'data' object")
        value = data.get(self.data_key)
        if value is None and "." in self.data_key:  # "$item.url": nested data
            value = data
            for part in self.data_key.split("."):
                value = value.get(part) if isinstance(value, Mapping) else None
        if not isinstance(value, str) or not value.strip():
            raise TaskDataError(f"the task's data has no image under {self.data_key!r}")
        return value.strip()


@dataclass(frozen=True)
class ProjectConfig:
    """The parts of a label config semlabel uses."""

    digest: str
    bindings: tuple[Binding, ...]
    reasons: Mapping[str, str] = field(default_factory=dict)  # textarea name -> to_name
    notes: tuple[str, ...] = ()

    def binding(self, control: str) -> Binding | None:
        for b in self.bindings:
            if b.control == control:
                return b
        return None

    def chosen(self, result: Iterable[Any] | None) -> tuple[dict[str, list[str]], list[str]]:
        """Labels chosen in a Label Studio ``result`` list, per binding control name, and
        the values that are not labels of the config (``"labels:bird"``), which callers
        ignore with a note."""
        chosen: dict[str, list[str]] = {b.control: [] for b in self.bindings}
        unknown: list[str] = []
        for item in result or []:
            if not isinstance(item, Mapping) or item.get("type", "choices") != "choices":
                continue
            binding = self.binding(str(item.get("from_name", "")))
            if binding is None:
                continue
            to_name = item.get("to_name")
            if to_name is not None and to_name != binding.object:
                other = next((b for b in self.bindings
                              if b.control == binding.control and b.object == to_name), None)
                if other is None:
                    continue
                binding = other
            value = item.get("value") if isinstance(item.get("value"), Mapping) else {}
            names = set(binding.names)
            for choice in value.get("choices") or []:
                if choice in names:
                    if choice not in chosen[binding.control]:
                        chosen[binding.control].append(choice)
                else:
                    unknown.append(f"{binding.control}:{choice}")
        return chosen, unknown


def config_digest(xml: str) -> str:
    return hashlib.sha256(xml.encode("utf-8")).hexdigest()[:16]


def _labels_of(control) -> tuple[Label, ...]:
    out = []
    for name in control.labels:
        attrs = dict(getattr(control.labels_attrs.get(name), "attr", {}) or {})
        texts = []
        value = attrs.get("value")
        if isinstance(value, str) and value.strip() and value.strip() != name:
            texts.append(value.strip())
        hint = attrs.get("hint")
        if isinstance(hint, str) and hint.strip() and hint.strip() not in texts and hint.strip() != name:
            texts.append(hint.strip())
        out.append(Label(name, tuple(texts)))
    return tuple(out)


def _bindings_of(control, image_tag, notes: list[str], seen_other: list[str]) -> list[Binding]:
    """The bindings of one ``<Choices>`` (one per ``<Image>`` it labels); why it is not
    served goes to ``notes``, its non-image targets to ``seen_other``."""
    attr = control.attr or {}
    images = [o for o in control.objects if isinstance(o, image_tag)]
    for o in control.objects:
        if not isinstance(o, image_tag):
            seen_other.append(f"<Choices name={control.name!r}> is bound to <{o.tag} name={o.name!r}>")
    if not images:
        return []
    if str(attr.get("perRegion", "")).lower() in _TRUE:
        notes.append(f"<Choices name={control.name!r}> is per region; not served")
        return []
    if str(attr.get("value", "")).startswith("$"):
        notes.append(f"<Choices name={control.name!r}> takes its choices from task data; not served")
        return []
    labels = _labels_of(control)
    if not labels:
        notes.append(f"<Choices name={control.name!r}> has no <Choice>; not served")
        return []
    names = [l.name for l in labels]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"<Choices name={control.name!r}> has duplicate choices {dupes}")
    out = []
    for image in images:
        value = image.value or ""
        data_key = image.value_name if value.startswith("$") else None
        out.append(Binding(control=control.name, object=image.name, data_key=data_key,
                           constant=None if data_key else value, multiple=bool(control.is_multiple_choice),
                           labels=labels))
    return out


def _parse(xml: str, reasons_name: str) -> ProjectConfig:
    from label_studio_sdk.label_interface import LabelInterface
    from label_studio_sdk.label_interface.control_tags import ChoicesTag, TextAreaTag
    from label_studio_sdk.label_interface.object_tags import ImageTag

    if not isinstance(xml, str) or not xml.strip():
        raise ConfigError("the label config is empty")
    try:
        li = LabelInterface(xml)
    except Exception as exc:  # the SDK raises several XML error types
        raise ConfigError(f"the label config is not valid XML: {str(exc).splitlines()[0][:200]}") from exc

    bindings: list[Binding] = []
    notes: list[str] = []
    seen_other: list[str] = []
    for control in li.controls:
        if isinstance(control, ChoicesTag):
            bindings.extend(_bindings_of(control, ImageTag, notes, seen_other))
    if not bindings:
        found = "; ".join(seen_other + notes) or "no <Choices> at all"
        raise ConfigError(
            "the label config has no <Choices> bound to an <Image> (semlabel labels images with "
            f"<Choices toName=\"<image>\">): {found}"
        )
    reasons: dict[str, str] = {}
    image_names = {b.object for b in bindings}
    for control in li.controls:
        if isinstance(control, TextAreaTag) and control.name == reasons_name:
            targets = [t for t in (control.to_name or []) if t in image_names]
            reasons[control.name] = targets[0] if targets else bindings[0].object
    return ProjectConfig(config_digest(xml), tuple(bindings), reasons, tuple(notes + seen_other))


def check_size(xml: str, limits) -> None:
    """Refuse, before parsing, a label config over ``limits.max_label_config_chars`` or one
    with a DTD or entities (ConfigError, a 400)."""
    if len(xml) > limits.max_label_config_chars:
        raise ConfigError(f"label config of {len(xml)} characters, over "
                          f"limits.max_label_config_chars={limits.max_label_config_chars}")
    if "<!DOCTYPE" in xml[:4096].upper() or "<!ENTITY" in xml.upper():
        raise ConfigError("a label config with a DTD or entities is not accepted")


def check_labels(config: ProjectConfig, limits) -> None:
    """Refuse a parsed config with more than ``limits.max_labels`` choices in one
    ``<Choices>`` or a choice text longer than ``limits.max_label_chars``."""
    for b in config.bindings:
        if len(b.labels) > limits.max_labels:
            raise ConfigError(f"<Choices name={clip(b.control, 40)!r}> has {len(b.labels)} choices, over "
                              f"limits.max_labels={limits.max_labels}")
        for label in b.labels:
            for text in (label.name, *label.texts):
                if len(text) > limits.max_label_chars:
                    raise ConfigError(f"a choice of {len(text)} characters ({clip(text, 40)}), over "
                                      f"limits.max_label_chars={limits.max_label_chars}")


class ConfigCache:
    """Parsed configs by their hash, the ``size`` most recently used (thread-safe; the settings'
    ``backend.max_label_configs``); a config
    that fails (ConfigError) is remembered as failing. With ``limits`` (the settings'
    ``limits`` section) a config over them fails too (:func:`check_size`, :func:`check_labels`)."""

    def __init__(self, reasons_name: str, size: int, limits=None):
        self.reasons_name = reasons_name
        self.limits = limits
        self._items: LRU[str, ProjectConfig | ConfigError] = LRU(size)

    def get(self, xml: str) -> ProjectConfig:
        if not isinstance(xml, str) or not xml.strip():
            raise ConfigError("no label config in the request ('label_config' or 'schema')")
        if self.limits is not None:
            check_size(xml, self.limits)  # before hashing or parsing anything large
        hit = self._items.get_or_create(config_digest(xml), lambda: self._parse(xml))
        if isinstance(hit, ConfigError):
            raise ConfigError(str(hit))
        return hit

    def _parse(self, xml: str) -> ProjectConfig | ConfigError:
        try:
            config = _parse(xml, self.reasons_name)
            if self.limits is not None:
                check_labels(config, self.limits)
            return config
        except ConfigError as exc:
            return exc


def parse_label_config(xml: str, reasons_name: str = "semlabel_reasons") -> ProjectConfig:
    """Parse without caching (see :class:`ConfigCache` for the cached form)."""
    return _parse(xml, reasons_name)
