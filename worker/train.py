"""Training the SigRL heads on cached features, from partial labels.

The worker's API (``/work``-independent summary in the README's model section)::

    from worker.data import examples_from_tasks, attach_features
    from worker.train import train_model
    from backend.model import save_model

    examples, report = examples_from_tasks(tasks, labels)
    examples, batch, errors = attach_feature_batch(examples, runtime)   # cached features
    result = train_model(examples, runtime.label_space(labels), batch,
                         backbone=runtime.backbone, progress=job_meta_update)
    save_model(result.model, out_dir, metrics=result.metrics)

Training never re-encodes images: it takes feature tensors (an
:class:`~backend.features.EncodedImages`, or a FeatureStore and examples whose ``key`` is
set). AdamW, fixed seeds, CUDA when available (``train.device``), deterministic on the CPU
for a fixed seed. After the epochs, on the held-out split (:func:`split_indices`):

1. **model selection** (early stopping) by the mean per-label ROC-AUC of the *observed*
   labels against all others (:func:`observed_auc`) — not by the mAP of the partial labels,
   which punishes a model for finding true labels nobody chose;
2. **shrinkage towards zero-shot**: the heads are blended with the zero-shot model they
   started from, ``z = w z_heads + (1 − w) z_zero-shot``, ``w`` from ``train.shrink_weights``
   by the same held-out criterion — a small project cannot end worse than zero-shot on it;
3. **calibration** (:mod:`backend.model.calibration`): per-label maps with observation rates,
   for the image-only outputs and, when the known-label expert was trained, for the outputs
   given known labels.

Known-label conditioning is learnt C-Tran style: in a training step, for a ``known_rate``
share of the images with at least two chosen labels, a random non-empty proper subset of
the chosen labels is given to the model as *known*; the loss then counts only the other
labels of that image.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from backend.backbones import resolve_device
from backend.errors import ConfigError
from backend.features import EncodedImages, FeatureStore
from backend.labels import LabelSpace
from backend.model.calibration import fit_calibration, fit_options
from backend.model.checkpoint import TrainedModel
from backend.model.config import CalibrationSettings, LossSettings, ModelSettings, TrainSettings
from backend.model.cooccurrence import CooccurrenceStats
from backend.model.sigrl import SigRL, label_graph
from backend.model.zeroshot import similarity as zero_shot_similarity
from backend.settings import Settings, get_settings

from .data import Example
from .losses import PartialLabelLoss, label_similarity
from .metrics import mean_average_precision

log = logging.getLogger(__name__)

Progress = Callable[[dict], Any]


@dataclass
class TrainResult:
    model: TrainedModel
    metrics: dict  # held-out metrics (partial labels of the validation split)
    summary: dict
    history: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------- helpers
def targets(label_sets: Sequence[Sequence[str]], names: Sequence[str]) -> torch.Tensor:
    index = {n: i for i, n in enumerate(names)}
    y = torch.zeros(len(label_sets), len(names))
    for b, labels in enumerate(label_sets):
        for name in labels:
            if name in index:
                y[b, index[name]] = 1.0
    return y


def split_indices(n: int, val_fraction: float, seed: int, min_val: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices: a seeded permutation; no validation below 10 examples,
    and at least ``min_val`` validation images once there are ``2·min_val`` examples."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction)) if n >= 10 else 0
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


def feature_tensors(examples: Sequence[Example], features) -> EncodedImages:
    """Every feature of the examples' images as one :class:`EncodedImages`, from an
    EncodedImages, a FeatureStore (examples with ``key``), a list of Features, or a tuple
    ``(global, local)`` of aligned features only (then the native features are the aligned
    ones, as for a backbone whose native space is aligned)."""
    if isinstance(features, FeatureStore):
        keys = [e.key for e in examples]
        if any(k is None for k in keys):
            raise ConfigError("examples need feature keys (worker.data.attach_features) to use a FeatureStore")
        batch = features.load_many(keys)
    elif isinstance(features, EncodedImages):
        batch = features
    elif isinstance(features, (tuple, list)) and len(features) == 2 and isinstance(features[0], torch.Tensor):
        log.warning("training on text-aligned features only: no native features were given")
        batch = EncodedImages.aligned_only(*features)
    else:
        from backend.features import stack_all

        batch = stack_all(list(features))
    if len(batch) != len(examples):
        raise ConfigError(f"{len(examples)} examples but features of {len(batch)} images")
    return batch.to("cpu", torch.float32)


def backbone_info(backbone) -> dict:
    if isinstance(backbone, dict):
        info = dict(backbone)
    else:
        info = {
            "name": backbone.name,
            "fingerprint": backbone.fingerprint,
            "dim": backbone.dim,
            "zero_shot_scale": float(backbone.zero_shot_scale),
            "zero_shot_bias": float(backbone.zero_shot_bias),
        }
    for key in ("name", "fingerprint", "zero_shot_scale", "zero_shot_bias"):
        if key not in info:
            raise ConfigError(f"backbone description lacks {key!r}")
    return info


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
    last epoch without a validation split)."""
    if tcfg.threads:  # here, so the baselines train with the heads' threads too
        torch.set_num_threads(tcfg.threads)
    t0, cpu0 = time.perf_counter(), time.process_time()
    generator = torch.Generator().manual_seed(seed + 1)
    on_device = features.nbytes() < 2**31
    if on_device:
        features = features.to(device)
    zs_dev = zero_shot.to(device) if zero_shot is not None else None
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    loss_fn.to(device)
    best_state = copy.deepcopy(module.state_dict())
    ema = copy.deepcopy(best_state) if tcfg.ema_decay > 0 else None
    best_score, best_epoch, stale = -math.inf, 0, 0
    known_samples = 0
    history: list[dict] = []
    n_train = len(train_idx)
    steps = max(1, math.ceil(n_train / tcfg.batch_size))
    bar = tqdm(range(1, tcfg.epochs + 1), desc=desc, unit="epoch", leave=False,
               disable=(not show_progress) if show_progress is not None else None)
    epoch = 0
    feat_device = features.global_.device
    for epoch in bar:
        module.train()
        order = train_idx[torch.randperm(n_train, generator=generator)]
        total = 0.0
        for step in range(steps):
            idx = order[step * tcfg.batch_size : (step + 1) * tcfg.batch_size]
            y = Y[idx]
            known = sample_known(y, known_rate, generator) if known_rate > 0 else None
            batch = features[idx.to(feat_device)].to(device)
            y = y.to(device)
            known_dev = known.to(device) if known is not None and known.any() else None
            logits, recon, visual, cooc = (tuple(forward(batch, known_dev, y)) + (None,) * 4)[:4]
            zs = zs_dev[idx.to(zs_dev.device)] if zs_dev is not None else None
            if known_dev is not None and cooc is not None:
                rows = (known_dev.sum(1, keepdim=True) > 0).float()
                known_samples += int(rows.sum())
                loss = loss_fn(visual, y, None, zs) + (conditional_loss or loss_fn)(
                    cooc, y, (1.0 - known_dev) * rows, zs)
            else:
                loss = loss_fn(logits, y, None, zs)
            if recon_weight > 0 and recon is not None:
                loss = loss + recon_weight * recon
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                with torch.no_grad():
                    for key, value in module.state_dict().items():
                        if value.is_floating_point():
                            ema[key].mul_(tcfg.ema_decay).add_(value, alpha=1.0 - tcfg.ema_decay)
            total += float(loss.detach())
        record = {"stage": "train", "epoch": epoch, "epochs": tcfg.epochs, "loss": round(total / steps, 5)}
        current = None
        if ema is not None:  # evaluate (and keep) the averaged weights
            current = copy.deepcopy(module.state_dict())
            module.load_state_dict(ema)
        if len(val_idx) > 0:
            val_logits = predict_logits(module, forward, features, val_idx, device, tcfg.batch_size * 4)
            score = observed_auc(val_logits, Y[val_idx])
            record["val_auc"] = round(score, 5) if not math.isnan(score) else None
            if not math.isnan(score) and score > best_score + 1e-6:
                best_score, best_epoch, stale = score, epoch, 0
                best_state = copy.deepcopy(module.state_dict())
            else:
                stale += 1
        else:
            best_state, best_epoch = copy.deepcopy(module.state_dict()), epoch
        if current is not None:
            module.load_state_dict(current)
        record["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(record)
        bar.set_postfix(loss=record["loss"], val_auc=record.get("val_auc"))
        if progress is not None:
            progress(dict(record))
        if len(val_idx) > 0 and stale >= tcfg.patience:
            break
    bar.close()
    module.load_state_dict(best_state)
    module.eval()
    return FitOutcome(best_state, history, best_epoch, best_score, epoch, time.perf_counter() - t0, known_samples,
                      time.process_time() - cpu0)


@torch.no_grad()
def predict_logits(module, forward, features: EncodedImages, idx, device, batch_size: int = 256,
                   known=None, which: int = 0) -> torch.Tensor:
    """``forward(...)[which]`` (default: the logits) of the images ``idx``, on the CPU."""
    was_training = module.training
    module.eval()
    out = []
    feat_device = features.global_.device
    for start in range(0, len(idx), batch_size):
        part = idx[start : start + batch_size]
        batch = features[part.to(feat_device)].to(device)
        k = known[start : start + batch_size].to(device) if known is not None else None
        logits = forward(batch, k)[which]
        out.append(logits.float().cpu())
    module.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def calibrate_init(module: SigRL, features: EncodedImages, H, global_weight: float, top_k: int,
                   density: float) -> None:
    """Shift the fresh model's logits (bias, in logit units) so that a ``density`` share of
    the training image–label pairs starts positive. A shift common to all labels: the
    ranking is still exactly the zero-shot model's (and the shifted model is the zero-shot
    model the heads may later be shrunk towards)."""
    with torch.no_grad():
        sims = []
        for start in range(0, len(features), 256):
            part = features[start : start + 256]
            sims.append(zero_shot_similarity(part.global_, part.local, H, global_weight, top_k))
        z = module.log_scale.exp() * (torch.cat(sims).flatten().float() - module.centre)
        q = min(max(1.0 - density, 0.05), 0.95)
        module.bias.fill_(-float(torch.quantile(z[: 2_000_000], q)))
        module.set_zero_shot_offset()


def choose_heads_weight(module: SigRL, forward, features: EncodedImages, embeddings, Y, val_idx,
                        weights: Sequence[float], device) -> tuple[float, dict]:
    """Shrink the trained heads towards the zero-shot model: the ``w`` of ``weights`` with
    the best held-out :func:`observed_auc` of ``w z_heads + (1 − w) z_zero-shot`` (ties: the
    larger w). Returns (w, {w: score}); ``w = 1`` without a validation split."""
    if len(val_idx) == 0 or not weights:
        return 1.0, {}
    with torch.no_grad():
        module.heads_weight.fill_(1.0)
        heads = predict_logits(module, forward, features, val_idx, device)
        emb = embeddings.to(device)
        zs = predict_logits(module, lambda b, k: (module.zero_shot_logits(b, emb),), features, val_idx, device)
    scores = {}
    for w in sorted(set(float(x) for x in weights)):
        scores[w] = observed_auc(w * heads + (1.0 - w) * zs, Y[val_idx])
    finite = {w: v for w, v in scores.items() if not math.isnan(v)}
    if not finite:
        return 1.0, scores
    best = max(finite.values())
    chosen = max(w for w, v in finite.items() if v >= best - 1e-9)
    module.heads_weight.fill_(chosen)
    return chosen, scores


def fit_model_calibration(module: SigRL, forward, features: EncodedImages, Y, idx, names, ccfg: CalibrationSettings,
                          device, seed: int) -> dict:
    """Calibrations of the image-only outputs and (when the expert is active) of the outputs
    given known labels, fitted on the images ``idx`` (held out from training).

    Known-label outputs are fitted on held-out images with at least two observed labels: in
    turn, a random non-empty proper subset of the observed labels is given as known and the
    other observed labels are the targets (the known ones do not count)."""
    out: dict = {}
    kw = fit_options(ccfg)
    visual = predict_logits(module, forward, features, idx, device, which=2)
    out["visual"] = fit_calibration(visual, Y[idx], names, **kw)
    if float(module.known_active) > 0:
        generator = torch.Generator().manual_seed(seed + 7)
        y = Y[idx]
        rows = (y.sum(1) >= 2).nonzero().flatten()
        if len(rows) >= 2:
            zs, ys, ms = [], [], []
            for _ in range(ccfg.conditional_samples):
                known = sample_known(y[rows], 1.0, generator)
                z = predict_logits(module, forward, features, idx[rows], device, known=known)
                zs.append(z)
                ys.append(y[rows])
                ms.append(1.0 - known)
            out["conditional"] = fit_calibration(torch.cat(zs), torch.cat(ys), names, torch.cat(ms), **kw)
    return out


# ------------------------------------------------------------------------------ API
def train_model(
    examples: Sequence[Example],
    space: LabelSpace,
    features,
    settings: Settings | None = None,
    *,
    backbone=None,
    seed: int | None = None,
    progress: Progress | None = None,
    model_cfg: ModelSettings | None = None,
    loss_cfg: LossSettings | None = None,
    train_cfg: TrainSettings | None = None,
    taxonomy=None,
    show_progress: bool | None = None,
) -> TrainResult:
    """Train SigRL heads on partial-label ``examples`` over the labels of ``space``.

    ``features``: ``(global [N, D], local [N, P, D])`` aligned with ``examples``, a list of
    :class:`~backend.features.Features`, or a FeatureStore (examples with ``key``).
    ``backbone``: the Backbone that made the features (or a dict with ``name``,
    ``fingerprint``, ``zero_shot_scale``, ``zero_shot_bias``); taken from the FeatureStore
    when one is given. ``progress`` receives one dict per epoch:
    ``{"stage": "train", "epoch", "epochs", "loss", "val_auc", "seconds"}`` (``val_auc``: the
    model-selection criterion, :func:`observed_auc`), then ``{"stage": "trained", ...}``."""
    settings = settings or get_settings()
    mcfg = model_cfg or settings.model
    lcfg = loss_cfg or settings.loss
    tcfg = train_cfg or settings.train
    ccfg = settings.calibration
    seed = tcfg.seed if seed is None else int(seed)
    if backbone is None and isinstance(features, FeatureStore):
        backbone = features.backbone
    if backbone is None:
        raise ConfigError("train_model needs the backbone (or its description) that made the features")
    info = backbone_info(backbone)
    taxonomy = taxonomy if taxonomy is not None else space.taxonomy
    if not examples:
        raise ConfigError("no annotated examples to train on")
    t_start = time.perf_counter()
    device = resolve_device(tcfg.device)
    if progress:
        progress({"stage": "features", "images": len(examples)})
    feats = feature_tensors(examples, features)
    names = space.names
    Y = targets([e.positives for e in examples], names)
    train_idx, val_idx = split_indices(len(examples), tcfg.val_fraction, seed, tcfg.min_val_images)
    stats_train = CooccurrenceStats.from_label_sets([examples[i].positives for i in train_idx.tolist()])

    torch.manual_seed(seed)
    native_dim = int(feats.native_global.shape[1])
    module = SigRL(feats.global_.shape[1], mcfg, info["zero_shot_scale"], info["zero_shot_bias"], native_dim)
    zs_cfg = settings.zero_shot
    module.fit_feature_stats(feats[train_idx])
    H = space.embeddings.float()
    density = float(Y[train_idx].sum(1).mean() / max(1, len(names)))
    calibrate_init(module, feats[train_idx], H, mcfg.global_weight, mcfg.local_top_k, density)
    feats = module.reduce_native(feats)  # the projections' fixed part, once (not in every step)
    module.to(device)
    H_dev = H.to(device)
    graph = label_graph(stats_train, names, H, mcfg).to(device)

    zero_shot = None
    if lcfg.kind == "em_pl":
        from backend.model.zeroshot import zero_shot_probs

        zero_shot = torch.cat([
            zero_shot_probs(part.global_, part.local, H, global_weight=zs_cfg.global_weight,
                            top_k=zs_cfg.local_top_k, scale=info["zero_shot_scale"], bias=info["zero_shot_bias"])
            for part in (feats[s : s + 256] for s in range(0, len(feats), 256))
        ])
    loss_fn = PartialLabelLoss(lcfg, label_similarity(lcfg, names, H, taxonomy))
    conditional_loss = PartialLabelLoss(
        lcfg.model_copy(update={"kind": lcfg.conditional_kind, "semantic": False, "ranking_weight": 0.0}))

    def forward(batch, known, targets=None):
        out = module(batch, H_dev, graph, known, targets=targets, train_known=module.training)
        if module.training:  # the loss trains the heads at their own scale
            return out.head_logits, out.reconstruction_loss, out.head_visual, out.cooc_logits
        return out.logits, out.reconstruction_loss, out.visual_logits, out.cooc_logits

    outcome = fit(
        module, forward, feats, Y, train_idx, val_idx, loss_fn, tcfg,
        seed=seed, device=device, zero_shot=zero_shot,
        known_rate=tcfg.known_rate if mcfg.use_known else 0.0,
        recon_weight=lcfg.reconstruction_weight if mcfg.use_svfr else 0.0,
        conditional_loss=conditional_loss,
        progress=progress, desc="train SigRL", show_progress=show_progress,
    )
    # The known-label expert is used only when training gave it enough to learn from
    # (single-positive data: never — an image needs two chosen labels to give one as known).
    known_active = mcfg.use_known and outcome.known_samples >= max(1, tcfg.min_known_samples)
    module.known_active.fill_(1.0 if known_active else 0.0)
    heads_weight, shrink_scores = choose_heads_weight(module, forward, feats, H, Y, val_idx, tcfg.shrink_weights,
                                                      device)
    # Calibration on the held-out split; without one (tiny projects), a shared map only,
    # fitted on the training images (the per-label maps would fit their own noise).
    calib_idx = val_idx if len(val_idx) > 0 else train_idx
    calibration = fit_model_calibration(module, forward, feats, Y, calib_idx, names,
                                        ccfg if len(val_idx) > 0 else ccfg.model_copy(update={"shrinkage": 1e6, "rate_shrinkage": 1e6}),
                                        device, seed)
    module.cpu()
    stats_all = CooccurrenceStats.from_label_sets([e.positives for e in examples])
    metrics = held_out_metrics(module, graph.to("cpu"), H, feats, Y, val_idx, names)
    metrics["observed_auc"] = outcome.best_val_score if len(val_idx) else None
    summary = {
        "images": len(examples),
        "train_images": int(len(train_idx)),
        "val_images": int(len(val_idx)),
        "labels": len(names),
        "labels_with_examples": int((Y.sum(0) > 0).sum()),
        "positives": int(Y.sum()),
        "epochs_run": outcome.epochs_run,
        "best_epoch": outcome.best_epoch,
        "selection": "held-out ROC-AUC of observed labels",
        "known_samples": outcome.known_samples,
        "known_expert": bool(known_active),
        "heads_weight": heads_weight,
        "shrink_scores": {str(k): (round(v, 5) if not math.isnan(v) else None) for k, v in shrink_scores.items()},
        "observation_rate": round(calibration["visual"].shared_rate, 4),
        "train_seconds": round(outcome.seconds, 3),
        "train_cpu_seconds": round(outcome.cpu_seconds, 3),
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "device": str(device),
        "seed": seed,
    }
    model = TrainedModel(
        module=module,
        labels=list(names),
        stats=stats_all,
        backbone={k: info[k] for k in ("name", "fingerprint") if k in info}
        | {"dim": int(feats.global_.shape[1]), "native_dim": native_dim},
        loss=lcfg.model_dump(),
        train=tcfg.model_dump(),
        seed=seed,
        summary=summary,
        taxonomy=dict(taxonomy.parent) if taxonomy is not None else None,
        calibration=calibration,
    )
    if progress:
        progress({"stage": "trained", **{k: summary[k] for k in ("epochs_run", "best_epoch", "train_seconds")},
                  "val_map": metrics.get("mAP")})
    return TrainResult(model, metrics, summary, outcome.history)


def held_out_metrics(module, graph, H, feats: EncodedImages, Y, val_idx, names) -> dict:
    """Metrics on the validation split of the partial labels (what model selection saw)."""
    from .metrics import evaluate_scores

    if len(val_idx) == 0:
        return {"split": "none (fewer than 10 examples)", "images": 0}

    def forward(batch, known, targets=None):
        return module(batch, H, graph, known).logits, None, None

    logits = predict_logits(module, forward, feats, val_idx, torch.device("cpu"))
    out = evaluate_scores(logits, Y[val_idx], names=names, ks=(1, 3, 5))
    out.pop("AP_per_label", None)
    return {"mAP": out.pop("mAP"), **out, "split": "held-out partial labels"}
