"""The bench's experiments beside the method table: labels unseen in training, the training
time of the full model on 1 000 images, and the served predictor both score through."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from worker.eval.metrics import calibration, label_subset_map


def served_predictor(model, runtime, directory: Path):
    """The predictor the backend would serve for ``model``: saved, then loaded the way the
    model store loads a version (``backend.model.load_predictor``)."""
    from backend.model.checkpoint import save_model
    from backend.model.serving import load_predictor

    save_model(model, directory)
    return load_predictor(directory, runtime, device="cpu")


def unseen_labels_experiment(examples, feats, classes, unseen, test_feats, y_test, zero_shot, runtime, settings,
                             taxonomy, seeds, scratch: Path, full_row: dict | None, show_progress=None) -> dict:
    """SigRL trained as if ``unseen`` had been added to the project after training: their
    annotations are dropped (images left without a label too), the model is trained on the
    other labels' space, then scores the full label space. AP of the unseen labels against
    the zero-shot AP of the same labels (and the full model's, trained with them)."""
    from worker.training.train import train_model

    held = set(unseen)
    idx = [classes.index(c) for c in unseen]
    pairs = [(replace(e, positives=[p for p in e.positives if p not in held]), f) for e, f in zip(examples, feats)]
    pairs = [(e, f) for e, f in pairs if e.positives]
    seen = [c for c in classes if c not in held]
    seen_space = runtime.label_space(seen, taxonomy)
    space = runtime.label_space(classes, taxonomy)
    runs = []
    bench = settings.bench
    for seed in seeds:
        result = train_model([e for e, _ in pairs], seen_space, [f for _, f in pairs], settings,
                             backbone=runtime.backbone, seed=seed, taxonomy=taxonomy, show_progress=show_progress)
        predictor = served_predictor(result.model, runtime, scratch / str(seed))
        visual, _ = predictor.logits(test_feats, space)
        served = predictor.probabilities(test_feats, space)[:, idx]
        runs.append({**label_subset_map(visual, y_test, idx),
                     "ECE": calibration(served, y_test[:, idx], bench.ece_bins, bench.ece_binning)["ECE"]})
        shutil.rmtree(scratch / str(seed), ignore_errors=True)
    zs = label_subset_map(zero_shot, y_test, idx)
    zs_ece = calibration(zero_shot[:, idx], y_test[:, idx], bench.ece_bins, bench.ece_binning)["ECE"]
    per_label = {classes[c]: round(float(np.mean([r["AP"].get(c, float("nan")) for r in runs])), 4) for c in idx}
    out = {
        "labels": list(unseen),
        "train_images": len(pairs),
        "AP": round(float(np.mean([r["mAP"] for r in runs])), 4),
        "AP_std": round(float(np.std([r["mAP"] for r in runs])), 4),
        "AP_per_label": per_label,
        "zero_shot_AP": round(zs["mAP"], 4),
        "zero_shot_AP_per_label": {classes[c]: round(v, 4) for c, v in zs["AP"].items()},
        # served probabilities of the unseen labels against their truth (zero-shot's beside)
        "ECE": round(float(np.mean([r["ECE"] for r in runs])), 4),
        "zero_shot_ECE": round(float(zs_ece), 4),
        "seeds": list(seeds),
    }
    out["gain_over_zero_shot"] = round(out["AP"] - out["zero_shot_AP"], 4)
    if full_row and full_row.get("AP_per_label"):
        trained = [full_row["AP_per_label"][c] for c in unseen if c in full_row["AP_per_label"]]
        out["AP_when_trained_with_them"] = round(float(np.mean(trained)), 4) if trained else None
    return out


def time_full_training(train_set, space, settings, runtime, taxonomy, show_progress=None) -> dict:
    """Median wall time of training the full model on the first 1 000 annotated images."""
    from worker.training.train import train_model

    examples, feats, _ = train_set
    n = min(1000, len(examples))
    seconds, epochs = [], []
    for _ in range(settings.bench.timing_repeats):
        result = train_model(examples[:n], space, feats[:n], settings, backbone=runtime.backbone,
                             taxonomy=taxonomy, show_progress=show_progress)
        seconds.append(result.summary["train_seconds"])
        epochs.append(result.summary["epochs_run"])
    return {"images": n, "seconds": [round(s, 2) for s in seconds], "median_seconds": round(statistics.median(seconds), 2),
            "epochs": epochs, "load_average_1m": machine_info().get("load_average_1m")}


def machine_info() -> dict:
    """The machine a run measured: cores, torch threads and versions, CUDA, load."""
    info = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        pass
    return info
