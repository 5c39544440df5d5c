"""Baselines of the benchmark: the linear probe, and the linear probe re-weighted by raw
co-occurrence.

- **Linear probe**: one logistic regression per label on the *standardised* global feature
  (the same standardisation the SigRL adapter uses), trained with the same partial-label
  loss, optimiser, early stopping and seed as the SigRL heads. It has one weight row per
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
from backend.model.config import LossSettings, TrainSettings
from backend.model.cooccurrence import CooccurrenceStats, smoothed_conditional
from backend.model.sigrl import FeatureNorm

from .losses import PartialLabelLoss
from .train import fit, predict_logits, split_indices, targets


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

    @torch.no_grad()
    def logits(self, G: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        return torch.cat([self.module(G[s : s + 1024]) for s in range(0, G.shape[0], 1024)])

    @torch.no_grad()
    def cooccurrence_scores(self, G: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """``log p(c|x) + log mean_{j∈K} P̂(c|j)`` (just ``log p(c|x)`` without known labels)."""
        logp = torch.nn.functional.logsigmoid(self.logits(G))
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
) -> ProbeResult:
    t0 = time.perf_counter()
    Y = targets(label_sets, names)
    train_idx, val_idx = split_indices(len(label_sets), train_cfg.val_fraction, seed)
    torch.manual_seed(seed)
    module = LinearProbe(G.shape[1], len(names))
    module.norm.fit(G[train_idx])
    device = resolve_device(train_cfg.device)
    module.to(device)
    dummy_local = G[:, None, :1]  # the probe reads the global feature only

    def forward(g, l, known, targets=None):
        return module(g), None, None

    outcome = fit(
        module, forward, G, dummy_local, Y, train_idx, val_idx, PartialLabelLoss(loss_cfg, similarity), train_cfg,
        seed=seed, device=device, zero_shot=zero_shot, desc="train linear probe", show_progress=show_progress,
    )
    module.cpu()
    stats = CooccurrenceStats.from_label_sets(label_sets)
    summary = {"train_seconds": round(time.perf_counter() - t0, 3), "epochs_run": outcome.epochs_run,
               "best_epoch": outcome.best_epoch}
    return ProbeResult(module, stats, list(names), summary, outcome.history)


__all__ = ["LinearProbe", "ProbeResult", "train_linear_probe", "predict_logits"]
