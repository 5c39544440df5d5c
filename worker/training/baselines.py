"""Baselines of the benchmark: the linear probe, and the linear probe re-weighted by raw
co-occurrence.

- **Linear probe**: one logistic regression per label on the *standardised* pooled feature
  of the whole image — the backbone's *native* pooled features (``EncodedImages.native_global``,
  1280-d for EfficientNet-Lite0) in the benchmark — trained with the same partial-label loss,
  optimiser, model selection and seed as the SigRL heads, and tuned as carefully: learning
  rate and weight decay are chosen from ``probe_grid`` on the validation split (never the
  test images), by the same held-out criterion (:func:`~worker.training.fit.observed_auc`); its
  probabilities are calibrated on that split like the model's. It has one weight row per
  label, so unlike SigRL it cannot score a label it was not trained on.
- **Linear probe × co-occurrence**: given known labels K, ``p(c | x, K) ∝ p(c | x) ·
  mean_{j∈K} P̂(c | j)`` with ``P̂(c | j) = (M_jc + prior_c) / (N_j + 1)`` from the raw
  counts of the training annotations (:func:`~backend.model.cooccurrence.smoothed_conditional`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from backend.backbones import resolve_device
from backend.features import EncodedImages
from backend.model.calibration import Calibration, fit_calibration, fit_options
from backend.model.config import CalibrationSettings, LossSettings, TrainSettings
from backend.model.cooccurrence import CooccurrenceStats, smoothed_conditional
from backend.model.projection import FeatureNorm

from .data import targets
from .fit import fit, observed_auc, predict_logits, split_indices
from .losses import PartialLabelLoss

class LinearProbe(nn.Module):
    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.norm = FeatureNorm(dim)
        self.linear = nn.Linear(dim, classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(g))


@dataclass
class ProbeResult:
    module: LinearProbe
    stats: CooccurrenceStats
    names: list[str]
    summary: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    calibration: Calibration | None = None

    @torch.no_grad()
    def logits(self, G: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        return torch.cat([self.module(G[s : s + 1024]) for s in range(0, G.shape[0], 1024)])

    def probabilities(self, G: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities ``[N, C]`` (held-out calibration, as the model's)."""
        z = self.logits(G)
        return self.calibration.probabilities(z, self.names) if self.calibration else torch.sigmoid(z)

    @torch.no_grad()
    def cooccurrence_scores(self, G: torch.Tensor, known: torch.Tensor,
                            probabilities: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(c|x) + log mean_{j∈K} P̂(c|j)`` (just ``log p(c|x)`` without known labels);
        ``p``: the given (e.g. calibrated) probabilities, else the sigmoid of the logits."""
        if probabilities is None:
            logp = torch.nn.functional.logsigmoid(self.logits(G))
        else:
            logp = torch.log(probabilities.clamp(min=1e-9))
        P = smoothed_conditional(self.stats, self.names)
        weights = known / known.sum(1, keepdim=True).clamp(min=1.0)
        support = weights @ P
        has = known.sum(1, keepdim=True) > 0
        return torch.where(has, logp + torch.log(support.clamp(min=1e-6)), logp)


def train_linear_probe(
    label_sets: Sequence[Sequence[str]],
    names: Sequence[str],
    G: torch.Tensor,
    loss_cfg: LossSettings,
    train_cfg: TrainSettings,
    seed: int,
    zero_shot: torch.Tensor | None = None,
    similarity: torch.Tensor | None = None,
    show_progress: bool | None = None,
    grid: Sequence[tuple[float, float]] | None = None,
    calibration_cfg: CalibrationSettings | None = None,
) -> ProbeResult:
    """Train the probe on pooled features ``G [N, F]`` (pass the native pooled features for
    the benchmark's baseline). ``grid``: (lr, weight_decay) pairs tried, the best held-out
    :func:`observed_auc` wins (None: ``train_cfg`` as it is)."""
    t0 = time.perf_counter()
    Y = targets(label_sets, names)
    train_idx, val_idx = split_indices(len(label_sets), train_cfg.val_fraction, seed, train_cfg.min_val_images,
                                       train_cfg.min_split_images)
    device = resolve_device(train_cfg.device)
    dummy = G[:, None, :1]  # the probe reads the pooled feature only
    features = EncodedImages(G, dummy, G, dummy)
    candidates = [train_cfg] if not grid or len(val_idx) == 0 else [
        train_cfg.model_copy(update={"lr": lr, "weight_decay": wd}) for lr, wd in grid]
    best = None
    for cfg in candidates:
        torch.manual_seed(seed)
        module = LinearProbe(G.shape[1], len(names))
        module.norm.fit(G[train_idx])
        module.to(device)

        def forward(batch, known, targets=None, module=module):
            return module(batch.global_), None, None

        outcome = fit(
            module, forward, features, Y, train_idx, val_idx, PartialLabelLoss(loss_cfg, similarity), cfg,
            seed=seed, device=device, zero_shot=zero_shot, desc="train linear probe", show_progress=show_progress,
        )
        score = outcome.best_val_score
        if best is None or score > best[0]:
            best = (score, module, outcome, cfg, forward)
    score, module, outcome, cfg, forward = best
    calibration = None
    if len(val_idx) > 0:
        from backend.settings import get_settings

        if calibration_cfg is None:
            calibration_cfg = get_settings().calibration
        ccfg = calibration_cfg
        z = predict_logits(module, forward, features, val_idx, device, get_settings().scoring.batch_size)
        calibration = fit_calibration(z, Y[val_idx], names, **fit_options(ccfg))
    module.cpu()
    stats = CooccurrenceStats.from_label_sets(label_sets)
    summary = {"train_seconds": round(time.perf_counter() - t0, 3), "epochs_run": outcome.epochs_run,
               "best_epoch": outcome.best_epoch, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
               "val_auc": round(score, 5) if score == score else None, "candidates": len(candidates)}
    return ProbeResult(module, stats, list(names), summary, outcome.history, calibration)


__all__ = ["LinearProbe", "ProbeResult", "train_linear_probe"]
