"""The methods of the bench table (:data:`METHODS`) run on one label setting: every seed of
the linear probes and of the SigRL variants, scored on the fully labelled test images by the
one evaluator (:func:`worker.eval.evaluate.evaluate_outputs`), then averaged over the seeds."""

from __future__ import annotations

import json
import logging
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from backend.features import Features
from backend.labels import Taxonomy
from backend.settings import Settings
from worker.eval.evaluate import evaluate_outputs
from worker.eval.metrics import calibration, pr_curves

from .experiments import machine_info, served_predictor, time_full_training, unseen_labels_experiment
from .summary import FULL, SETTING_TITLES

log = logging.getLogger(__name__)

#: (row name, what to train)
METHODS: list[tuple[str, dict | None]] = [
    ("zero-shot", None),
    ("linear probe + AN-LS", {"probe": "an_ls"}),
    ("linear probe + EM", {"probe": "em"}),
    ("GMC only", {"model": {"use_svfr": False}}),
    ("SVFR only", {"model": {"use_gmc": False}}),
    ("SigRL (GMC + SVFR)", {"model": {}}),
    ("SigRL + semantic loss", {"model": {}, "loss": {"semantic": True}}),
]


def pooled(feats: Sequence[Features]) -> tuple[torch.Tensor, str]:
    """``[N, D]`` features for the linear probes: the backbone's native pooled feature of the
    whole image when the Features carry one, else the text-aligned global feature."""
    native = [getattr(f, "native_global", None) for f in feats]
    # Features without a native part of their own carry the aligned one in its place.
    if feats and all(n is not None and n is not f.global_ for n, f in zip(native, feats)):
        return torch.stack([n.float() for n in native]), "native pooled"
    return torch.stack([f.global_.float() for f in feats]), "text-aligned global"


def probe_probabilities(probe, G: torch.Tensor) -> torch.Tensor:
    """The probe's calibrated probabilities when it has them, else its sigmoid outputs."""
    fn = getattr(probe, "probabilities", None)
    return fn(G) if callable(fn) else torch.sigmoid(probe.logits(G))


def probe_grid(settings: Settings) -> list[tuple[float, float]]:
    """(learning rate, weight decay) pairs the linear probes are tuned over
    (``bench.probe_lr`` × ``bench.probe_weight_decay``)."""
    return [(lr, wd) for lr in settings.bench.probe_lr for wd in settings.bench.probe_weight_decay]


@dataclass
class TestSet:
    """The fully labelled test images every method is scored on, with the hidden-positive split."""

    examples: list
    feats: list
    errors: list
    y: torch.Tensor
    known: torch.Tensor
    hidden: torch.Tensor
    known_names: list[list[str]]
    G: torch.Tensor  # pooled features for the linear probes
    zero_shot: torch.Tensor


@dataclass
class MethodRuns:
    """One run: what every method shares, and what the runs collect for the report."""

    settings: Settings
    out: Path
    classes: list[str]
    taxonomy: Taxonomy
    runtime: object
    space: object
    test: TestSet
    seeds: list[int]
    show_progress: bool | None
    curves: dict = field(default_factory=dict)
    calibrations: dict = field(default_factory=dict)
    saved_models: dict = field(default_factory=dict)
    full_runs: list = field(default_factory=list)  # (training images, wall s, CPU s) of every full-model run

    @property
    def scratch(self) -> Path:
        return self.out / "models" / "runs"

    def evaluate(self, scores, probabilities, conditional=None) -> dict:
        """Ranking figures of ``scores``, and what an annotator sees of the backend's decision
        rule applied to the served ``probabilities``."""
        bench = self.settings.bench
        return evaluate_outputs(scores, self.test.y, self.classes, probabilities=probabilities,
                                conditional=conditional, known=self.test.known, hidden=self.test.hidden,
                                recall_ks=(1, bench.recall_k), taxonomy=self.taxonomy,
                                preannotation=self.settings.backend.preannotation, ece_bins=bench.ece_bins,
                                ece_binning=bench.ece_binning)

    def figures_of(self, mode: str, name: str, scores, probabilities) -> None:
        self.curves.setdefault(mode, {})[name] = pr_curves(scores, self.test.y, self.classes)
        self.calibrations.setdefault(mode, {})[name] = calibration(
            probabilities, self.test.y, self.settings.bench.ece_bins, self.settings.bench.ece_binning)

    def probe_runs(self, mode, name, spec, train_set, runs: dict, tuning: dict) -> None:
        """Every seed of a linear probe (tuned on the validation split the probe carves from
        the training export, as the heads' model selection — never the test images —, and
        calibrated there)."""
        from worker.training.baselines import train_linear_probe

        examples, feats, _ = train_set
        G_train, _ = pooled(feats)
        G_test = self.test.G
        for seed in self.seeds:
            probe = train_linear_probe([e.positives for e in examples], self.classes, G_train,
                                       self.settings.loss.model_copy(update={"kind": spec["probe"]}),
                                       self.settings.train, seed, show_progress=self.show_progress,
                                       grid=probe_grid(self.settings), calibration_cfg=self.settings.calibration)
            tuning.setdefault(name, []).append(
                {"seed": seed, **{k: probe.summary.get(k) for k in ("lr", "weight_decay", "val_auc", "candidates")}})
            scores, probs = probe.logits(G_test), probe_probabilities(probe, G_test)
            seconds = probe.summary["train_seconds"]
            # Hidden positives are ranked by the calibrated probabilities, as the heads' are.
            runs.setdefault(name, []).append({**self.evaluate(scores, probs, probs), "train_seconds": seconds,
                                              "epochs": probe.summary["epochs_run"]})
            if spec["probe"] == "em":
                runs.setdefault(name + " × co-occurrence", []).append({
                    **self.evaluate(scores, probs, probe.cooccurrence_scores(G_test, self.test.known, probs)),
                    "train_seconds": seconds, "conditioning_only": True})
            if seed == self.seeds[0]:
                self.figures_of(mode, name, scores, probs)

    def heads_runs(self, mode, name, spec, train_set, runs: dict, index: int) -> None:
        """Every seed of a SigRL variant, scored through the predictor the backend serves."""
        from worker.training.train import train_model

        examples, feats, _ = train_set
        model_cfg = self.settings.model.model_copy(update=spec.get("model", {}))
        loss_cfg = self.settings.loss.model_copy(update=spec.get("loss", {}))
        test = self.test
        for seed in self.seeds:
            result = train_model(examples, self.space, feats, self.settings, backbone=self.runtime.backbone,
                                 seed=seed, model_cfg=model_cfg, loss_cfg=loss_cfg, taxonomy=self.taxonomy,
                                 show_progress=self.show_progress)
            keep = name == FULL and seed == self.seeds[0]
            directory = self.out / "models" / mode if keep else self.scratch / f"{mode}-{index}-{seed}"
            predictor = served_predictor(result.model, self.runtime, directory)
            visual, _ = predictor.logits(test.feats, self.space)
            # Hidden positives are ranked as the backend ranks its suggestions: by the served
            # (calibrated) probabilities given the known labels — raw logits of different
            # labels are on different scales, so ranking labels of one image by them is not
            # what an annotator is shown.
            conditional = predictor.probabilities(test.feats, self.space, test.known_names)
            probs = predictor.probabilities(test.feats, self.space)
            seconds = result.summary["train_seconds"]
            runs.setdefault(name, []).append({**self.evaluate(visual, probs, conditional), "train_seconds": seconds,
                                              "epochs": result.summary["epochs_run"]})
            if name == FULL:
                self.full_runs.append((len(examples), seconds, result.summary["train_cpu_seconds"]))
                runs.setdefault(name + ", known labels ignored", []).append(
                    {**self.evaluate(visual, probs, probs), "train_seconds": seconds, "conditioning_only": True})
            if seed == self.seeds[0]:
                self.figures_of(mode, name, visual, probs)
                if keep:
                    self.saved_models[mode] = (result.model, directory)
            if not keep:
                shutil.rmtree(directory, ignore_errors=True)

    def run_mode(self, mode: str, train_set, wanted: set | None, unseen: list[str]) -> dict:
        """Every method on one label setting: ``{"export", "rows", "probe_tuning", "unseen_labels"}``."""
        rows: dict = {}
        tuning: dict = {}
        for name, spec in METHODS:
            if wanted is not None and name not in wanted:
                continue
            log.info("bench %s: %s", mode, name)
            if spec is None:
                zs = self.test.zero_shot
                rows[name] = {**self.evaluate(zs, zs), "train_seconds": 0.0}
                self.figures_of(mode, name, zs, zs)
                continue
            runs: dict[str, list[dict]] = {}
            if "probe" in spec:
                self.probe_runs(mode, name, spec, train_set, runs, tuning)
            else:
                self.heads_runs(mode, name, spec, train_set, runs, len(rows))
            for row_name, row_runs in runs.items():
                rows[row_name] = aggregate(row_runs, self.seeds)
        if mode in self.saved_models:
            (self.saved_models[mode][1] / "metrics.json").write_text(
                json.dumps(rows[FULL], indent=1, default=jsonable))
        unseen_result = None
        if unseen and (wanted is None or FULL in wanted):
            examples, feats, _ = train_set
            unseen_result = unseen_labels_experiment(
                examples, feats, self.classes, unseen, self.test.feats, self.test.y, self.test.zero_shot,
                self.runtime, self.settings, self.taxonomy, self.seeds, self.scratch / f"{mode}-unseen",
                rows.get(FULL), self.show_progress)
        return {"export": train_set[2], "rows": rows, "probe_tuning": tuning, "unseen_labels": unseen_result}

    def timing(self, train_sets: dict) -> dict | None:
        """Training time of the full model on 1 000 images: the bench's own runs when it made
        enough of them, else dedicated ones."""
        thousand = [sec for n, sec, _ in self.full_runs if n == 1000]
        cpu = [c for n, _, c in self.full_runs if n == 1000]
        if len(thousand) >= self.settings.bench.timing_repeats:
            return {"images": 1000, "seconds": [round(x, 2) for x in thousand],
                    "median_seconds": round(statistics.median(thousand), 2),
                    "median_cpu_seconds": round(statistics.median(cpu), 2),
                    "load_average_1m": machine_info().get("load_average_1m"),
                    "source": "the full-model runs of the benchmark"}
        if "partial" in train_sets:
            return time_full_training(train_sets["partial"], self.space, self.settings, self.runtime, self.taxonomy,
                                      self.show_progress)
        return None

    def figures(self, modes: Sequence[str]) -> dict:
        """PR curves, reliability diagrams and the learned label graph (PNG files)."""
        from backend.model.sigrl import label_graph
        from worker.eval.report import gmc_attention, plot_label_graph, plot_pr_curves, plot_reliability

        out, figures = self.out, {}
        for mode in modes:
            if self.curves.get(mode):
                figures[f"pr_{mode}"] = plot_pr_curves(out / f"pr_{mode}.png", self.curves[mode],
                                                       SETTING_TITLES[mode]).name
            if self.calibrations.get(mode):
                figures[f"reliability_{mode}"] = plot_reliability(
                    out / f"reliability_{mode}.png", self.calibrations[mode],
                    f"served probabilities, {SETTING_TITLES[mode]}").name
            if mode in self.saved_models:
                model, _ = self.saved_models[mode]
                graph = label_graph(model.stats, self.classes, self.space.embeddings, model.module.cfg)
                A = gmc_attention(model.module, self.space.embeddings, graph)
                figures[f"graph_{mode}"] = plot_label_graph(out / f"label_graph_{mode}.png", self.classes, A,
                                                            graph.cond).name
        return figures


def aggregate(runs: list[dict], seeds: Sequence[int]) -> dict:
    """Mean of every number over the seeds' runs, with ``<key>_std`` for the headline figures."""
    out: dict = {}
    for key, value in runs[0].items():
        values = [r[key] for r in runs]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            out[key] = value
            continue
        out[key] = round(float(np.mean(values)), 4)
        if key in ("mAP", "F1@3", "hidden_recall@3", "train_seconds") and len(values) > 1:
            out[key + "_std"] = round(float(np.std(values)), 4)
    out["seeds"] = list(seeds)
    return out


def jsonable(value):
    """``json.dumps``' ``default`` for the numbers and paths of a payload."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)
