"""Label Studio exports → partial-label examples; label configs → label lists.

A Label Studio JSON export is a list of tasks::

    {"id": 7, "data": {"image": "/data/upload/1/a.png"},
     "annotations": [{"result": [{"type": "choices", "from_name": "label", "to_name": "image",
                                  "value": {"choices": ["Coat", "Bag"]}}],
                      "was_cancelled": false, "updated_at": "...", ...}],
     "predictions": [...]}

Rules (:func:`examples_from_tasks`):

- only ``choices`` results count (of the given ``from_name`` when one is set), read by the
  backend's one result parser (``backend.ls.config.ProjectConfig.chosen``, see
  :func:`results_config`); a task's *predictions* are never labels;
- cancelled annotations (``was_cancelled``) and annotations without any choice are ignored;
- several annotations of one task: ``policy="union"`` (default) takes the union of their
  choices — every annotator's positive is a positive; ``policy="latest"`` takes the
  annotation with the newest ``updated_at``/``created_at`` (then the highest id);
- choices outside the label list are dropped (counted in the report); tasks left without a
  positive are skipped. Chosen labels are *partial*: a label not chosen is unknown.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import parse_qs, unquote, urlparse

from backend.errors import ConfigError, ImageError

log = logging.getLogger(__name__)


@dataclass
class Example:
    """One annotated image: where it is, and the labels chosen for it (partial)."""

    image: str
    positives: list[str]
    task_id: int | None = None
    key: str | None = None  # feature-cache key, once the features are known


@dataclass
class ExportReport:
    tasks: int = 0
    examples: int = 0
    skipped_no_image: int = 0
    skipped_no_labels: int = 0
    cancelled_annotations: int = 0
    unknown_labels: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def label_config_binding(xml: str):
    """The ``<Choices>`` → ``<Image>`` binding semlabel trains on in a Label Studio label
    config (the first multiple-choice one), parsed by :mod:`backend.ls.config` exactly as the
    backend serves it: labels named by what Label Studio stores (the alias when there is one),
    with their values and hints as prompt texts. ``ConfigError`` when there is none."""
    from backend.ls.config import parse_label_config

    config = parse_label_config(xml)
    if not config.bindings:
        raise ConfigError("label config has no <Choices> bound to an <Image>")
    return next((b for b in config.bindings if b.multiple), config.bindings[0])


def targets(label_sets: Sequence[Sequence[str]], names: Sequence[str]):
    """``[N, C]`` 0/1 float tensor: ``y[b, c] = 1`` when ``names[c]`` is in ``label_sets[b]``
    (names outside ``names`` are ignored)."""
    import torch

    index = {n: i for i, n in enumerate(names)}
    y = torch.zeros(len(label_sets), len(names))
    for b, labels in enumerate(label_sets):
        for name in labels:
            if name in index:
                y[b, index[name]] = 1.0
    return y


def read_export(path: str | os.PathLike) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: export file not found") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not a JSON export ({exc})") from exc
    if isinstance(data, dict) and "tasks" in data:
        data = data["tasks"]
    if not isinstance(data, list):
        raise ConfigError(f"{path}: a Label Studio JSON export is a list of tasks")
    return data


def _choices_results(tasks: Iterable[dict]):
    """Every ``choices`` result of the tasks' annotations (predictions never count)."""
    for task in tasks:
        for annotation in task.get("annotations") or []:
            if isinstance(annotation, dict):
                for item in annotation.get("result") or []:
                    if isinstance(item, dict) and item.get("type", "choices") == "choices":
                        yield item


def results_config(tasks: Sequence[dict], labels: Sequence[str] | None = None, from_name: str | None = None):
    """The :class:`~backend.ls.config.ProjectConfig` the annotations are read with, so that
    :meth:`ProjectConfig.chosen` — the backend's one result parser — reads them: one
    multiple-choice binding of ``labels`` (default: every choice the tasks name) per
    control (``from_name``) and object (``to_name``) their choices results name; only the
    control ``from_name`` when given (results that name no control count for it)."""
    from backend.labels import Label
    from backend.ls.config import Binding, ProjectConfig

    pairs: dict[tuple[str, str], None] = {}
    names: dict[str, None] = dict.fromkeys(labels or ())
    for item in _choices_results(tasks):
        control = str(item.get("from_name", ""))
        if from_name and control not in ("", from_name):
            continue
        pairs[(control, str(item.get("to_name") or ""))] = None
        if labels is None:
            value = item.get("value") if isinstance(item.get("value"), dict) else {}
            names.update(dict.fromkeys(c for c in value.get("choices") or [] if isinstance(c, str) and c.strip()))
    label_tuple = tuple(Label(n) for n in names)
    bindings = tuple(Binding(control, obj, None, None, True, label_tuple) for control, obj in pairs)
    return ProjectConfig("", bindings)


def annotation_choices(config, annotation: dict) -> list[str]:
    """The choices of one annotation as ``config`` reads them: its labels first, then the
    values that are not labels of the config (callers count and drop those)."""
    chosen, unknown = config.chosen(annotation.get("result"))
    out: list[str] = []
    for names in chosen.values():
        out.extend(n for n in names if n not in out)
    out.extend(u.split(":", 1)[1] for u in unknown if u.split(":", 1)[1] not in out)
    return out


def _annotation_time(annotation: dict) -> tuple:
    return (
        str(annotation.get("updated_at") or annotation.get("created_at") or ""),
        annotation.get("id") if isinstance(annotation.get("id"), int) else -1,
    )


def task_positives(task: dict, config, policy: str = "union") -> tuple[list[str], int]:
    """(chosen labels, number of cancelled annotations) of one task, its annotations read
    with ``config`` (:func:`results_config`)."""
    cancelled = 0
    usable = []
    for annotation in task.get("annotations") or []:
        if not isinstance(annotation, dict):
            continue
        if annotation.get("was_cancelled"):
            cancelled += 1
            continue
        choices = annotation_choices(config, annotation)
        if choices:
            usable.append((annotation, choices))
    if not usable:
        return [], cancelled
    if policy == "latest":
        return max(usable, key=lambda ac: _annotation_time(ac[0]))[1], cancelled
    if policy != "union":
        raise ValueError(f"unknown annotation policy {policy!r} (union, latest)")
    out: list[str] = []
    for _, choices in usable:
        out.extend(c for c in choices if c not in out)
    return out, cancelled


def task_image(task: dict, image_field: str | None = None) -> str | None:
    data = task.get("data") or {}
    if image_field and isinstance(data.get(image_field), str):
        return data[image_field]
    for key in ("image", "img", "url", "image_url"):
        if isinstance(data.get(key), str):
            return data[key]
    strings = [v for v in data.values() if isinstance(v, str)]
    return strings[0] if len(strings) == 1 else None


def examples_from_tasks(
    tasks: Iterable[dict],
    labels: Sequence[str] | None = None,
    *,
    from_name: str | None = None,
    image_field: str | None = None,
    policy: str = "union",
    images_root: str | os.PathLike | None = None,
) -> tuple[list[Example], ExportReport]:
    """Partial-label examples of an export (rules in the module docstring)."""
    tasks = list(tasks)
    allowed = set(labels) if labels is not None else None
    config = results_config(tasks, labels, from_name)
    report = ExportReport()
    out = []
    for task in tasks:
        report.tasks += 1
        image = task_image(task, image_field)
        if not image:
            report.skipped_no_image += 1
            continue
        positives, cancelled = task_positives(task, config, policy)
        report.cancelled_annotations += cancelled
        if allowed is not None:
            for name in positives:
                if name not in allowed:
                    report.unknown_labels[name] = report.unknown_labels.get(name, 0) + 1
            positives = [p for p in positives if p in allowed]
        if not positives:
            report.skipped_no_labels += 1
            continue
        source = resolve_image(image, images_root) if images_root else image
        out.append(Example(source, positives, task.get("id")))
    report.examples = len(out)
    return out, report


def resolve_image(source: str, images_root: str | os.PathLike) -> str:
    """Map a task's image reference into ``images_root``.

    Tries, in order: ``root/<path without a leading /data/ or />``, for
    ``/data/local-files/?d=REL`` ``root/REL``, then ``root/<file name>``. Returns the first
    that exists, else the source unchanged (http(s) and data URIs are never mapped)."""
    if source.startswith(("http://", "https://", "data:")):
        return source
    root = Path(images_root)
    parsed = urlparse(source)
    candidates = []
    if "d" in parse_qs(parsed.query):
        candidates.append(root / unquote(parse_qs(parsed.query)["d"][0]))
    path = unquote(parsed.path)
    stripped = path[len("/data/") :] if path.startswith("/data/") else path.lstrip("/")
    candidates += [root / stripped, root / Path(path).name]
    if not Path(source).is_absolute():
        candidates.insert(0, root / source)
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    return source


def usable_features(examples: Sequence[Example], runtime, progress: bool | None = None):
    """Fetch and encode (or read from the cache) every example's image: ``(kept examples
    with .key set, their :class:`~backend.features.Features`, errors)`` where errors are the
    :class:`ImageError` of the images that could not be used (logged)."""
    feats = runtime.features_for([e.image for e in examples], [e.task_id for e in examples], progress=progress)
    kept, good, errors = [], [], []
    for example, f in zip(examples, feats):
        if isinstance(f, ImageError):
            errors.append(f)
            continue
        example.key = f.key
        kept.append(example)
        good.append(f)
    if errors:
        log.warning("%d of %d images could not be used (first: %s)", len(errors), len(examples), errors[0])
    return kept, good, errors


def attach_feature_batch(examples: Sequence[Example], runtime, progress: bool | None = None):
    """:func:`usable_features` as one batch: ``(kept examples with .key set, EncodedImages
    of every feature — native and text-aligned — of the kept images, errors)``;
    ``ConfigError`` when no image is usable."""
    from backend.features import stack_all

    kept, good, errors = usable_features(examples, runtime, progress)
    if not kept:
        raise ConfigError("no usable image among the examples" + (f" (first error: {errors[0]})" if errors else ""))
    return kept, stack_all(good), errors


def attach_features(examples: Sequence[Example], runtime, progress: bool | None = None):
    """:func:`attach_feature_batch` with the text-aligned features only:
    ``(kept examples, global [N, D], local [N, P, D], errors)``."""
    kept, batch, errors = attach_feature_batch(examples, runtime, progress)
    return kept, batch.global_, batch.local, errors
