"""The one path every prediction takes, from parsed tasks to Label Studio JSON.

tasks → features (:class:`~.fetch.TaskImages`) → the project's served predictor (its current
trained version, else zero-shot) and the label space of each ``<Choices>``
(:class:`~.spaces.LabelSpaces`) → probabilities / suggestions → Label Studio JSON
(:mod:`.results`). Three kinds of answer:

- **pre-annotation** (no context): the labels the decision rule picks
  (:func:`backend.model.decision.preselect`);
- **interactive** (``context.result`` holds the annotator's choices): the chosen labels plus
  the likely-missing ones, with reasons; with a point or box from a smart tool, the best labels
  at that spot (:mod:`backend.model.spot`);
- **review** (a submitted annotation): its labels plus the likely-missing ones, scored by
  P(something missing).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Mapping, Sequence

from ..errors import ImageError
from ..lru import LRU
from ..model.decision import preselect
from . import metrics, results
from .config import ProjectConfig

log = logging.getLogger(__name__)

class Predictions:
    """Predictions for one backend process.

    Args:
        service: the :class:`~.service.BackendService` (served predictors and their versions).
        images: the tasks' image features. spaces: the label spaces.
        compute: the lock that serialises the CPU/GPU work of the process.
    """

    def __init__(self, service, images, spaces, compute: threading.Lock):
        self.service = service
        self.settings = service.settings
        self.images = images
        self.spaces = spaces
        self._compute = compute
        # (project, task id) → (when, choices per control) of the last spot answer: Label
        # Studio saves the annotator's draft 5 s after a change, so two points in quick
        # succession would otherwise lose the first point's label.
        self._answers: LRU[tuple, tuple[float, dict]] = LRU(self.settings.backend.max_answers)

    # -- the request -------------------------------------------------------------------
    def predict(self, project: str | None, config: ProjectConfig, tasks: Sequence[Any],
                context: Any = None) -> tuple[list, str]:
        """One entry per task, in order (see :mod:`.results`), and the model version.

        ``context.result`` (interactive pre-annotation) holds the annotator's partial choices, or
        (Label Studio's UI) a point or box drawn with a smart tool."""
        predictor = self.service.predictor(project)
        version = self.service.model_version(project, predictor)
        note = self.service.unserved_note(project, predictor.version)
        partial = context.get("result") if isinstance(context, Mapping) else None
        kind = "interactive" if isinstance(partial, list) else "preannotation"
        feats, errors = self.images.of_tasks(config, tasks, self.service.connections.get(project))
        ok = [i for i in range(len(tasks)) if feats[i] is not None]
        if kind == "preannotation":
            answers = self._preannotations(predictor, config, [feats[i] for i in ok], version)
        else:
            answers = self._interactive(project, predictor, config, [tasks[i] for i in ok],
                                        [feats[i] for i in ok], partial, version)
        entries: list[dict | None] = [None] * len(tasks)
        for i, entry in zip(ok, answers):
            entries[i] = results.add_note(config, entry, note[1]) if note is not None else entry
        for i, err in enumerate(errors):
            if err is not None:
                log.warning("project %s: no prediction for %s", project or "-", err)
                entries[i] = results.error_entry(version, err)
                metrics.PREDICTIONS.labels(kind, "error").inc()
        metrics.PREDICTIONS.labels(kind, "ok").inc(len(ok))
        return entries, version

    def _preannotations(self, predictor, config: ProjectConfig, feats: list[dict], version: str) -> list[dict]:
        scores = self._probabilities(predictor, config, feats)
        pre = self.service.cfg.preannotation
        multiple = {(b.control, b.object): b.multiple for b in config.bindings}
        chosen = {key: preselect(rows, pre, multiple[key]) if rows else [] for key, rows in scores.items()}
        return [results.preannotation(
            config, {key: rows[j] for key, rows in scores.items()}, version,
            threshold=pre.threshold, max_labels=pre.max_labels, reasons_labels=pre.reasons_labels,
            selected={key: rows[j] for key, rows in chosen.items()},
        ) for j in range(len(feats))]

    def _interactive(self, project, predictor, config: ProjectConfig, tasks: list, feats: list[dict],
                     partial: list, version: str) -> list[dict]:
        ctx_chosen, unknown = config.chosen(partial)
        if unknown:
            log.info("interactive context: ignoring %d value(s) not in the label config: %s",
                     len(unknown), ", ".join(unknown[:10]))
        spots = results.spots(config, partial)
        chosen, sources = [], []
        for task in tasks:
            row, source = ((ctx_chosen, "context") if any(ctx_chosen.values()) or not spots
                           else self._current_choices(project, config, task, version))
            chosen.append(row)
            sources.append(source)
        cfg = self.settings.suggest
        sugg = self._suggestions(predictor, config, feats, chosen, cfg.top_k, cfg.min_probability)
        if not spots:
            return [results.suggestions(config, chosen[j], {key: rows[j] for key, rows in sugg.items()}, version,
                                        ignored=unknown) for j in range(len(tasks))]
        at_spot = self._spot_suggestions(predictor, config, feats, chosen, spots)
        out = []
        for j, task in enumerate(tasks):
            entry = results.spot_answer(
                config, chosen[j], {key: rows[j] for key, rows in at_spot.items()},
                {key: rows[j] for key, rows in sugg.items()}, version, add=cfg.spot.add, ignored=unknown,
                meta={"chosen_from": sources[j]},
            )
            self._remember_answer(project, task, entry)
            out.append(entry)
        return out

    def _current_choices(self, project, config: ProjectConfig, task: Mapping, version: str) -> tuple[dict, str]:
        """Label Studio 1.23 sends only the smart region in the context and *replaces* the
        annotation's choices by the answer's: the annotator's current choices come from the
        task Label Studio sends along (draft, annotation or pre-annotation), plus this
        process's last answer for the task when it is newer than what the task holds."""
        row, source = results.current_choices(config, task, version)
        last = self._answers.get((project, task.get("id")))
        if last is not None and time.time() - last[0] <= self.settings.backend.answer_ttl_s and last[0] > results.saved_at(task):
            row = {c: list(dict.fromkeys([*row.get(c, []), *last[1].get(c, [])])) for c in row}
            source += "+last answer"
        return row, source

    def _remember_answer(self, project, task: Mapping, entry: Mapping) -> None:
        if task.get("id") is None:
            return
        choices = {r["from_name"]: list(r["value"]["choices"]) for r in entry.get("result", [])
                   if r.get("type") == "choices"}
        self._answers.put((project, task.get("id")), (time.time(), choices))

    # -- the heads ---------------------------------------------------------------------
    def _per_binding(self, config: ProjectConfig, feats: list[dict], head) -> dict:
        """``{(control, object): head(binding, that image's features, label space)}`` under the
        compute lock (``[]`` for every binding when there are no features)."""
        out = {}
        for b in config.bindings:
            if not feats:
                out[(b.control, b.object)] = []
                continue
            space = self.spaces.get(b)  # outside the compute lock: may embed new labels
            with self._compute:
                out[(b.control, b.object)] = head(b, [f[b.object] for f in feats], space)
        return out

    def _probabilities(self, predictor, config: ProjectConfig, feats: list[dict]) -> dict:
        return self._per_binding(config, feats, lambda b, images, space: predictor.probabilities(
            images, space).tolist())

    def _suggestions(self, predictor, config: ProjectConfig, feats, chosen, top_k, min_probability) -> dict:
        return self._per_binding(config, feats, lambda b, images, space: predictor.suggest(
            images, space, [list(c.get(b.control, [])) for c in chosen], top_k, min_probability))

    def _spot_suggestions(self, predictor, config: ProjectConfig, feats, chosen, spots) -> dict:
        """``{(control, object): [per image: [(Spot, [Suggestion])]]}`` for the bindings whose
        image has a spot (a smart point or box) in the context."""
        from ..model.spot import crop_fraction, suggest_at_spot

        cfg, out = self.settings.suggest, {}
        fraction = crop_fraction(self.service.runtime.backbone)
        for b in config.bindings:
            on_image = spots.get(b.object) or []
            if not on_image or not feats:
                continue
            space = self.spaces.get(b)
            rows = []
            for f, c in zip(feats, chosen):
                known = list(c.get(b.control, []))
                with self._compute:
                    rows.append([(spot, suggest_at_spot(
                        predictor, f[b.object], space, known, spot, top_k=cfg.spot.listed,
                        min_probability=cfg.spot.min_probability, sigma=cfg.spot.point_sigma,
                        gain=cfg.spot.local_gain, fraction=fraction, co_occurring=cfg.co_occurring,
                        neighbours=cfg.neighbours)) for spot in on_image])
            out[(b.control, b.object)] = rows
        return out

    # -- review after submit -----------------------------------------------------------
    def review(self, project: str, config: ProjectConfig, task: Mapping, annotation: Mapping) -> dict | None:
        """The review prediction of one submitted annotation: its labels plus the likely-missing
        ones; ``None`` when the annotation was skipped or chose nothing semlabel serves."""
        if annotation.get("was_cancelled"):
            return None
        chosen, unknown = config.chosen(annotation.get("result") or [])
        if not any(chosen.values()):
            return None
        predictor = self.service.predictor(project)
        feats, errors = self.images.of_tasks(config, [task], self.service.connections.get(project))
        if errors[0] is not None:
            raise ImageError(str(task.get("id")), errors[0])
        cfg = self.service.cfg.review
        # The top_k unchosen labels whatever their probability: the task's score, P(missing),
        # ranks the reviewer's queue even when no single label reaches min_probability (a
        # calibrated weak model); the text lists only those that do.
        sugg = self._suggestions(predictor, config, feats, [chosen], cfg.top_k, 0.0)
        top = {key: rows[0] for key, rows in sugg.items()}
        listed = {key: [s for s in row if s.probability >= cfg.min_probability] for key, row in top.items()}
        meta = {"kind": "review", "annotation_id": annotation.get("id"), "served_version": predictor.version}
        version = cfg.model_version.replace("{version}", predictor.version)
        entry = results.suggestions(config, chosen, listed, version, ignored=unknown, meta=meta)
        entry["score"] = results.p_missing(s.probability for row in top.values() for s in row)
        metrics.PREDICTIONS.labels("review", "ok").inc()
        return entry
