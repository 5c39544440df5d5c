"""Label Studio prediction JSON: pre-annotations and suggestions with reasons (pure functions).

What each prediction holds (one ``choices`` result per served ``<Choices>``/``<Image>`` pair):

- **pre-annotation** — ``value.choices``: the labels the decision rule picks from the calibrated
  probabilities (fewest expected toggles, :mod:`backend.model.decision`; possibly none; only
  the most likely one for a single-choice ``<Choices>``); result
  ``score``: their mean probability; ``meta.scores``: every label's probability, most likely
  first; prediction ``score``: the mean over the pairs.
- **suggestions** (interactive pre-annotation, review after submit) — ``value.choices``: the
  chosen labels followed by the likely-missing ones; ``meta.chosen`` / ``meta.suggested`` (label,
  probability, reasons); result and prediction ``score``: P(something is missing)
  = 1 − Π(1 − p) over the suggested labels.

When the config has the reasons ``<TextArea>``, a read-only ``textarea`` result carries the same
information as text the annotator sees.
"""

from __future__ import annotations

import math
import uuid
from typing import Iterable, Mapping, Sequence

from ..model.predictor import Suggestion
from .config import Binding, ProjectConfig


def region_id() -> str:
    return uuid.uuid4().hex[:10]


def p_missing(probabilities: Iterable[float]) -> float:
    """P(at least one of these labels applies) = 1 − Π(1 − p), for independent labels."""
    keep = 1.0
    for p in probabilities:
        keep *= 1.0 - min(max(float(p), 0.0), 1.0)
    return round(1.0 - keep, 4)


def _pct(p: float) -> str:
    return f"{100.0 * float(p):.0f}%"


def _num(x) -> str:
    return f"{float(x):.2f}"


def describe(s: Suggestion) -> str:
    """One line: the suggested label, its probability and why."""
    r = s.reasons
    parts = [f"visual {_num(r.visual)}"]
    if r.zero_shot is not None and not (isinstance(r.zero_shot, float) and math.isnan(r.zero_shot)):
        parts.append(f"zero-shot {_num(r.zero_shot)}")
    if r.co_occurring:
        parts.append("often with " + ", ".join(f"{name} ({_num(v)})" for name, v in r.co_occurring))
    if r.neighbours:
        parts.append("near " + ", ".join(f"{name} ({_num(v)})" for name, v in r.neighbours))
    if r.taxonomy_path and len(r.taxonomy_path) > 1:
        parts.append("taxonomy " + " › ".join(r.taxonomy_path))
    return f"{s.label} {_pct(s.probability)}: " + "; ".join(parts)


def suggestion_json(s: Suggestion) -> dict:
    r = s.reasons
    zero_shot = None if isinstance(r.zero_shot, float) and math.isnan(r.zero_shot) else r.zero_shot
    return {
        "label": s.label,
        "probability": round(float(s.probability), 4),
        "reasons": {
            "visual": round(float(r.visual), 4),
            "zero_shot": None if zero_shot is None else round(float(zero_shot), 4),
            "co_occurring": [[n, round(float(v), 4)] for n, v in r.co_occurring],
            "neighbours": [[n, round(float(v), 4)] for n, v in r.neighbours],
            "taxonomy_path": list(r.taxonomy_path),
        },
        "text": describe(s),
    }


def _choices_region(b: Binding, choices: list[str], score: float, meta: dict) -> dict:
    return {
        "id": region_id(),
        "from_name": b.control,
        "to_name": b.object,
        "type": "choices",
        "value": {"choices": choices},
        "score": round(float(score), 4),
        "meta": meta,
    }


def _textareas(config: ProjectConfig, lines: list[str]) -> list[dict]:
    if not lines:
        return []
    return [
        {
            "id": region_id(),
            "from_name": name,
            "to_name": to_name,
            "type": "textarea",
            "value": {"text": lines},
            "readonly": True,
        }
        for name, to_name in config.reasons.items()
    ]


def add_note(config: ProjectConfig, entry: dict, line: str) -> dict:
    """Append ``line`` to the reasons text area(s) of a prediction entry (added when the entry
    has none yet; nothing happens for a config without a reasons ``<TextArea>``)."""
    if "result" not in entry or not config.reasons:
        return entry
    areas = [r for r in entry["result"] if r.get("type") == "textarea" and r.get("from_name") in config.reasons]
    if areas:
        for area in areas:
            area["value"]["text"].append(line)
    else:
        entry["result"].extend(_textareas(config, [line]))
    return entry


def unserved_note(notice: Mapping, served_version: str) -> tuple[str, str]:
    """(short tag for the model version, sentence for the reasons text) of a version that was
    trained but is not served (``ModelStore.unserved``)."""
    version, gate = notice.get("version") or "?", notice.get("gate") or {}
    if notice.get("kind") == "load":
        return (f"{version} not served: it failed to load",
                f"Served model: {served_version}. Version {version} is current but could not be loaded: "
                f"{notice.get('reason')}")
    value, base = gate.get("value"), gate.get("baseline_value")
    if value is not None and base is not None:
        why = f"held-out {gate.get('metric')} {value:.3f} < {base:.3f} - {gate.get('margin', 0):g}"
    else:
        why = str(notice.get("reason") or "kept by the promotion gate")[:120]
    summary = notice.get("data_summary") or {}
    tasks = ""
    if summary.get("train_tasks") is not None:
        tasks = f" on {summary['train_tasks']} tasks ({summary.get('holdout_tasks', 0)} more held out to compare)"
    return (f"latest training {version} not served: {why}",
            f"Served model: {served_version}. The latest training{tasks}, version {version}, was kept but "
            f"not served: {notice.get('reason')}.")


def preannotation(
    config: ProjectConfig,
    scores: Mapping[tuple[str, str], Sequence[float]],
    model_version: str,
    *,
    threshold: float,
    max_labels: int,
    reasons_labels: int = 10,
    selected: Mapping[tuple[str, str], Sequence[bool]] | None = None,
) -> dict:
    """The pre-annotation prediction of one task. ``scores[(control, object)]`` holds the
    probabilities of that binding's labels, in the binding's label order; ``selected``, the
    same shape, the decision rule's choices (``backend.model.decision.preselect``; may be
    none: an empty choice list, the scores still in ``meta``); without it, the threshold rule."""
    result, lines, confidences = [], [], []
    for b in config.bindings:
        probs = [float(p) for p in scores[(b.control, b.object)]]
        names = b.names
        order = sorted(range(len(probs)), key=lambda i: -probs[i])
        if selected is not None:
            picked = [i for i in order if selected[(b.control, b.object)][i]]
        elif b.multiple:
            picked = [i for i in order if probs[i] >= threshold][:max_labels] or order[:1]
        else:
            picked = order[:1]
        # nothing picked: the confidence that none of the labels applies
        confidence = (sum(probs[i] for i in picked) / len(picked) if picked
                      else sum(1.0 - p for p in probs) / max(1, len(probs)))
        confidences.append(confidence)
        listed = ", ".join(f"{names[i]} {_pct(probs[i])}" for i in order[:reasons_labels])
        text = f"{listed} (pre-selected: {', '.join(names[i] for i in picked) or 'none'})"
        meta = {
            "scores": {names[i]: round(probs[i], 4) for i in order},
            "threshold": threshold,
            "text": text,
        }
        result.append(_choices_region(b, [names[i] for i in picked], confidence, meta))
        prefix = f"{b.control}: " if len(config.bindings) > 1 else ""
        lines.append(f"{prefix}scores {text}")
    result.extend(_textareas(config, lines))
    return {
        "model_version": model_version,
        "score": round(sum(confidences) / len(confidences), 4),
        "result": result,
    }


def suggestions(
    config: ProjectConfig,
    chosen: Mapping[str, Sequence[str]],
    suggested: Mapping[tuple[str, str], Sequence[Suggestion]],
    model_version: str,
    *,
    ignored: Sequence[str] = (),
    meta: Mapping | None = None,
) -> dict:
    """The chosen labels plus the likely-missing ones, with reasons (interactive and review).

    A single-choice ``<Choices>`` keeps the chosen label, or gets the best suggestion when
    nothing is chosen; only multiple-choice ones get extra labels."""
    result, lines, all_probs = [], [], []
    for b in config.bindings:
        have = list(chosen.get(b.control, []))
        items = list(suggested.get((b.control, b.object), []))
        if not b.multiple:
            items = [] if have else items[:1]
        items = [s for s in items if s.label not in have]
        choices = have + [s.label for s in items]
        if not choices:
            continue
        pm = p_missing(s.probability for s in items)
        all_probs.extend(s.probability for s in items)
        region_meta = {
            "chosen": have,
            "suggested": [suggestion_json(s) for s in items],
            "p_missing": pm,
            **(dict(meta) if meta else {}),
        }
        if ignored:
            region_meta["ignored"] = list(ignored)
        prefix = f"{b.control}: " if len(config.bindings) > 1 else ""
        if items:
            text = "; ".join(describe(s) for s in items)
            lines.extend(f"{prefix}likely missing: {describe(s)}" for s in items)
        else:
            text = "nothing likely missing"
            lines.append(f"{prefix}nothing likely missing")
        region_meta["text"] = text
        result.append(_choices_region(b, choices, pm, region_meta))
    if ignored:
        lines.append("ignored (not in the label config): " + ", ".join(ignored))
    result.extend(_textareas(config, lines))
    return {"model_version": model_version, "score": p_missing(all_probs), "result": result}


def error_entry(model_version: str, message: str) -> dict:
    """The entry of a task that could not be predicted. It has no ``result`` on purpose: Label
    Studio 1.23 then stores nothing for this task (and logs the entry), so the next "Retrieve
    predictions" asks again, while the other tasks of the batch are stored."""
    return {"model_version": model_version, "score": None, "error": message}
