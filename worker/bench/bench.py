"""``semlabel bench``: every method on real images, single-positive and partial labels.

1. Builds the Fashion-MNIST outfit mosaics (:mod:`worker.bench.fashion`, structure in
   ``configs/bench/fashion_outfits.yaml``) and writes them as PNG files plus Label Studio
   exports into the output directory: ``train_single.json`` (one positive per image),
   ``train_partial.json`` (each true label kept with probability ``bench.partial_keep``, at
   least one), ``test.json`` (complete labels) and ``label_config.xml``. Image references are
   Label Studio local-storage URLs (``/data/local-files/?d=images/...``).
2. Reads the exports back through :mod:`worker.training.data` and gets features through the
   FeatureStore (cached: a second run computes nothing), with the packaged backbone at
   ``bench.class_temperature``.
3. Trains, per label setting: zero-shot (no training), linear probe + AN-LS, linear probe +
   EM (on the backbone's pooled native features of the whole image when the backbone gives
   them; learning rate and weight decay chosen from ``bench.probe_lr`` × ``bench.probe_weight_decay`` on the validation split
   carved from the training export, never the test images), GMC only, SVFR only, SigRL
   (GMC + SVFR), SigRL + semantic loss (taxonomy ``configs/bench/fashion_taxonomy.yaml``) —
   over the seeds ``bench.seeds`` — and evaluates them on the fully labelled test images.
   Ranking: mAP, F1@3, recall@3 of hidden positives (known labels given), P/R@k, F1@5,
   mistake severity, hierarchical distance. What an annotator sees: each trained SigRL model
   is saved and loaded the way the model store serves it, its served probabilities go through
   the backend's own decision rule (:func:`backend.model.decision.preselect`), and the
   pre-selection is scored by edit cost per task (against a blank task's), micro-/macro-F1;
   the probabilities by expected calibration error (reliability diagram). Conditioning is
   checked against the same model ignoring the known labels and against the linear probe
   re-weighted by raw co-occurrence.
4. Unseen labels: SigRL trained without ``bench.unseen_labels`` (their annotations dropped),
   then scoring them — AP against the zero-shot AP of the same labels.
5. Times the training of the full model on 1 000 annotated images (median of
   ``bench.timing_repeats`` runs).
6. Writes ``bench.json``, ``bench.md`` (PR curves, reliability diagrams, the learned label
   graph) and, when asked, the table into README.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from backend.errors import ImageError
from backend.features import Features
from backend.labels import Taxonomy
from backend.settings import Settings, config_dir, get_settings

from worker.eval.evaluate import evaluate_outputs
from worker.eval.metrics import calibration, hide_positives, pr_curves
from worker.training.data import examples_from_tasks, read_export, targets

from .experiments import machine_info, served_predictor, time_full_training, unseen_labels_experiment
from .fashion import OutfitStructure, build_mosaics, label_config_xml, label_studio_export, partial_labels, write_json
from .summary import FULL, SETTING_TITLES, acceptance, insert_readme_table, render_markdown

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


def bench_settings(settings: Settings) -> Settings:
    """The settings with the benchmark's backbone: packaged, at ``bench.class_temperature``."""
    s = settings.model_copy(deep=True)
    s.backbone.kind = "packaged"
    s.backbone.packaged.class_temperature = settings.bench.class_temperature
    return s


def _local_files_url(rel: str) -> str:
    return f"/data/local-files/?d={rel}"


def build_data(out: Path, settings: Settings, train_images: int, test_images: int) -> dict:
    bench = settings.bench
    structure = OutfitStructure.from_yaml(config_dir() / bench.outfits)
    images = out / "images"
    train = build_mosaics(structure, "train", train_images, images, seed=bench.seed)
    test = build_mosaics(structure, "test", test_images, images, seed=bench.seed + 1)
    rel = lambda paths: [_local_files_url(f"images/{p.name}") for p in paths]  # noqa: E731
    exports = {
        "single": partial_labels(train.labels, "single", np.random.default_rng(bench.seed + 2)),
        "partial": partial_labels(train.labels, "partial", np.random.default_rng(bench.seed + 3), bench.partial_keep),
    }
    for mode, labels in exports.items():
        write_json(out / f"train_{mode}.json", label_studio_export(rel(train.paths), labels))
    write_json(out / "test.json", label_studio_export(rel(test.paths), test.labels, first_id=100_000))
    (out / "label_config.xml").write_text(label_config_xml(structure.classes))
    return {"classes": structure.classes, "train_styles": train.styles, "train_full": train.labels}


def encode(examples, runtime, progress=None):
    """(kept examples with ``key`` set, their whole :class:`Features` — native and text-aligned
    parts together —, image errors), from the FeatureStore."""
    feats = runtime.features_for([e.image for e in examples], [e.task_id for e in examples], progress=progress)
    errors = [f for f in feats if isinstance(f, ImageError)]
    pairs = [(e, f) for e, f in zip(examples, feats) if not isinstance(f, ImageError)]
    for example, f in pairs:
        example.key = f.key
    if errors:
        log.warning("%d of %d images could not be used (first: %s)", len(errors), len(examples), errors[0])
    return [e for e, _ in pairs], [f for _, f in pairs], errors


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


def run_bench(
    out_dir: str | os.PathLike,
    *,
    train_images: int | None = None,
    test_images: int | None = None,
    modes: Sequence[str] = ("single", "partial"),
    update_readme: bool = True,
    settings: Settings | None = None,
    methods: Sequence[str] | None = None,
    timing: bool = True,
    show_progress: bool | None = None,
) -> dict:
    from backend.runtime import Runtime

    from worker.training.baselines import train_linear_probe
    from worker.eval.report import gmc_attention, plot_label_graph, plot_pr_curves, plot_reliability
    from worker.training.train import train_model

    t_start = time.perf_counter()
    base = settings or get_settings()
    settings = bench_settings(base)
    bench = settings.bench
    pre_cfg = settings.backend.preannotation
    n_train = train_images or bench.train_images
    n_test = test_images or bench.test_images
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for mode in modes:
        if mode not in SETTING_TITLES:
            raise ValueError(f"unknown label setting {mode!r} (single, partial)")

    t0 = time.perf_counter()
    data = build_data(out, settings, n_train, n_test)
    classes = data["classes"]
    taxonomy = Taxonomy.from_yaml(config_dir() / bench.taxonomy)
    data_seconds = time.perf_counter() - t0
    unseen = [c for c in bench.unseen_labels if c in classes]
    if len(unseen) != len(bench.unseen_labels):
        raise ValueError(f"bench.unseen_labels {bench.unseen_labels} are not all benchmark labels {classes}")
    unseen_idx = [classes.index(c) for c in unseen]

    runtime = Runtime.create(settings, backbone_kind="packaged")
    space = runtime.label_space(classes, taxonomy)
    t0 = time.perf_counter()
    test_examples, _ = examples_from_tasks(read_export(out / "test.json"), classes, images_root=out)
    test_examples, test_feats, test_errors = encode(test_examples, runtime, show_progress)
    train_sets = {}
    for mode in modes:
        examples, report = examples_from_tasks(read_export(out / f"train_{mode}.json"), classes, images_root=out)
        examples, feats, errors = encode(examples, runtime, show_progress)
        train_sets[mode] = (examples, feats, report.to_dict())
    feature_seconds = time.perf_counter() - t0
    feature_counts = {"computed": runtime.features.computed, "cached": runtime.features.hits}
    G_test, probe_features = pooled(test_feats)

    y_test = targets([e.positives for e in test_examples], classes)
    known, hidden = hide_positives(y_test, bench.hidden_seed)
    known_names = [[classes[j] for j in row.nonzero().flatten().tolist()] for row in known]
    zero_shot = runtime.zero_shot_predictor().probabilities(test_feats, space)
    wanted = set(methods) if methods else None
    k = bench.recall_k

    def evaluate(scores, probabilities, conditional=None):
        """Ranking figures of ``scores``, and what an annotator sees of the backend's decision
        rule applied to the served ``probabilities``."""
        return evaluate_outputs(scores, y_test, classes, probabilities=probabilities, conditional=conditional,
                                known=known, hidden=hidden, recall_ks=(1, k), taxonomy=taxonomy,
                                preannotation=pre_cfg, ece_bins=bench.ece_bins, ece_binning=bench.ece_binning)

    def reliability(probabilities):
        return calibration(probabilities, y_test, bench.ece_bins, bench.ece_binning)

    seeds = list(bench.seeds) or [settings.train.seed]
    results: dict = {}
    curves: dict = {}
    calibrations: dict = {}
    saved_models: dict = {}
    full_runs: list[tuple[int, float]] = []  # (training images, seconds) of every full-model run
    scratch = out / "models" / "runs"
    for mode in modes:
        examples, feats, export_report = train_sets[mode]
        label_sets = [e.positives for e in examples]
        G_train, _ = pooled(feats)
        rows: dict = {}
        tuning: dict = {}
        curves[mode], calibrations[mode] = {}, {}
        for name, spec in METHODS:
            if wanted is not None and name not in wanted:
                continue
            log.info("bench %s: %s", mode, name)
            if spec is None:
                rows[name] = {**evaluate(zero_shot, zero_shot), "train_seconds": 0.0}
                curves[mode][name] = pr_curves(zero_shot, y_test, classes)
                calibrations[mode][name] = reliability(zero_shot)
                continue
            loss_cfg = settings.loss.model_copy(update=spec.get("loss", {}))
            runs: dict[str, list[dict]] = {}
            for seed in seeds:
                if "probe" in spec:
                    # Tuned on the validation split the probe carves from the training export
                    # (as the heads' model selection; never the test images), calibrated there.
                    probe = train_linear_probe(label_sets, classes, G_train,
                                               settings.loss.model_copy(update={"kind": spec["probe"]}),
                                               settings.train, seed, show_progress=show_progress,
                                               grid=probe_grid(settings), calibration_cfg=settings.calibration)
                    tuning.setdefault(name, []).append(
                        {"seed": seed, **{k: probe.summary.get(k) for k in ("lr", "weight_decay", "val_auc", "candidates")}})
                    scores = probe.logits(G_test)
                    probs = probe_probabilities(probe, G_test)
                    seconds, epochs = probe.summary["train_seconds"], probe.summary["epochs_run"]
                    runs.setdefault(name, []).append({**evaluate(scores, probs), "train_seconds": seconds,
                                                      "epochs": epochs})
                    if spec["probe"] == "em":
                        runs.setdefault(name + " × co-occurrence", []).append({
                            **evaluate(scores, probs, probe.cooccurrence_scores(G_test, known)),
                            "train_seconds": seconds, "conditioning_only": True})
                    if seed == seeds[0]:
                        curves[mode][name] = pr_curves(scores, y_test, classes)
                        calibrations[mode][name] = reliability(probs)
                    continue
                model_cfg = settings.model.model_copy(update=spec.get("model", {}))
                result = train_model(examples, space, feats, settings, backbone=runtime.backbone, seed=seed,
                                     model_cfg=model_cfg, loss_cfg=loss_cfg, taxonomy=taxonomy,
                                     show_progress=show_progress)
                keep = name == FULL and seed == seeds[0]
                directory = out / "models" / mode if keep else scratch / f"{mode}-{len(rows)}-{seed}"
                predictor = served_predictor(result.model, runtime, directory)
                visual, _ = predictor.logits(test_feats, space)
                _, conditional = predictor.logits(test_feats, space, known_names)
                probs = predictor.probabilities(test_feats, space)
                seconds = result.summary["train_seconds"]
                runs.setdefault(name, []).append({**evaluate(visual, probs, conditional), "train_seconds": seconds,
                                                  "epochs": result.summary["epochs_run"]})
                if name == FULL:
                    full_runs.append((len(examples), seconds))
                    runs.setdefault(name + ", known labels ignored", []).append(
                        {**evaluate(visual, probs), "train_seconds": seconds, "conditioning_only": True})
                if seed == seeds[0]:
                    curves[mode][name] = pr_curves(visual, y_test, classes)
                    calibrations[mode][name] = reliability(probs)
                    if keep:
                        saved_models[mode] = (result.model, directory)
                if not keep:
                    shutil.rmtree(directory, ignore_errors=True)
            for row_name, row_runs in runs.items():
                rows[row_name] = aggregate(row_runs, seeds)
        if mode in saved_models:
            (saved_models[mode][1] / "metrics.json").write_text(json.dumps(rows[FULL], indent=1, default=_jsonable))
        unseen_result = None
        if unseen and (wanted is None or FULL in wanted):
            unseen_result = unseen_labels_experiment(examples, feats, classes, unseen, test_feats, y_test, zero_shot,
                                                     runtime, settings, taxonomy, seeds, scratch / f"{mode}-unseen",
                                                     rows.get(FULL), show_progress)
        results[mode] = {"export": export_report, "rows": rows, "probe_tuning": tuning, "unseen_labels": unseen_result}
    shutil.rmtree(scratch, ignore_errors=True)

    timing_info = None
    if timing:
        thousand = [sec for n, sec in full_runs if n == 1000]
        if len(thousand) >= bench.timing_repeats:
            timing_info = {"images": 1000, "seconds": [round(x, 2) for x in thousand],
                           "median_seconds": round(statistics.median(thousand), 2),
                           "load_average_1m": machine_info().get("load_average_1m"),
                           "source": "the full-model runs of the benchmark"}
        elif "partial" in train_sets:
            timing_info = time_full_training(train_sets["partial"], space, settings, runtime, taxonomy, show_progress)

    figures = {}
    for mode in modes:
        if curves.get(mode):
            figures[f"pr_{mode}"] = plot_pr_curves(out / f"pr_{mode}.png", curves[mode], SETTING_TITLES[mode]).name
        if calibrations.get(mode):
            figures[f"reliability_{mode}"] = plot_reliability(
                out / f"reliability_{mode}.png", calibrations[mode],
                f"served probabilities, {SETTING_TITLES[mode]}").name
        if mode in saved_models:
            model, _ = saved_models[mode]
            from backend.model.sigrl import label_graph

            graph = label_graph(model.stats, classes, space.embeddings, model.module.cfg)
            A = gmc_attention(model.module, space.embeddings, graph)
            figures[f"graph_{mode}"] = plot_label_graph(out / f"label_graph_{mode}.png", classes, A, graph.cond).name

    wall = time.perf_counter() - t_start
    payload = {
        "command": "semlabel bench" + (f" --train-images {n_train}" if train_images else "")
                   + (f" --test-images {n_test}" if test_images else ""),
        "data": {
            "source": "Fashion-MNIST idx files (Debian dataset-fashion-mnist)",
            "train_images": len(train_sets[modes[0]][0]) if modes else 0,
            "test_images": len(test_examples),
            "labels": classes,
            "mean_labels_per_test_image": round(float(y_test.sum(1).mean()), 3),
            "hidden_positive_images": int((hidden.sum(1) > 0).sum()),
            "image_errors": len(test_errors),
            "unseen_labels": unseen,
        },
        "backbone": runtime.backbone.name,
        "backbone_fingerprint": runtime.backbone.fingerprint,
        "class_temperature": bench.class_temperature,
        "probe_features": probe_features,
        "decision": {"rule": "backend.model.decision.preselect", **pre_cfg.model_dump()},
        "calibration_bins": {"bins": bench.ece_bins, "strategy": bench.ece_binning},
        "calibration": calibrations,
        "features": feature_counts,
        "seconds": {"data": round(data_seconds, 1), "features": round(feature_seconds, 1), "wall": round(wall, 1)},
        "machine": machine_info(),
        "settings": {"model": settings.model.model_dump(), "loss": settings.loss.model_dump(),
                     "train": settings.train.model_dump(), "bench": bench.model_dump()},
        "results": results,
        "timing_1000": timing_info,
        "figures": figures,
    }
    payload["acceptance"] = acceptance(payload)
    markdown = render_markdown(payload)
    (out / "bench.json").write_text(json.dumps(payload, indent=1, default=_jsonable))
    (out / "bench.md").write_text(markdown["report"])
    if update_readme:
        insert_readme_table(markdown["table"])
    payload["markdown"] = markdown["table"]
    return payload


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


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)
