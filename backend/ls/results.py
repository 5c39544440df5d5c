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
- **spot answer** (a point or box drawn with a smart tool) — ``value.choices``: the chosen labels
  followed by the best ``suggest.spot.add`` label(s) at the spot; ``meta.spots`` (where, and the
  labels listed for it with probability and reasons), ``meta.suggested``: the image's
  likely-missing labels (listed, not ticked), ``meta.chosen_from``: where the annotator's choices
  were read (Label Studio's context holds only the smart region; see :func:`current_choices`);
  ``score``: P(missing) over the ticked spot labels.

When the config has the reasons ``<TextArea>``, a read-only ``textarea`` result carries the same
information as text the annotator sees.
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime
from typing import Iterable, Mapping, Sequence

from ..model.predictor import Suggestion
from ..model.spot import Spot
from .config import Binding, ProjectConfig

SPOT_TYPES = {"keypoint", "keypointlabels", "rectangle", "rectanglelabels"}


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
    parts = []
    if r.local is not None:
        here = f"here {_num(r.local)}"
        if r.mean_local is not None:
            here += f" vs image {_num(r.mean_local)}"
        parts.append(here)
        if r.attention is not None:
            parts.append(f"attention ×{float(r.attention):.1f}")
    parts.append(f"visual {_num(r.visual)}")
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
            **({"local": r.local, "mean_local": r.mean_local, "attention": r.attention, "spot": r.spot}
               if r.local is not None else {}),
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
    reasons_labels: int,
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


def spots(config: ProjectConfig, result) -> dict[str, list[Spot]]:
    """Points and boxes (smart ``<KeyPoint>``/``<Rectangle>`` regions) in a Label Studio result
    list, per image object name. Label Studio gives ``x``, ``y``, ``width``, ``height`` in percent
    of the image (a keypoint's ``width`` is its drawn size, not an extent)."""
    images = {b.object for b in config.bindings}
    out: dict[str, list[Spot]] = {}
    for item in result or []:
        if not isinstance(item, Mapping) or str(item.get("type", "")).lower() not in SPOT_TYPES:
            continue
        to_name = item.get("to_name")
        if to_name not in images:
            continue
        value = item.get("value") if isinstance(item.get("value"), Mapping) else {}
        try:
            x, y = float(value["x"]) / 100.0, float(value["y"]) / 100.0
            box = str(item.get("type", "")).lower().startswith("rectangle")
            w = float(value.get("width", 0.0)) / 100.0 if box else 0.0
            h = float(value.get("height", 0.0)) / 100.0 if box else 0.0
        except (KeyError, TypeError, ValueError):
            continue
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            continue
        size = [item.get("original_width"), item.get("original_height")]
        width, height = (float(size[0]), float(size[1])) if all(
            isinstance(v, (int, float)) and v > 0 for v in size) else (None, None)
        out.setdefault(to_name, []).append(Spot(min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0),
                                                max(w, 0.0), max(h, 0.0), width, height))
    return out


def _stamp(item: Mapping) -> str:
    return str(item.get("updated_at") or item.get("created_at") or "")


def current_choices(config: ProjectConfig, task: Mapping, served_version: str | None = None):
    """The annotator's current choices as far as the task Label Studio sends with an
    interactive request tells: its newest draft (Label Studio saves one 5 s after a change),
    else its newest submitted annotation, else the pre-annotation they started from (the
    served version's prediction, else the newest). Returns (choices per control, source)."""
    for key in ("drafts", "annotations"):
        items = [d for d in task.get(key) or [] if isinstance(d, Mapping) and isinstance(d.get("result"), list)
                 and not d.get("was_cancelled")]
        if items:
            newest = max(items, key=_stamp)
            return config.chosen(newest["result"])[0], key[:-1]
    preds = [p for p in task.get("predictions") or [] if isinstance(p, Mapping) and isinstance(p.get("result"), list)]
    if preds:
        own = [p for p in preds if p.get("model_version") == served_version]
        newest = max(own or preds, key=_stamp)
        return config.chosen(newest["result"])[0], "prediction"
    return {b.control: [] for b in config.bindings}, "none"


def saved_at(task: Mapping) -> float:
    """When the newest draft or annotation Label Studio sent with ``task`` was saved (epoch
    seconds; 0 when none or unreadable)."""
    newest = 0.0
    for key in ("drafts", "annotations"):
        for item in task.get(key) or []:
            if not isinstance(item, Mapping):
                continue
            stamp = _stamp(item)
            try:
                newest = max(newest, datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
            except ValueError:
                continue
    return newest


def spot_answer(
    config: ProjectConfig,
    chosen: Mapping[str, Sequence[str]],
    at_spot: Mapping[tuple[str, str], Sequence[tuple[Spot, Sequence[Suggestion]]]],
    in_image: Mapping[tuple[str, str], Sequence[Suggestion]],
    model_version: str,
    *,
    add: int,
    ignored: Sequence[str] = (),
    meta: Mapping | None = None,
) -> dict:
    """The answer to a point or box: the chosen labels plus the best ``add`` label(s) at each
    spot (never removing a chosen one), with the spot's and the image's reasons."""
    result, lines, ticked_probs = [], [], []
    for b in config.bindings:
        have = list(chosen.get(b.control, []))
        key = (b.control, b.object)
        spots_here = list(at_spot.get(key, []))
        image_items = [s for s in in_image.get(key, []) if s.label not in have]
        ticked: list[Suggestion] = []
        prefix = f"{b.control}: " if len(config.bindings) > 1 else ""
        spot_meta = []
        for spot, items in spots_here:
            items = [s for s in items if s.label not in have]
            room = add if b.multiple else (1 if not have and not ticked else 0)
            picks = [s for s in items if s.label not in {t.label for t in ticked}][:room]
            ticked.extend(picks)
            spot_meta.append({"where": spot.describe(), "suggested": [suggestion_json(s) for s in items],
                              "ticked": [s.label for s in picks]})
            if items:
                for s in items:
                    mark = "ticked" if s in picks else "listed"
                    lines.append(f"{prefix}{spot.describe()} ({mark}): {describe(s)}")
            else:
                lines.append(f"{prefix}{spot.describe()}: no label stands out here")
        choices = have + [s.label for s in ticked]
        image_items = [s for s in image_items if s.label not in choices]
        if not choices:  # an empty choices result would be an empty answer
            lines.extend(f"{prefix}likely missing in the image: {describe(s)}" for s in image_items)
            continue
        lines.extend(f"{prefix}likely missing in the image: {describe(s)}" for s in image_items)
        ticked_probs.extend(s.probability for s in ticked)
        region_meta = {
            "chosen": have,
            "spots": spot_meta,
            "suggested": [suggestion_json(s) for s in image_items],
            "p_missing": p_missing(s.probability for s in ticked),
            **(dict(meta) if meta else {}),
        }
        if ignored:
            region_meta["ignored"] = list(ignored)
        region_meta["text"] = "; ".join(describe(s) for s in ticked) or "nothing added"
        result.append(_choices_region(b, choices, region_meta["p_missing"], region_meta))
    if ignored:
        lines.append("ignored (not in the label config): " + ", ".join(ignored))
    result.extend(_textareas(config, lines))
    return {"model_version": model_version, "score": p_missing(ticked_probs), "result": result}


def error_entry(model_version: str, message: str) -> dict:
    """The entry of a task that could not be predicted. It has no ``result`` on purpose: Label
    Studio 1.23 then stores nothing for this task (and logs the entry), so the next "Retrieve
    predictions" asks again, while the other tasks of the batch are stored."""
    return {"model_version": model_version, "score": None, "error": message}
