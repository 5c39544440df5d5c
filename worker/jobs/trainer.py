"""The trainer a training job calls: :class:`TrainingContext` in, :class:`TrainingResult`
out. The default, :func:`train_heads`, trains the SigRL heads on cached features and
evaluates them on the held-out tasks beside the current version; ``worker.trainer``
(``module:function``) names another."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from backend.errors import SemlabelError
from backend.settings import Settings

from .collect import ProjectData
from .progress import Progress
from .runtime import runtime


class PermanentJobError(SemlabelError):
    """A training failure that retrying cannot fix (bad label config, ...)."""


@dataclass
class TrainingContext:
    """What a trainer gets. It writes the model into ``out_dir`` and returns a
    :class:`TrainingResult`."""

    project: str
    data: ProjectData
    train_tasks: list[dict]
    holdout_tasks: list[dict]
    settings: Settings
    progress: Progress
    out_dir: Path
    current_dir: Path | None  # the current version's directory (baseline on the same held-out split)
    current_version: str | None
    runtime_factory: Callable[[], Any] = field(default=runtime)


@dataclass
class TrainingResult:
    metrics: dict                      # held-out metrics of the new model (the gate reads store.gate_metric)
    labels: list[str]
    baseline: dict | None = None       # {"version", "metrics"}: the current version on the same held-out split
    config: dict = field(default_factory=dict)
    extra_summary: dict = field(default_factory=dict)
    promote_reason: str | None = None  # set: promote without the gate, for this reason


def _taxonomy(settings: Settings):
    path = getattr(getattr(settings, "backend", None), "taxonomy", "") or ""
    if not path:
        return None
    from backend.labels import Taxonomy

    return Taxonomy.from_yaml(path)


def _binding(label_config: str):
    """The ``<Choices>``→``<Image>`` binding semlabel serves (the first multiple-choice one)."""
    from backend.errors import ConfigError
    from worker.training.data import label_config_binding

    try:
        return label_config_binding(label_config)
    except ConfigError as exc:
        raise PermanentJobError(f"label config: {exc}") from None


def _evaluate(predictor, feats, examples, space) -> dict:
    """Held-out figures of a predictor's probabilities (ranking only; no per-label APs)."""
    import torch

    from worker.eval.evaluate import evaluate_outputs
    from worker.training.data import targets

    with torch.no_grad():
        scores = predictor.probabilities(feats, space)
    y = targets([e.positives for e in examples], space.names)
    out = evaluate_outputs(scores, y, space.names, ks=(1, 3))
    out.pop("AP_per_label", None)
    return out


def train_heads(ctx: TrainingContext) -> TrainingResult:
    """The default trainer: the SigRL heads (worker.training.train.train_model) on cached features,
    evaluated on the held-out tasks together with the current version."""
    from backend.errors import ConfigError
    from backend.model import save_model
    from worker.training.data import attach_feature_batch, examples_from_tasks
    from worker.training.train import train_model

    settings = ctx.settings
    binding = _binding(ctx.data.label_config or "")
    labels = binding.names
    rt = ctx.runtime_factory()
    taxonomy = _taxonomy(settings)
    space = rt.label_space(binding.labels, taxonomy=taxonomy)
    kw = dict(from_name=binding.control, image_field=binding.data_key)
    train_ex, report = examples_from_tasks(ctx.train_tasks, labels, **kw)
    hold_ex, hold_report = examples_from_tasks(ctx.holdout_tasks, labels, **kw)
    if not train_ex:
        raise PermanentJobError(f"no annotated image carries a label of the config ({report.to_dict()})")
    ctx.progress("features", images=len(train_ex) + len(hold_ex))
    train_ex, batch, errors = attach_feature_batch(train_ex, rt, progress=False)

    def on_epoch(info: dict) -> None:
        fields = {k: info[k] for k in ("epoch", "epochs", "loss") if k in info}
        if "val_map" in info:
            fields["val_mAP"] = info["val_map"]
        ctx.progress("training" if info.get("stage") == "train" and info.get("epoch") == 1 else None, **fields)

    try:
        result = train_model(train_ex, space, batch, settings, backbone=rt.backbone, progress=on_epoch,
                             taxonomy=taxonomy, show_progress=False)
    except ConfigError as exc:
        raise PermanentJobError(str(exc)) from None
    save_model(result.model, ctx.out_dir, metrics=result.metrics)
    metrics: dict = {"validation": result.metrics}
    ctx.progress("evaluating", holdout_images=len(hold_ex))
    if hold_ex:
        hold_ex, figures, baseline, promote_reason = _held_out(ctx, rt, hold_ex, space)
        metrics.update(figures)
    else:
        baseline = None
        promote_reason = (f"too few labelled tasks for a held-out evaluation "
                          f"(fewer than {settings.worker.min_holdout_tasks} would be held out); "
                          "promoted without the gate")
    (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str))
    summary = {
        "examples": len(train_ex),
        "holdout_examples": len(hold_ex),
        "image_errors": len(errors),
        "export_report": report.to_dict(),
        "training": result.summary,
    }
    if hold_report.skipped_no_labels or hold_report.skipped_no_image:
        summary["holdout_report"] = hold_report.to_dict()
    return TrainingResult(
        metrics=metrics, labels=labels, baseline=baseline,
        config={"binding": binding.control, "image_field": binding.data_key, "backbone": rt.backbone.name,
                "taxonomy": bool(taxonomy)},
        extra_summary=summary, promote_reason=promote_reason,
    )


def _held_out(ctx: TrainingContext, rt, hold_ex, space):
    """(held-out examples with a usable image, the new version's figures on them, the
    baseline — the current version, or zero-shot when none is served — on the same images,
    a reason to promote without the gate when the current version cannot be loaded)."""
    from backend.errors import ModelLoadError
    from backend.model import load_predictor

    feats = rt.features_for([e.image for e in hold_ex], [e.task_id for e in hold_ex], progress=False)
    pairs = [(e, f) for e, f in zip(hold_ex, feats) if not isinstance(f, SemlabelError)]
    if not pairs:
        return hold_ex, {}, None, None
    hold_ex, hold_feats = [p[0] for p in pairs], [p[1] for p in pairs]
    figures = {**_evaluate(load_predictor(ctx.out_dir, rt), hold_feats, hold_ex, space), "split": "held-out tasks"}
    if ctx.current_dir is None:  # the project is served zero-shot: that is the baseline
        zero_shot = rt.zero_shot_predictor()
        return hold_ex, figures, {"version": zero_shot.version,
                                  "metrics": _evaluate(zero_shot, hold_feats, hold_ex, space)}, None
    try:
        current = load_predictor(ctx.current_dir, rt)
    except (ModelLoadError, OSError) as exc:
        return hold_ex, figures, None, (f"the current version {ctx.current_version} cannot be loaded here "
                                        f"({exc}); promoted without comparison")
    return hold_ex, figures, {"version": ctx.current_version,
                              "metrics": _evaluate(current, hold_feats, hold_ex, space)}, None


def trainer_for(settings: Settings) -> Callable[[TrainingContext], TrainingResult]:
    """``worker.trainer`` (``module:function``) when configured, else :func:`train_heads`."""
    spec = settings.worker.trainer
    if not spec:
        return train_heads
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)
