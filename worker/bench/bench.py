"""``semlabel bench``: every method on real images, single-positive and partial labels.

1. Builds the Fashion-MNIST outfit mosaics (:mod:`worker.bench.fashion`, structure in
   ``configs/bench/fashion_outfits.yaml``) and writes them as PNG files plus Label Studio
   exports into the output directory: ``train_single.json`` (one positive per image),
   ``train_partial.json`` (each true label kept with probability ``bench.partial_keep``, at
   least one), ``test.json`` (complete labels; with ``--split validation`` ``validation.json``
   instead: complete-label mosaics of training-file items no training mosaic uses) and
   ``label_config.xml``. Image references are Label Studio local-storage URLs
   (``/data/local-files/?d=images/...``).
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
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from backend.labels import Taxonomy
from backend.settings import Settings, config_dir, get_settings
from worker.eval.metrics import hide_positives
from worker.training.data import examples_from_tasks, read_export, targets, usable_features

from .experiments import machine_info
from .fashion import OutfitStructure, build_mosaics, label_config_xml, label_studio_export, partial_labels, write_json
from .methods import MethodRuns, TestSet, jsonable, pooled
from .summary import SETTING_TITLES, acceptance, insert_readme_table, render_markdown

log = logging.getLogger(__name__)

def bench_settings(settings: Settings) -> Settings:
    """The settings with the benchmark's backbone: packaged, at ``bench.class_temperature``."""
    s = settings.model_copy(deep=True)
    s.backbone.kind = "packaged"
    s.backbone.packaged.class_temperature = settings.bench.class_temperature
    return s


def _local_files_url(rel: str) -> str:
    return f"/data/local-files/?d={rel}"


#: ``--split``: where the complete-label evaluation images come from — (Fashion-MNIST file,
#: image folder under the output directory, export name)
EVAL_SPLITS = {"test": ("test", "images", "test.json"),
               "validation": ("train", "images/validation", "validation.json")}


def build_data(out: Path, settings: Settings, train_images: int, test_images: int, split: str = "test") -> dict:
    """The training mosaics and exports, and the complete-label evaluation images of ``split``:
    ``test`` (the test file's items) or ``validation`` (the training file's items that no
    training mosaic uses, mosaic seed ``bench.validation_seed``; for choosing defaults without
    the test images)."""
    bench = settings.bench
    structure = OutfitStructure.from_yaml(config_dir() / bench.outfits)
    images = out / "images"
    train = build_mosaics(structure, "train", train_images, images, seed=bench.seed)
    source, folder, export = EVAL_SPLITS[split]
    if split == "test":
        test = build_mosaics(structure, source, test_images, out / folder, seed=bench.seed + 1)
    else:
        test = build_mosaics(structure, source, test_images, out / folder, seed=bench.validation_seed,
                             exclude_items=[j for items in train.items for j in items])
    rel = lambda paths, folder="images": [_local_files_url(f"{folder}/{p.name}") for p in paths]  # noqa: E731
    exports = {
        "single": partial_labels(train.labels, "single", np.random.default_rng(bench.seed + 2)),
        "partial": partial_labels(train.labels, "partial", np.random.default_rng(bench.seed + 3), bench.partial_keep),
    }
    for mode, labels in exports.items():
        write_json(out / f"train_{mode}.json", label_studio_export(rel(train.paths), labels))
    write_json(out / export, label_studio_export(rel(test.paths, folder), test.labels, first_id=100_000))
    (out / "label_config.xml").write_text(label_config_xml(structure.classes))
    return {"classes": structure.classes, "train_styles": train.styles, "train_full": train.labels}


def _test_set(out: Path, classes, runtime, space, hidden_seed: int, show_progress, split: str = "test") -> TestSet:
    examples, _ = examples_from_tasks(read_export(out / EVAL_SPLITS[split][2]), classes, images_root=out)
    examples, feats, errors = usable_features(examples, runtime, show_progress)
    y = targets([e.positives for e in examples], classes)
    known, hidden = hide_positives(y, hidden_seed)
    known_names = [[classes[j] for j in row.nonzero().flatten().tolist()] for row in known]
    G, _ = pooled(feats)
    zero_shot = runtime.zero_shot_predictor().probabilities(feats, space)
    return TestSet(examples, feats, errors, y, known, hidden, known_names, G, zero_shot)


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
    split: str = "test",
) -> dict:
    """The benchmark (module docstring); returns the payload of ``bench.json`` plus the
    markdown table under ``"markdown"``. ``split``: the complete-label images every method is
    scored on (:data:`EVAL_SPLITS`; ``validation`` never updates the README table)."""
    from backend.runtime import Runtime

    t_start = time.perf_counter()
    settings = bench_settings(settings or get_settings())
    bench = settings.bench
    n_train, n_test = train_images or bench.train_images, test_images or bench.test_images
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for mode in modes:
        if mode not in SETTING_TITLES:
            raise ValueError(f"unknown label setting {mode!r} (single, partial)")
    if split not in EVAL_SPLITS:
        raise ValueError(f"unknown split {split!r} ({', '.join(EVAL_SPLITS)})")
    t0 = time.perf_counter()
    classes = build_data(out, settings, n_train, n_test, split)["classes"]
    taxonomy = Taxonomy.from_yaml(config_dir() / bench.taxonomy)
    data_seconds = time.perf_counter() - t0
    unseen = [c for c in bench.unseen_labels if c in classes]
    if len(unseen) != len(bench.unseen_labels):
        raise ValueError(f"bench.unseen_labels {bench.unseen_labels} are not all benchmark labels {classes}")
    runtime = Runtime.create(settings, backbone_kind="packaged")
    space = runtime.label_space(classes, taxonomy)
    t0 = time.perf_counter()
    test = _test_set(out, classes, runtime, space, bench.hidden_seed, show_progress, split)
    train_sets = {}
    for mode in modes:
        examples, report = examples_from_tasks(read_export(out / f"train_{mode}.json"), classes, images_root=out)
        examples, feats, _ = usable_features(examples, runtime, show_progress)
        train_sets[mode] = (examples, feats, report.to_dict())
    seconds = {"data": round(data_seconds, 1), "features": round(time.perf_counter() - t0, 1)}
    run = MethodRuns(settings, out, classes, taxonomy, runtime, space, test, list(bench.seeds) or [settings.train.seed],
                 show_progress)
    wanted = set(methods) if methods else None
    results = {mode: run.run_mode(mode, train_sets[mode], wanted, unseen) for mode in modes}
    shutil.rmtree(run.scratch, ignore_errors=True)
    timing_info = run.timing(train_sets) if timing else None
    figures = run.figures(modes)
    seconds["wall"] = round(time.perf_counter() - t_start, 1)
    payload = {
        "command": "semlabel bench" + (f" --train-images {n_train}" if train_images else "")
                   + (f" --test-images {n_test}" if test_images else "")
                   + (f" --split {split}" if split != "test" else ""),
        "data": {
            "source": "Fashion-MNIST idx files (Debian dataset-fashion-mnist)",
            "train_images": len(train_sets[modes[0]][0]) if modes else 0,
            "test_images": len(test.examples),
            "split": split,
            "labels": classes,
            "mean_labels_per_test_image": round(float(test.y.sum(1).mean()), 3),
            "hidden_positive_images": int((test.hidden.sum(1) > 0).sum()),
            "image_errors": len(test.errors),
            "unseen_labels": unseen,
        },
        "backbone": runtime.backbone.name,
        "backbone_fingerprint": runtime.backbone.fingerprint,
        "class_temperature": bench.class_temperature,
        "probe_features": pooled(test.feats)[1],
        "decision": {"rule": "backend.model.decision.preselect", **settings.backend.preannotation.model_dump()},
        "calibration_bins": {"bins": bench.ece_bins, "strategy": bench.ece_binning},
        "calibration": run.calibrations,
        "features": {"computed": runtime.features.computed, "cached": runtime.features.hits},
        "seconds": seconds,
        "machine": machine_info(),
        "settings": {"model": settings.model.model_dump(), "loss": settings.loss.model_dump(),
                     "train": settings.train.model_dump(), "bench": bench.model_dump()},
        "results": results,
        "timing_1000": timing_info,
        "figures": figures,
    }
    return _write_reports(out, payload, update_readme and split == "test")


def _write_reports(out: Path, payload: dict, update_readme: bool) -> dict:
    """``bench.json``, ``bench.md`` and (when asked) the README table, from the payload."""
    payload["acceptance"] = acceptance(payload)
    markdown = render_markdown(payload)
    (out / "bench.json").write_text(json.dumps(payload, indent=1, default=jsonable))
    (out / "bench.md").write_text(markdown["report"])
    if update_readme:
        insert_readme_table(markdown["table"])
    payload["markdown"] = markdown["table"]
    return payload
