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
   EM, GMC only, SVFR only, SigRL (GMC + SVFR), SigRL + semantic loss (taxonomy
   ``configs/bench/fashion_taxonomy.yaml``) — the same seed, optimiser and early stopping for
   all — and evaluates them on the fully labelled test images: mAP, F1@3, recall@3 of hidden
   positives (known labels given), plus P/R@k, F1@5, mistake severity, hierarchical distance.
   Conditioning is checked against the same model ignoring the known labels and against the
   linear probe re-weighted by raw co-occurrence.
4. Times the training of the full model on 1 000 annotated images (median of
   ``bench.timing_repeats`` runs).
5. Writes ``bench.json``, ``bench.md`` (with PR curves and the learned label graph) and, when
   asked, the table into README.md.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from backend.features import Features
from backend.labels import Taxonomy
from backend.settings import Settings, config_dir, get_settings

from .data import attach_features, examples_from_tasks, read_export
from .fashion import OutfitStructure, build_mosaics, label_config_xml, label_studio_export, partial_labels, write_json
from .metrics import evaluate_scores, hide_positives, pr_curves
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


def _probe_scores(probe, G):
    return probe.logits(G)


def _sigrl_scores(model, space, G, L, known=None):
    from backend.model.sigrl import label_graph

    module = model.module.eval()
    graph = label_graph(model.stats, space.names, space.embeddings, module.cfg)
    out_v, out_c = [], []
    with torch.no_grad():
        for s in range(0, G.shape[0], 256):
            res = module(G[s : s + 256], L[s : s + 256], space.embeddings, graph,
                         known[s : s + 256] if known is not None else None)
            out_v.append(res.visual_logits)
            out_c.append(res.logits)
    return torch.cat(out_v), torch.cat(out_c)


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
    from backend.model.checkpoint import save_model
    from backend.runtime import Runtime

    from .baselines import train_linear_probe
    from .report import gmc_attention, plot_label_graph, plot_pr_curves
    from .train import train_model

    t_start = time.perf_counter()
    base = settings or get_settings()
    settings = bench_settings(base)
    bench = settings.bench
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

    runtime = Runtime.create(settings, backbone_kind="packaged")
    space = runtime.label_space(classes, taxonomy)
    t0 = time.perf_counter()
    test_examples, _ = examples_from_tasks(read_export(out / "test.json"), classes, images_root=out)
    test_examples, Gt, Lt, test_errors = attach_features(test_examples, runtime, progress=show_progress)
    train_sets = {}
    for mode in modes:
        examples, report = examples_from_tasks(read_export(out / f"train_{mode}.json"), classes, images_root=out)
        examples, G, L, errors = attach_features(examples, runtime, progress=show_progress)
        train_sets[mode] = (examples, G, L, report.to_dict())
    feature_seconds = time.perf_counter() - t0
    feature_counts = {"computed": runtime.features.computed, "cached": runtime.features.hits}

    y_test = targets([e.positives for e in test_examples], classes)
    known, hidden = hide_positives(y_test, bench.hidden_seed)
    test_features = [Features(e.key or "", g, l) for e, g, l in zip(test_examples, Gt, Lt)]
    zero_shot = runtime.zero_shot_predictor().probabilities(test_features, space)
    wanted = set(methods) if methods else None
    k = bench.recall_k

    def evaluate(visual, conditional=None):
        return evaluate_scores(visual, y_test, names=classes, ks=(1, 3, 5), conditional_scores=conditional,
                               known=known, hidden=hidden, recall_ks=(1, k), taxonomy=taxonomy)

    seeds = list(bench.seeds) or [settings.train.seed]
    results: dict = {}
    curves: dict = {}
    saved_models: dict = {}
    full_runs: list[tuple[int, float]] = []  # (training images, seconds) of every full-model run
    for mode in modes:
        examples, G, L, export_report = train_sets[mode]
        label_sets = [e.positives for e in examples]
        rows: dict = {}
        curves[mode] = {}
        for name, spec in METHODS:
            if wanted is not None and name not in wanted:
                continue
            log.info("bench %s: %s", mode, name)
            if spec is None:
                rows[name] = {**evaluate(zero_shot), "train_seconds": 0.0}
                curves[mode][name] = pr_curves(zero_shot, y_test, classes)
                continue
            loss_cfg = settings.loss.model_copy(update=spec.get("loss", {}))
            runs: dict[str, list[dict]] = {}
            for seed in seeds:
                if "probe" in spec:
                    probe = train_linear_probe(label_sets, classes, G,
                                               settings.loss.model_copy(update={"kind": spec["probe"]}),
                                               settings.train, seed, show_progress=show_progress)
                    scores = probe.logits(Gt)
                    seconds, epochs = probe.summary["train_seconds"], probe.summary["epochs_run"]
                    runs.setdefault(name, []).append({**evaluate(scores), "train_seconds": seconds, "epochs": epochs})
                    if spec["probe"] == "em":
                        runs.setdefault(name + " × co-occurrence", []).append({
                            **evaluate(scores, probe.cooccurrence_scores(Gt, known)),
                            "train_seconds": seconds, "conditioning_only": True})
                    if seed == seeds[0]:
                        curves[mode][name] = pr_curves(scores, y_test, classes)
                    continue
                model_cfg = settings.model.model_copy(update=spec.get("model", {}))
                result = train_model(examples, space, (G, L), settings, backbone=runtime.backbone, seed=seed,
                                     model_cfg=model_cfg, loss_cfg=loss_cfg, taxonomy=taxonomy,
                                     show_progress=show_progress)
                visual, conditional = _sigrl_scores(result.model, space, Gt, Lt, known)
                seconds = result.summary["train_seconds"]
                runs.setdefault(name, []).append({**evaluate(visual, conditional), "train_seconds": seconds,
                                                  "epochs": result.summary["epochs_run"]})
                if name == FULL:
                    full_runs.append((len(examples), seconds))
                    runs.setdefault(name + ", known labels ignored", []).append(
                        {**evaluate(visual), "train_seconds": seconds, "conditioning_only": True})
                if seed == seeds[0]:
                    curves[mode][name] = pr_curves(visual, y_test, classes)
                    if name == FULL:
                        saved_models[mode] = (result.model, save_model(result.model, out / "models" / mode))
            for row_name, row_runs in runs.items():
                rows[row_name] = aggregate(row_runs, seeds)
        if mode in saved_models:
            (saved_models[mode][1] / "metrics.json").write_text(json.dumps(rows[FULL], indent=1))
        results[mode] = {"export": export_report, "rows": rows}

    timing_info = None
    if timing:
        thousand = [sec for n, sec in full_runs if n == 1000]
        if len(thousand) >= bench.timing_repeats:
            timing_info = {"images": 1000, "seconds": [round(x, 2) for x in thousand],
                           "median_seconds": round(statistics.median(thousand), 2),
                           "load_average_1m": _machine().get("load_average_1m"),
                           "source": "the full-model runs of the benchmark"}
        elif "partial" in train_sets:
            timing_info = time_full_training(train_sets["partial"], space, settings, runtime, taxonomy, show_progress)

    figures = {}
    for mode in modes:
        if curves.get(mode):
            figures[f"pr_{mode}"] = plot_pr_curves(out / f"pr_{mode}.png", curves[mode], SETTING_TITLES[mode]).name
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
        },
        "backbone": runtime.backbone.name,
        "backbone_fingerprint": runtime.backbone.fingerprint,
        "class_temperature": bench.class_temperature,
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

    examples, G, L, _ = train_set
    n = min(1000, len(examples))
    seconds, epochs = [], []
    for _ in range(settings.bench.timing_repeats):
        result = train_model(examples[:n], space, (G[:n], L[:n]), settings, backbone=runtime.backbone,
                             taxonomy=taxonomy, show_progress=show_progress)
        seconds.append(result.summary["train_seconds"])
        epochs.append(result.summary["epochs_run"])
    return {"images": n, "seconds": [round(s, 2) for s in seconds], "median_seconds": round(statistics.median(seconds), 2),
            "epochs": epochs, "load_average_1m": _machine().get("load_average_1m")}


def acceptance(payload: dict) -> dict:
    out = {}
    for mode, res in payload["results"].items():
        rows = res["rows"]
        if FULL not in rows:
            continue
        full = rows[FULL]
        checks = {}
        if PROBE_EM in rows:
            margin = full["mAP"] - rows[PROBE_EM]["mAP"]
            checks["mAP_over_linear_probe_em"] = {"margin": round(margin, 4), "goal": 0.05, "met": margin >= 0.05}
        if "zero-shot" in rows:
            margin = full["mAP"] - rows["zero-shot"]["mAP"]
            checks["mAP_over_zero_shot"] = {"margin": round(margin, 4), "goal": 0.20, "met": margin >= 0.20}
        k = payload["settings"]["bench"]["recall_k"]
        key = f"hidden_recall@{k}"
        if mode == "partial":
            cond = full.get(key, float("nan"))
            plain = rows.get(FULL + ", known labels ignored", {}).get(key, float("nan"))
            cooc = rows.get(PROBE_EM + " × co-occurrence", {}).get(key, float("nan"))
            checks[key] = {"with_conditioning": cond, "goal": 0.85, "met": cond >= 0.85,
                           "without_conditioning": plain, "linear_probe_x_cooccurrence": cooc,
                           "better_than_both": cond > plain and cond > cooc}
        out[mode] = checks
    timing = payload.get("timing_1000")
    if timing:
        out["train_1000_images_seconds"] = {"median": timing["median_seconds"], "goal": 30.0,
                                            "met": timing["median_seconds"] <= 30.0}
    return out


def _fmt(value, digits=3):
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def render_markdown(payload: dict) -> dict:
    k = payload["settings"]["bench"]["recall_k"]
    lines = []
    for mode, res in payload["results"].items():
        seeds = payload["settings"]["bench"]["seeds"]
        lines.append(f"\n**{SETTING_TITLES[mode]}** — {payload['data']['train_images']} training images, "
                     f"{payload['data']['test_images']} fully labelled test images; mean (± sd of mAP) over "
                     f"training seeds {', '.join(map(str, seeds))}\n")
        lines.append(f"| method | mAP | F1@3 | recall@{k} of hidden positives | train s |")
        lines.append("|---|---:|---:|---:|---:|")
        for name, row in res["rows"].items():
            if row.get("conditioning_only"):
                lines.append(f"| *{name}* | | | {_fmt(row.get(f'hidden_recall@{k}'))} | |")
                continue
            std = f" ± {row['mAP_std']:.3f}" if "mAP_std" in row else ""
            lines.append(f"| {name} | {_fmt(row['mAP'])}{std} | {_fmt(row['F1@3'])} | "
                         f"{_fmt(row.get(f'hidden_recall@{k}'))} | {_fmt(row.get('train_seconds'), 1)} |")
    timing = payload.get("timing_1000")
    foot = (f"\nBackbone `{payload['backbone']}` (class_temperature {payload['class_temperature']:g}), "
            f"features from the FeatureStore ({payload['features']['computed']} computed, "
            f"{payload['features']['cached']} cached). Bench wall time {payload['seconds']['wall']:.0f} s "
            f"on {payload['machine']['cpu_count']} CPU cores (features {payload['seconds']['features']:.0f} s).")
    if timing:
        foot += (f" Training the full model on {timing['images']} annotated images: median "
                 f"{timing['median_seconds']:.1f} s over {len(timing['seconds'])} runs ({', '.join(f'{s:.1f}' for s in timing['seconds'])} s).")
    table = "\n".join(lines) + "\n" + foot + "\n"
    acc = payload["acceptance"]
    report = (
        "# semlabel benchmark: Fashion-MNIST outfit mosaics\n\n"
        f"Command: `{payload['command']}`\n\n{table}\n"
        "## Acceptance checks\n\n```json\n" + json.dumps(acc, indent=1) + "\n```\n\n"
        "## All figures\n\n"
    )
    cols = [("method", "name"), ("mAP", "mAP"), ("F1@3", "F1@3"), ("F1@5", "F1@5"), ("P@3", "P@3"), ("R@3", "R@3"),
            ("recall@1 hidden", "hidden_recall@1"), (f"recall@{k} hidden", f"hidden_recall@{k}"),
            ("mistake severity", "mistake_severity"), ("hier. dist@3", "hier_dist@3"), ("epochs", "epochs")]
    from .report import metrics_table

    for mode, res in payload["results"].items():
        rows = [{"name": n, **r} for n, r in res["rows"].items()]
        report += f"### {SETTING_TITLES[mode]}\n\n" + metrics_table(rows, cols) + "\n\n"
        if f"pr_{mode}" in payload["figures"]:
            report += f"![PR curves, {mode}]({payload['figures'][f'pr_{mode}']})\n\n"
        if f"graph_{mode}" in payload["figures"]:
            report += f"![learned label graph, {mode}]({payload['figures'][f'graph_{mode}']})\n\n"
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
