"""The training loop shared by the SigRL heads and the baselines (:func:`fit`), and what it
is built from: the seeded train/validation split, the model-selection criterion
(:func:`observed_auc`), C-Tran style known-label sampling (:func:`sample_known`) and the
batched logits of a split (:func:`predict_logits`).

AdamW over the trainable parameters; optionally an exponential moving average of the
weights (``train.ema_decay``, ``torch.optim.swa_utils.AveragedModel``), which is what is
evaluated and kept; early stopping by the held-out :func:`observed_auc`.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from backend.features import EncodedImages
from backend.model.batched import in_batches
from backend.model.config import TrainSettings

from .losses import PartialLabelLoss

Progress = Callable[[dict], Any]


def split_indices(n: int, val_fraction: float, seed: int, min_val: int,
                  min_split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices: a seeded permutation; no validation below ``min_split``
    examples (``train.min_split_images``), and at least ``min_val`` validation images once
    there are ``2·min_val`` examples."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction)) if n >= min_split else 0
    if n_val and n >= 2 * min_val:
        n_val = max(n_val, min_val)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def observed_auc(scores: torch.Tensor, observed: torch.Tensor) -> float:
    """Mean over labels of the ROC-AUC of observed positives against every other image.

    Why this criterion: under SCAR (a present label is chosen with a fixed probability
    ``c``), the unchosen images of a label are a mixture of its negatives and a share ``π'``
    of its positives, and the AUC against them is ``AUC_PU = (1 − π')·AUC + π'/2`` (Menon et
    al. 2015) — an increasing affine function of the true AUC. Ranking models by it ranks
    them by true AUC; the mAP of partial labels has no such property (it falls when a model
    ranks an unchosen true label high). Labels without an observed positive (or without
    an unchosen image) are skipped; NaN when none is left.

    All labels at once by the Mann–Whitney identity ``AUC = (R₊ − n₊(n₊+1)/2) / (n₊ n₋)``
    (``R₊``: sum of the positives' ranks, ties averaged — what ``roc_auc_score`` gives): it
    runs after every epoch, where per-label ``roc_auc_score`` calls cost more than the epoch."""
    from scipy.stats import rankdata

    z = scores.detach().float().cpu().numpy()
    y = observed.detach().cpu().numpy() > 0
    n_pos = y.sum(0)
    n_neg = y.shape[0] - n_pos
    keep = (n_pos > 0) & (n_neg > 0)
    if not keep.any():
        return math.nan
    ranks = rankdata(z[:, keep], axis=0)
    r_pos = (ranks * y[:, keep]).sum(0)
    n_pos, n_neg = n_pos[keep], n_neg[keep]
    aucs = (r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return float(aucs.mean())


def sample_known(y: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """``[B, C]`` known mask: for a ``rate`` share of rows with ≥ 2 positives, a random
    subset of 1 .. n−1 of the positives."""
    n_pos = y.sum(1)
    eligible = (n_pos >= 2) & (torch.rand(y.shape[0], generator=generator) < rate)
    if not eligible.any():
        return torch.zeros_like(y)
    size = (torch.rand(y.shape[0], generator=generator) * (n_pos - 1)).floor() + 1  # 1 .. n−1
    noise = torch.rand(y.shape, generator=generator)
    noise = torch.where(y > 0, noise, torch.full_like(noise, 2.0))
    rank = noise.argsort(1).argsort(1).float()  # rank of each positive among the positives
    known = (rank < size[:, None]) & (y > 0) & eligible[:, None]
    return known.float()


@dataclass
class FitOutcome:
    best_state: dict
    history: list[dict]
    best_epoch: int
    best_val_score: float
    epochs_run: int
    seconds: float
    known_samples: int = 0  # training images that were given known labels, over all steps
    cpu_seconds: float = 0.0  # CPU time of the process (wall seconds depend on the machine's load)


@dataclass
class _Selection:
    """Model selection over the epochs: the best held-out score so far and its weights."""

    state: dict
    score: float = -math.inf
    epoch: int = 0
    stale: int = 0

    def observe(self, module: torch.nn.Module, epoch: int, score: float | None) -> None:
        """``score`` None: no validation split, the latest epoch is kept."""
        if score is None:
            self.state, self.epoch = copy.deepcopy(module.state_dict()), epoch
        elif not math.isnan(score) and score > self.score + 1e-6:
            self.score, self.epoch, self.stale = score, epoch, 0
            self.state = copy.deepcopy(module.state_dict())
        else:
            self.stale += 1


def _ema(module: torch.nn.Module, decay: float) -> AveragedModel | None:
    """The weights' moving average ``ema = decay·ema + (1 − decay)·w`` after every step,
    starting from the initial weights (buffers included); None for ``decay = 0``."""
    if decay <= 0:
        return None
    ema = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.update_parameters(module)  # the first update copies: the average starts at the initial weights
    return ema


def _batch_loss(forward, loss_fn, conditional_loss, batch, y, known, zs, recon_weight) -> tuple[torch.Tensor, int]:
    """(loss, images given known labels) of one training batch (see :func:`fit`)."""
    logits, recon, visual, cooc = (tuple(forward(batch, known, y)) + (None,) * 4)[:4]
    given = 0
    if known is not None and cooc is not None:
        rows = (known.sum(1, keepdim=True) > 0).float()
        given = int(rows.sum())
        loss = loss_fn(visual, y, None, zs) + (conditional_loss or loss_fn)(cooc, y, (1.0 - known) * rows, zs)
    else:
        loss = loss_fn(logits, y, None, zs)
    if recon_weight > 0 and recon is not None:
        loss = loss + recon_weight * recon
    return loss, given


def _train_epoch(module, forward, features, Y, train_idx, optimizer, ema, loss_fn, conditional_loss, tcfg,
                 generator, device, zero_shot, known_rate, recon_weight) -> tuple[float, int]:
    """One pass over the training images in a seeded order: (mean loss, images given known labels)."""
    module.train()
    order = train_idx[torch.randperm(len(train_idx), generator=generator)]
    steps = max(1, math.ceil(len(train_idx) / tcfg.batch_size))
    total, given = 0.0, 0
    for step in range(steps):
        idx = order[step * tcfg.batch_size : (step + 1) * tcfg.batch_size]
        y = Y[idx]
        known = sample_known(y, known_rate, generator) if known_rate > 0 else None
        batch = features[idx.to(features.global_.device)].to(device)
        known = known.to(device) if known is not None and known.any() else None
        zs = zero_shot[idx.to(zero_shot.device)] if zero_shot is not None else None
        loss, n = _batch_loss(forward, loss_fn, conditional_loss, batch, y.to(device), known, zs, recon_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update_parameters(module)
        total += float(loss.detach())
        given += n
    return total / steps, given


def _select(module, ema, forward, features, Y, val_idx, device, batch_size, selection: _Selection,
            epoch: int) -> float | None:
    """Score the epoch's weights — the averaged ones with an EMA — on the validation split
    and let ``selection`` keep them if they are the best so far; the score (None without a
    validation split). The module leaves with its own training weights."""
    current = copy.deepcopy(module.state_dict()) if ema is not None else None
    if ema is not None:
        module.load_state_dict(ema.module.state_dict())
    score = None
    if len(val_idx) > 0:
        score = observed_auc(predict_logits(module, forward, features, val_idx, device, batch_size), Y[val_idx])
    selection.observe(module, epoch, score)
    if current is not None:
        module.load_state_dict(current)
    return score


def fit(
    module: torch.nn.Module,
    forward: Callable,
    features: EncodedImages,
    Y: torch.Tensor,
    train_idx: torch.Tensor,
    val_idx: torch.Tensor,
    loss_fn: PartialLabelLoss,
    tcfg: TrainSettings,
    *,
    seed: int,
    device: torch.device,
    zero_shot: torch.Tensor | None = None,
    known_rate: float = 0.0,
    recon_weight: float = 0.0,
    conditional_loss: PartialLabelLoss | None = None,
    progress: Progress | None = None,
    desc: str = "train",
    show_progress: bool | None = None,
) -> FitOutcome:
    """The training loop shared by the SigRL heads and the baselines.

    ``forward(batch, known, targets) -> (logits, reconstruction_loss, visual_logits,
    cooc_logits)``; all but the first may be None (``targets``: the batch's annotated
    labels, for leave-one-out co-occurrence counts). With known labels the loss is the loss
    of the visual logits on every label plus ``conditional_loss`` (default: the same loss)
    of the co-occurrence expert on the labels that were not given, for the images that had
    known labels: conditioning never takes supervision away from the visual model, and the
    expert learns from the known labels alone.

    The kept state is the epoch with the best :func:`observed_auc` on ``val_idx`` (the
    last epoch without a validation split); with ``train.ema_decay`` the averaged weights
    are the ones evaluated and kept."""
    if tcfg.threads:  # here, so the baselines train with the heads' threads too
        torch.set_num_threads(tcfg.threads)
    t0, cpu0 = time.perf_counter(), time.process_time()
    generator = torch.Generator().manual_seed(seed + 1)
    if features.nbytes() < tcfg.max_device_mb * 2**20:  # on the device once, else per batch
        features = features.to(device)
    zs_dev = zero_shot.to(device) if zero_shot is not None else None
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=tcfg.lr,
                                  weight_decay=tcfg.weight_decay)
    loss_fn.to(device)
    selection = _Selection(copy.deepcopy(module.state_dict()))
    ema = _ema(module, tcfg.ema_decay)
    known_samples, history, epoch = 0, [], 0
    bar = tqdm(range(1, tcfg.epochs + 1), desc=desc, unit="epoch", leave=False,
               disable=(not show_progress) if show_progress is not None else None)
    for epoch in bar:
        loss, given = _train_epoch(module, forward, features, Y, train_idx, optimizer, ema, loss_fn,
                                   conditional_loss, tcfg, generator, device, zs_dev, known_rate, recon_weight)
        known_samples += given
        record = {"stage": "train", "epoch": epoch, "epochs": tcfg.epochs, "loss": round(loss, 5)}
        score = _select(module, ema, forward, features, Y, val_idx, device, tcfg.batch_size * 4, selection, epoch)
        if score is not None:
            record["val_auc"] = round(score, 5) if not math.isnan(score) else None
        record["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(record)
        bar.set_postfix(loss=record["loss"], val_auc=record.get("val_auc"))
        if progress is not None:
            progress(dict(record))
        if len(val_idx) > 0 and selection.stale >= tcfg.patience:
            break
    bar.close()
    module.load_state_dict(selection.state)
    module.eval()
    return FitOutcome(selection.state, history, selection.epoch, selection.score, epoch,
                      time.perf_counter() - t0, known_samples, time.process_time() - cpu0)


@torch.no_grad()
def predict_logits(module, forward, features: EncodedImages, idx, device, batch_size: int,
                   known=None, which: int = 0) -> torch.Tensor:
    """``forward(...)[which]`` (default: the logits) of the images ``idx``, on the CPU."""
    was_training = module.training
    module.eval()
    out = in_batches(lambda part, k: forward(part, k)[which], features, batch_size, device, rows=idx, known=known,
                     empty=torch.zeros(0))
    module.train(was_training)
    return out
