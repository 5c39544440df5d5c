"""``semlabel bench``: every method on real images, single-positive and partial labels.

1. Builds the Fashion-MNIST outfit mosaics (:mod:`worker.fashion`, structure in
   ``configs/bench/fashion_outfits.yaml``) and writes them as PNG files plus Label Studio
   exports into the output directory: ``train_single.json`` (one positive per image),
   ``train_partial.json`` (each true label kept with probability ``bench.partial_keep``, at
   least one), ``test.json`` (complete labels) and ``label_config.xml``. Image references are
   Label Studio local-storage URLs (``/data/local-files/?d=images/...``).
2. Reads the exports back through :mod:`worker.data` and gets features through the
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
import platform
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from backend.errors import ImageError
from backend.features import Features
from backend.labels import Taxonomy
from backend.settings import Settings, config_dir, get_settings

from .data import examples_from_tasks, read_export
from .fashion import OutfitStructure, build_mosaics, label_config_xml, label_studio_export, partial_labels, write_json
from .metrics import (
    calibration,
    evaluate_scores,
    hide_positives,
    label_subset_map,
    pr_curves,
    selection_metrics,
)
from .train import targets

log = logging.getLogger(__name__)

TABLE_START = "<!-- bench:table:start -->"
TABLE_END = "<!-- bench:table:end -->"
SETTING_TITLES = {"single": "single-positive labels", "partial": "partial labels (each true label kept with p = 0.5)"}

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
FULL = "SigRL (GMC + SVFR)"
PROBE_EM = "linear probe + EM"


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


def served_predictor(model, runtime, directory: Path):
    """The predictor the backend would serve for ``model``: saved, then loaded the way the
    model store loads a version (``backend.model.load_predictor``)."""
    from backend.model.checkpoint import save_model
    from backend.model.serving import load_predictor

    save_model(model, directory)
    return load_predictor(directory, runtime, device="cpu")


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
    from backend.model.decision import preselect
    from backend.runtime import Runtime

    from .baselines import train_linear_probe
    from .report import gmc_attention, plot_label_graph, plot_pr_curves, plot_reliability
    from .train import train_model

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
        out_ = evaluate_scores(scores, y_test, names=classes, ks=(1, 3, 5), conditional_scores=conditional,
                               known=known, hidden=hidden, recall_ks=(1, k), taxonomy=taxonomy)
        out_.update(selection_metrics(probabilities, preselect(probabilities, pre_cfg), y_test,
                                      bins=bench.ece_bins, strategy=bench.ece_binning))
        return out_

    def reliability(probabilities):
        return calibration(probabilities, y_test, bench.ece_bins, bench.ece_binning)

    seeds = list(bench.seeds) or [settings.train.seed]
    results: dict = {}
    curves: dict = {}
    calibrations: dict = {}
    saved_models: dict = {}
    full_runs: list[tuple[int, float, float]] = []  # (training images, wall s, CPU s) of every full-model run
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
                    full_runs.append((len(examples), seconds, result.summary["train_cpu_seconds"]))
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
        thousand = [sec for n, sec, _ in full_runs if n == 1000]
        cpu = [c for n, _, c in full_runs if n == 1000]
        if len(thousand) >= bench.timing_repeats:
            timing_info = {"images": 1000, "seconds": [round(x, 2) for x in thousand],
                           "median_seconds": round(statistics.median(thousand), 2),
                           "median_cpu_seconds": round(statistics.median(cpu), 2),
                           "load_average_1m": _machine().get("load_average_1m"),
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
        "machine": _machine(),
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


def unseen_labels_experiment(examples, feats, classes, unseen, test_feats, y_test, zero_shot, runtime, settings,
                             taxonomy, seeds, scratch: Path, full_row: dict | None, show_progress=None) -> dict:
    """SigRL trained as if ``unseen`` had been added to the project after training: their
    annotations are dropped (images left without a label too), the model is trained on the
    other labels' space, then scores the full label space. AP of the unseen labels against
    the zero-shot AP of the same labels (and the full model's, trained with them)."""
    from .train import train_model

    held = set(unseen)
    idx = [classes.index(c) for c in unseen]
    pairs = [(replace(e, positives=[p for p in e.positives if p not in held]), f) for e, f in zip(examples, feats)]
    pairs = [(e, f) for e, f in pairs if e.positives]
    seen = [c for c in classes if c not in held]
    seen_space = runtime.label_space(seen, taxonomy)
    space = runtime.label_space(classes, taxonomy)
    runs = []
    for seed in seeds:
        result = train_model([e for e, _ in pairs], seen_space, [f for _, f in pairs], settings,
                             backbone=runtime.backbone, seed=seed, taxonomy=taxonomy, show_progress=show_progress)
        predictor = served_predictor(result.model, runtime, scratch / str(seed))
        visual, _ = predictor.logits(test_feats, space)
        runs.append(label_subset_map(visual, y_test, idx))
        shutil.rmtree(scratch / str(seed), ignore_errors=True)
    zs = label_subset_map(zero_shot, y_test, idx)
    per_label = {classes[c]: round(float(np.mean([r["AP"].get(c, float("nan")) for r in runs])), 4) for c in idx}
    out = {
        "labels": list(unseen),
        "train_images": len(pairs),
        "AP": round(float(np.mean([r["mAP"] for r in runs])), 4),
        "AP_std": round(float(np.std([r["mAP"] for r in runs])), 4),
        "AP_per_label": per_label,
        "zero_shot_AP": round(zs["mAP"], 4),
        "zero_shot_AP_per_label": {classes[c]: round(v, 4) for c, v in zs["AP"].items()},
        "seeds": list(seeds),
    }
    out["gain_over_zero_shot"] = round(out["AP"] - out["zero_shot_AP"], 4)
    if full_row and full_row.get("AP_per_label"):
        trained = [full_row["AP_per_label"][c] for c in unseen if c in full_row["AP_per_label"]]
        out["AP_when_trained_with_them"] = round(float(np.mean(trained)), 4) if trained else None
    return out


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


def _machine() -> dict:
    info = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        pass
    return info


def time_full_training(train_set, space, settings, runtime, taxonomy, show_progress=None) -> dict:
    """Median wall time of training the full model on the first 1 000 annotated images."""
    from .train import train_model

    examples, feats, _ = train_set
    n = min(1000, len(examples))
    seconds, epochs = [], []
    for _ in range(settings.bench.timing_repeats):
        result = train_model(examples[:n], space, feats[:n], settings, backbone=runtime.backbone,
                             taxonomy=taxonomy, show_progress=show_progress)
        seconds.append(result.summary["train_seconds"])
        epochs.append(result.summary["epochs_run"])
    return {"images": n, "seconds": [round(s, 2) for s in seconds], "median_seconds": round(statistics.median(seconds), 2),
            "epochs": epochs, "load_average_1m": _machine().get("load_average_1m")}


#: The issue's targets, checked on every run (medians over seeds live in the rows' means).
GOALS = {
    "edit_cost_vs_blank": {"partial": 0.55, "single": 0.80},
    "zero_shot_edit_cost_vs_blank": 1.0,
    "ECE": 0.05,
    "mAP_over_best_linear_baseline": 0.03,
    "hidden_recall@3_partial": 0.90,
    "unseen_AP_over_zero_shot": 0.05,
}
PROBES = ("linear probe + AN-LS", "linear probe + EM")


def acceptance(payload: dict) -> dict:
    out = {}
    for mode, res in payload["results"].items():
        rows = res["rows"]
        checks = {}
        if "zero-shot" in rows:
            value = rows["zero-shot"].get("edit_cost_vs_blank")
            goal = GOALS["zero_shot_edit_cost_vs_blank"]
            checks["zero_shot_edit_cost_vs_blank"] = {"value": value, "goal": goal, "met": _le(value, goal)}
        if FULL in rows:
            full = rows[FULL]
            goal = GOALS["edit_cost_vs_blank"][mode]
            checks["edit_cost_vs_blank"] = {"value": full.get("edit_cost_vs_blank"), "goal": goal,
                                            "met": _le(full.get("edit_cost_vs_blank"), goal)}
            checks["ECE"] = {"value": full.get("ECE"), "goal": GOALS["ECE"], "met": _le(full.get("ECE"), GOALS["ECE"])}
            probes = {n: rows[n]["mAP"] for n in PROBES if n in rows}
            if probes:
                best = max(probes, key=probes.get)
                margin = full["mAP"] - probes[best]
                goal = GOALS["mAP_over_best_linear_baseline"]
                checks["mAP_over_best_linear_baseline"] = {"baseline": best, "margin": round(margin, 4), "goal": goal,
                                                           "met": margin >= goal}
            if "zero-shot" in rows:
                checks["mAP_over_zero_shot"] = {"margin": round(full["mAP"] - rows["zero-shot"]["mAP"], 4)}
            k = payload["settings"]["bench"]["recall_k"]
            key = f"hidden_recall@{k}"
            if mode == "partial":
                cond = full.get(key, float("nan"))
                plain = rows.get(FULL + ", known labels ignored", {}).get(key, float("nan"))
                cooc = rows.get(PROBE_EM + " × co-occurrence", {}).get(key, float("nan"))
                goal = GOALS["hidden_recall@3_partial"]
                checks[key] = {"with_conditioning": cond, "goal": goal, "met": cond >= goal,
                               "without_conditioning": plain, "linear_probe_x_cooccurrence": cooc,
                               "better_than_both": cond > plain and cond > cooc}
        unseen = res.get("unseen_labels")
        if unseen:
            goal = GOALS["unseen_AP_over_zero_shot"]
            checks["unseen_AP_over_zero_shot"] = {"gain": unseen["gain_over_zero_shot"], "goal": goal,
                                                  "met": unseen["gain_over_zero_shot"] >= goal}
        out[mode] = checks
    timing = payload.get("timing_1000")
    if timing:
        out["train_1000_images_seconds"] = {"median": timing["median_seconds"], "goal": 30.0,
                                            "met": timing["median_seconds"] <= 30.0}
    return out


def _le(value, goal) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value)) and value <= goal


def _fmt(value, digits=3):
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def render_markdown(payload: dict) -> dict:
    k = payload["settings"]["bench"]["recall_k"]
    seeds = payload["settings"]["bench"]["seeds"]
    lines = []
    for mode, res in payload["results"].items():
        lines.append(f"\n**{SETTING_TITLES[mode]}** — {payload['data']['train_images']} training images, "
                     f"{payload['data']['test_images']} fully labelled test images; mean (± sd of mAP) over "
                     f"training seeds {', '.join(map(str, seeds))}\n")
        lines.append(f"| method | mAP | micro-F1 | F1@3 | edit cost / task (× blank) | ECE | "
                     f"recall@{k} of hidden positives | train s |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        blank = next((r.get("blank_edit_cost") for r in res["rows"].values() if "blank_edit_cost" in r), None)
        if blank is not None:
            lines.append(f"| *blank task* | | | | {_fmt(blank, 2)} (1.00) | | | |")
        for name, row in res["rows"].items():
            if row.get("conditioning_only"):
                lines.append(f"| *{name}* | | | | | | {_fmt(row.get(f'hidden_recall@{k}'))} | |")
                continue
            std = f" ± {row['mAP_std']:.3f}" if "mAP_std" in row else ""
            cost = f"{_fmt(row.get('edit_cost'), 2)} ({_fmt(row.get('edit_cost_vs_blank'), 2)})"
            lines.append(f"| {name} | {_fmt(row['mAP'])}{std} | {_fmt(row.get('micro-F1'))} | {_fmt(row['F1@3'])} | "
                         f"{cost} | {_fmt(row.get('ECE'))} | {_fmt(row.get(f'hidden_recall@{k}'))} | "
                         f"{_fmt(row.get('train_seconds'), 1)} |")
        unseen = res.get("unseen_labels")
        if unseen:
            per = ", ".join(f"{n} {unseen['AP_per_label'][n]:.3f} vs {unseen['zero_shot_AP_per_label'].get(n, float('nan')):.3f}"
                            for n in unseen["labels"])
            with_them = unseen.get("AP_when_trained_with_them")
            lines.append(f"\nUnseen labels ({', '.join(unseen['labels'])} held out of training, SigRL on the "
                         f"other labels, {unseen['train_images']} images): AP {unseen['AP']:.3f} ± {unseen['AP_std']:.3f} "
                         f"vs zero-shot {unseen['zero_shot_AP']:.3f} ({per})"
                         + (f"; trained with them {with_them:.3f}" if with_them is not None else "") + ".")
        tuned = res.get("probe_tuning") or {}
        if tuned:
            lines.append("\nLinear probes tuned per seed on the validation split of the training export (lr, weight "
                         "decay chosen: " + "; ".join(
                             f"{n}: " + ", ".join(f"{t['lr']:g}/{t['weight_decay']:g}" for t in runs_)
                             for n, runs_ in tuned.items()) + ").")
    timing = payload.get("timing_1000")
    dec = payload["decision"]
    foot = (f"\nEdit cost: label toggles from the pre-selection to the truth, the pre-selection being the backend's "
            f"own rule (`{dec['rule']}`: the fewest expected toggles, wrong tick {dec['wrong_tick_cost']:g}, missed "
            f"tick {dec['missed_tick_cost']:g}) on each method's served probabilities; a blank task costs its number "
            f"of labels. micro-F1 of that pre-selection (overall F1 of the multi-label literature); ECE over all "
            f"(image, label) pairs, {payload['calibration_bins']['bins']} "
            f"{payload['calibration_bins']['strategy'].replace('_', '-')} bins. Linear probes on the "
            f"{payload['probe_features']} features.\n"
            f"\nBackbone `{payload['backbone']}` (class_temperature {payload['class_temperature']:g}), "
            f"features from the FeatureStore ({payload['features']['computed']} computed, "
            f"{payload['features']['cached']} cached). Bench wall time {payload['seconds']['wall']:.0f} s "
            f"on {payload['machine']['cpu_count']} CPU cores (features {payload['seconds']['features']:.0f} s).")
    if timing:
        foot += (f" Training the full model on {timing['images']} annotated images: median "
                 f"{timing['median_seconds']:.1f} s over {len(timing['seconds'])} runs ({', '.join(f'{s:.1f}' for s in timing['seconds'])} s)"
                 + (f", {timing['median_cpu_seconds']:.1f} CPU s" if "median_cpu_seconds" in timing else "")
                 + f", {payload['machine']['torch_threads']} torch thread(s), load average "
                 f"{timing.get('load_average_1m')}.")
    table = "\n".join(lines) + "\n" + foot + "\n"
    acc = payload["acceptance"]
    report = (
        "# semlabel benchmark: Fashion-MNIST outfit mosaics\n\n"
        f"Command: `{payload['command']}`\n\n{table}\n"
        "## Acceptance checks\n\n```json\n" + json.dumps(acc, indent=1) + "\n```\n\n"
        "## All figures\n\n"
    )
    cols = [("method", "name"), ("mAP", "mAP"), ("micro-F1", "micro-F1"), ("macro-F1", "macro-F1"),
            ("F1@3", "F1@3"), ("F1@5", "F1@5"), ("P@3", "P@3"), ("R@3", "R@3"),
            ("edit cost", "edit_cost"), ("× blank", "edit_cost_vs_blank"), ("ticked/task", "selected_per_task"),
            ("ECE", "ECE"), ("recall@1 hidden", "hidden_recall@1"), (f"recall@{k} hidden", f"hidden_recall@{k}"),
            ("mistake severity", "mistake_severity"), ("hier. dist@3", "hier_dist@3"), ("epochs", "epochs")]
    from .report import metrics_table

    for mode, res in payload["results"].items():
        rows = [{"name": n, **r} for n, r in res["rows"].items()]
        report += f"### {SETTING_TITLES[mode]}\n\n" + metrics_table(rows, cols) + "\n\n"
        for key, title in (("pr", "PR curves"), ("reliability", "reliability diagram"), ("graph", "learned label graph")):
            if f"{key}_{mode}" in payload["figures"]:
                report += f"![{title}, {mode}]({payload['figures'][f'{key}_{mode}']})\n\n"
        if res.get("probe_tuning"):
            report += "Probe tuning (validation split of the training export):\n\n```json\n" + \
                json.dumps(res["probe_tuning"], indent=1) + "\n```\n\n"
    return {"table": table, "report": report}


def readme_path() -> Path | None:
    candidate = Path(__file__).resolve().parent.parent / "README.md"
    return candidate if candidate.is_file() else None


def insert_readme_table(table: str, path: Path | None = None) -> bool:
    """Replace the text between the bench table markers of README.md (model section)."""
    path = path or readme_path()
    if path is None:
        return False
    text = path.read_text(encoding="utf-8")
    if TABLE_START not in text or TABLE_END not in text:
        log.warning("README.md has no %s … %s markers; table not inserted", TABLE_START, TABLE_END)
        return False
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    path.write_text(head + TABLE_START + "\n" + table.strip() + "\n" + TABLE_END + tail, encoding="utf-8")
    return True
