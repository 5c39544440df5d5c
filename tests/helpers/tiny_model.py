"""A tiny but real Predictor for store and serving tests: one bias per label, saved as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from backend.model.predictor import Predictor, Reasons, Suggestion


class TinyPredictor(Predictor):
    def __init__(self, biases: dict[str, float], version: str = "tiny"):
        self.biases = biases
        self.version = version

    def probabilities(self, features, space, known=None):
        row = torch.tensor([self.biases.get(n, 0.0) for n in space.names])
        return torch.sigmoid(row).expand(len(features), -1).clone()

    def suggest(self, features, space, known, top_k, min_probability=0.0):
        probs = self.probabilities(features, space, known)
        out = []
        for b in range(len(features)):
            order = probs[b].argsort(descending=True).tolist()
            items = [
                Suggestion(space.names[c], float(probs[b, c]), Reasons(float(probs[b, c]), 0.0))
                for c in order
                if space.names[c] not in known[b] and float(probs[b, c]) >= min_probability
            ]
            out.append(items[:top_k])
        return out


def save_tiny(directory: Path, biases: dict[str, float], metrics: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "weights.json").write_text(json.dumps(biases))
    if metrics is not None:
        (directory / "metrics.json").write_text(json.dumps(metrics))
    return directory


def load_tiny(model_dir: Path, runtime=None) -> TinyPredictor:
    biases = json.loads((Path(model_dir) / "weights.json").read_text())
    if not isinstance(biases, dict):
        raise ValueError("weights.json is not a mapping")
    return TinyPredictor({k: float(v) for k, v in biases.items()})


def _choices(task: dict) -> set[str]:
    out: set[str] = set()
    for ann in task.get("annotations", []):
        if ann.get("was_cancelled"):
            continue
        for item in ann.get("result") or []:
            out.update((item.get("value") or {}).get("choices") or [])
    return out


def train_tiny(ctx):
    """A real (if tiny) trainer for exercising the worker: per-label log-odds of the training
    split, a few 'epochs' (``SEMLABEL_TEST_EPOCH_S`` seconds each), held-out accuracy as mAP."""
    import math
    import os
    import time
    import xml.etree.ElementTree as ET

    from worker.jobs.trainer import TrainingResult

    labels = [c.get("value") for c in ET.fromstring(ctx.data.label_config).iter("Choice")]
    epochs = int(os.environ.get("SEMLABEL_TEST_EPOCHS", "3"))
    pause = float(os.environ.get("SEMLABEL_TEST_EPOCH_S", "0"))
    counts = {name: 0 for name in labels}
    for task in ctx.train_tasks:
        for name in _choices(task):
            if name in counts:
                counts[name] += 1
    n = max(1, len(ctx.train_tasks))
    biases = {k: math.log((v + 0.5) / (n - v + 0.5)) for k, v in counts.items()}
    for epoch in range(1, epochs + 1):
        ctx.progress("training" if epoch == 1 else None, epoch=epoch, loss=round(1.0 / epoch, 4))
        # Write the weights a piece at a time, as a long training would.
        with open(ctx.out_dir / "weights.partial", "a") as fh:
            fh.write(json.dumps({"epoch": epoch}) + "\n")
        time.sleep(pause)
    (ctx.out_dir / "weights.partial").rename(ctx.out_dir / "weights.json.log")
    save_tiny(ctx.out_dir, biases)
    correct = total = 0
    for task in ctx.holdout_tasks:
        truth = _choices(task)
        for name in labels:
            total += 1
            correct += int((biases[name] > 0) == (name in truth))
    return TrainingResult(metrics={"mAP": correct / total if total else 0.0, "holdout_tasks": len(ctx.holdout_tasks)},
                          labels=labels, config={"trainer": "tiny"})
