"""Training the SigRL heads on cached features, from partial labels.

The worker's API (summary in the README's model section)::

    from worker.training.data import examples_from_tasks, attach_feature_batch
    from worker.training.train import train_model
    from backend.model import save_model

    examples, report = examples_from_tasks(tasks, labels)
    examples, batch, errors = attach_feature_batch(examples, runtime)   # cached features
    result = train_model(examples, runtime.label_space(labels), batch,
                         backbone=runtime.backbone, progress=job_meta_update)
    save_model(result.model, out_dir, metrics=result.metrics)

Training never re-encodes images: it takes feature tensors (an
:class:`~backend.features.EncodedImages`). The loop is :func:`worker.training.fit.fit`: AdamW, fixed seeds, CUDA when available (``train.device``), deterministic on the CPU
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

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from backend.backbones import resolve_device
from backend.errors import ConfigError
from backend.features import EncodedImages
from backend.labels import LabelSpace
from backend.model.batched import in_batches
from backend.model.calibration import fit_calibration, fit_options
from backend.model.checkpoint import TrainedModel
from backend.model.config import CalibrationSettings, LossSettings, ModelSettings, TrainSettings
from backend.model.cooccurrence import CooccurrenceStats
from backend.model.sigrl import SigRL, label_graph
from backend.model.zeroshot import similarity as zero_shot_similarity
from backend.settings import Settings, get_settings

from .data import Example, targets
from .fit import Progress, fit, observed_auc, predict_logits, sample_known, split_indices
from .losses import PartialLabelLoss, label_similarity

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: TrainedModel
    metrics: dict  # held-out metrics (partial labels of the validation split)
    summary: dict
    history: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------- helpers
def feature_tensors(examples: Sequence[Example], features) -> EncodedImages:
    """Every feature of the examples' images as one :class:`EncodedImages`, from an
    EncodedImages, a list of Features, or a tuple ``(global, local)`` of aligned features
    only (then the native features are the aligned ones, as for a backbone whose native
    space is aligned)."""
    if isinstance(features, EncodedImages):
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


def calibrate_init(module: SigRL, features: EncodedImages, H, global_weight: float, top_k: int,
                   density: float, batch_size: int) -> None:
    """Shift the fresh model's logits (bias, in logit units) so that a ``density`` share of
    the training image–label pairs starts positive. A shift common to all labels: the
    ranking is still exactly the zero-shot model's (and the shifted model is the zero-shot
    model the heads may later be shrunk towards)."""
    with torch.no_grad():
        sims = in_batches(lambda part, _: zero_shot_similarity(part.global_, part.local, H, global_weight, top_k),
                          features, batch_size)
        z = module.log_scale.exp() * (sims.flatten() - module.centre)
        q = min(max(1.0 - density, 0.05), 0.95)
        module.bias.fill_(-float(torch.quantile(z[: 2_000_000], q)))
        module.set_zero_shot_offset()


def choose_heads_weight(module: SigRL, forward, features: EncodedImages, embeddings, Y, val_idx,
                        weights: Sequence[float], device, batch_size: int,
                        tolerance: float) -> tuple[float, dict]:
    """Shrink the trained heads towards the zero-shot model: the largest ``w`` of ``weights``
    whose held-out :func:`observed_auc` of ``w z_heads + (1 − w) z_zero-shot`` is within
    ``tolerance`` of the best (a difference below it is the split's noise, and a blend with
    the weak zero-shot scores costs calibration). Returns (w, {w: score}); ``w = 1`` without
    a validation split."""
    if len(val_idx) == 0 or not weights:
        return 1.0, {}
    with torch.no_grad():
        module.heads_weight.fill_(1.0)
        heads = predict_logits(module, forward, features, val_idx, device, batch_size)
        emb = embeddings.to(device)
        zs = predict_logits(module, lambda b, k: (module.zero_shot_logits(b, emb),), features, val_idx, device,
                            batch_size)
    scores = {}
    for w in sorted(set(float(x) for x in weights)):
        scores[w] = observed_auc(w * heads + (1.0 - w) * zs, Y[val_idx])
    finite = {w: v for w, v in scores.items() if not math.isnan(v)}
    if not finite:
        return 1.0, scores
    best = max(finite.values())
    chosen = max(w for w, v in finite.items() if v >= best - tolerance)
    module.heads_weight.fill_(chosen)
    return chosen, scores


def fit_model_calibration(module: SigRL, forward, features: EncodedImages, Y, idx, names, ccfg: CalibrationSettings,
                          device, seed: int, batch_size: int) -> dict:
    """Calibrations of the image-only outputs and (when the expert is active) of the outputs
    given known labels, fitted on the images ``idx`` (held out from training).

    Known-label outputs are fitted on held-out images with at least two observed labels: in
    turn, a random non-empty proper subset of the observed labels is given as known and the
    other observed labels are the targets (the known ones do not count)."""
    out: dict = {}
    kw = fit_options(ccfg)
    visual = predict_logits(module, forward, features, idx, device, batch_size, which=2)
    out["visual"] = fit_calibration(visual, Y[idx], names, **kw)
    if float(module.known_active) > 0:
        generator = torch.Generator().manual_seed(seed + 7)
        y = Y[idx]
        rows = (y.sum(1) >= 2).nonzero().flatten()
        if len(rows) >= 2:
            zs, ys, ms = [], [], []
            for _ in range(ccfg.conditional_samples):
                known = sample_known(y[rows], 1.0, generator)
                z = predict_logits(module, forward, features, idx[rows], device, batch_size, known=known)
                zs.append(z)
                ys.append(y[rows])
                ms.append(1.0 - known)
            # One target left in many images is how these samples are drawn, not single-positive annotation.
            out["conditional"] = fit_calibration(torch.cat(zs), torch.cat(ys), names, torch.cat(ms), **kw,
                                                 single_positive=False)
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

    ``features``: ``(global [N, D], local [N, P, D])`` aligned with ``examples``, an
    :class:`~backend.features.EncodedImages` or a list of :class:`~backend.features.Features`.
    ``backbone``: the Backbone that made the features (or a dict with ``name``,
    ``fingerprint``, ``zero_shot_scale``, ``zero_shot_bias``). ``progress`` receives one dict
    per epoch: ``{"stage": "train", "epoch", "epochs", "loss", "val_auc", "seconds"}``
    (``val_auc``: the model-selection criterion, :func:`observed_auc`), then
    ``{"stage": "trained", ...}``."""
    settings = settings or get_settings()
    mcfg, lcfg, tcfg = model_cfg or settings.model, loss_cfg or settings.loss, train_cfg or settings.train
    seed = tcfg.seed if seed is None else int(seed)
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
    batch = settings.scoring.batch_size
    train_idx, val_idx = split_indices(len(examples), tcfg.val_fraction, seed, tcfg.min_val_images,
                                       tcfg.min_split_images)
    stats_train = CooccurrenceStats.from_label_sets([examples[i].positives for i in train_idx.tolist()])
    module, graph, H, feats = build_heads(feats, Y, train_idx, space, stats_train, mcfg, info, seed, device,
                                          fit_rows=tcfg.projection_fit_rows, batch_size=batch)
    forward = heads_forward(module, H.to(device), graph)
    zero_shot = zero_shot_targets(feats, H, settings.zero_shot, info, batch) if lcfg.kind == "em_pl" else None
    outcome = fit(module, forward, feats, Y, train_idx, val_idx, PartialLabelLoss(lcfg, label_similarity(
        lcfg, names, H, taxonomy)), tcfg, seed=seed, device=device, zero_shot=zero_shot,
        known_rate=tcfg.known_rate if mcfg.use_known else 0.0,
        recon_weight=lcfg.reconstruction_weight if mcfg.use_svfr else 0.0, conditional_loss=conditional_loss(lcfg),
        progress=progress, desc="train SigRL", show_progress=show_progress)
    # The known-label expert is used only when training gave it enough to learn from
    # (single-positive data: never — an image needs two chosen labels to give one as known).
    known_active = mcfg.use_known and outcome.known_samples >= max(1, tcfg.min_known_samples)
    module.known_active.fill_(1.0 if known_active else 0.0)
    heads_weight, shrink_scores = choose_heads_weight(module, forward, feats, H, Y, val_idx, tcfg.shrink_weights,
                                                      device, batch, tcfg.shrink_tolerance)
    calibration = calibrate(module, forward, feats, Y, train_idx, val_idx, names, settings.calibration, device, seed,
                            batch)
    module.cpu()
    metrics = held_out_metrics(module, graph.to("cpu"), H, feats, Y, val_idx, names, batch)
    metrics["observed_auc"] = outcome.best_val_score if len(val_idx) else None
    summary = training_summary(Y, train_idx, val_idx, outcome, known_active, heads_weight, shrink_scores, calibration)
    summary.update(total_seconds=round(time.perf_counter() - t_start, 3), device=str(device), seed=seed)
    model = TrainedModel(
        module=module, labels=list(names), stats=CooccurrenceStats.from_label_sets([e.positives for e in examples]),
        backbone={k: info[k] for k in ("name", "fingerprint") if k in info}
        | {"dim": int(module.dim), "native_dim": int(module.native_dim)},
        loss=lcfg.model_dump(), train=tcfg.model_dump(), seed=seed, summary=summary,
        taxonomy=dict(taxonomy.parent) if taxonomy is not None else None, calibration=calibration,
    )
    if progress:
        progress({"stage": "trained", **{k: summary[k] for k in ("epochs_run", "best_epoch", "train_seconds")},
                  "val_map": metrics.get("mAP")})
    return TrainResult(model, metrics, summary, outcome.history)


def conditional_loss(lcfg: LossSettings) -> PartialLabelLoss:
    """The known-label expert's loss: ``loss.conditional_kind``, without the semantic and
    ranking terms (they shape the visual scores, not P(c | known labels))."""
    return PartialLabelLoss(lcfg.model_copy(update={"kind": lcfg.conditional_kind, "semantic": False,
                                                     "ranking_weight": 0.0}))


def training_summary(Y, train_idx, val_idx, outcome, known_active: bool, heads_weight: float, shrink_scores: dict,
                     calibration: dict) -> dict:
    """What :attr:`TrainResult.summary` says of the data, the epochs and the choices after them."""
    return {
        "images": int(Y.shape[0]), "train_images": int(len(train_idx)), "val_images": int(len(val_idx)),
        "labels": int(Y.shape[1]), "labels_with_examples": int((Y.sum(0) > 0).sum()), "positives": int(Y.sum()),
        "epochs_run": outcome.epochs_run, "best_epoch": outcome.best_epoch,
        "selection": "held-out ROC-AUC of observed labels", "known_samples": outcome.known_samples,
        "known_expert": bool(known_active), "heads_weight": heads_weight,
        "shrink_scores": {str(k): (round(v, 5) if not math.isnan(v) else None) for k, v in shrink_scores.items()},
        "observation_rate": round(calibration["visual"].shared_rate, 4),
        "train_seconds": round(outcome.seconds, 3), "train_cpu_seconds": round(outcome.cpu_seconds, 3),
    }


def build_heads(feats: EncodedImages, Y, train_idx, space: LabelSpace, stats, mcfg: ModelSettings, info: dict,
                seed: int, device, *, fit_rows: int, batch_size: int) -> tuple[SigRL, object, torch.Tensor, EncodedImages]:
    """(fresh SigRL on ``device`` — feature statistics from the training images, logits
    shifted to the label density —, its label graph on ``device``, the text embeddings
    ``H [C, D]`` on the CPU, and ``feats`` with their native parts reduced by the
    projections' fixed part: done once here, not in every training step)."""
    torch.manual_seed(seed)
    native_dim = int(feats.native_global.shape[1])
    module = SigRL(feats.global_.shape[1], mcfg, info["zero_shot_scale"], info["zero_shot_bias"], native_dim)
    module.fit_feature_stats(feats[train_idx], fit_rows)
    H = space.embeddings.float()
    density = float(Y[train_idx].sum(1).mean() / max(1, len(space.names)))
    calibrate_init(module, feats[train_idx], H, mcfg.global_weight, mcfg.local_top_k, density, batch_size)
    reduced = module.reduce_native(feats, batch_size)
    module.to(device)
    return module, label_graph(stats, space.names, H, mcfg).to(device), H, reduced


def heads_forward(module: SigRL, H, graph) -> Callable:
    """:func:`~worker.training.fit.fit`'s ``forward`` for the SigRL heads: while training,
    the logits at the heads' own scale (what the loss trains), else the output logits."""

    def forward(batch, known, targets=None):
        out = module(batch, H, graph, known, targets=targets, train_known=module.training)
        if module.training:
            return out.head_logits, out.reconstruction_loss, out.head_visual, out.cooc_logits
        return out.logits, out.reconstruction_loss, out.visual_logits, out.cooc_logits

    return forward


def zero_shot_targets(feats: EncodedImages, H, zs_cfg, info: dict, batch_size: int) -> torch.Tensor:
    """``[N, C]`` zero-shot probabilities of the training images (the ``em_pl`` loss's
    pseudo-labels)."""
    from backend.model.zeroshot import zero_shot_probs

    return in_batches(
        lambda part, _: zero_shot_probs(part.global_, part.local, H, global_weight=zs_cfg.global_weight,
                                        top_k=zs_cfg.local_top_k, scale=info["zero_shot_scale"],
                                        bias=info["zero_shot_bias"]),
        feats, batch_size)


def calibrate(module, forward, feats, Y, train_idx, val_idx, names, ccfg: CalibrationSettings, device,
              seed: int, batch_size: int) -> dict:
    """:func:`fit_model_calibration` on the held-out split; without one (tiny projects), a
    shared map only, fitted on the training images (per-label maps would fit their own noise)."""
    if len(val_idx) > 0:
        return fit_model_calibration(module, forward, feats, Y, val_idx, names, ccfg, device, seed, batch_size)
    shared_only = ccfg.model_copy(update={"shrinkage": 1e6, "rate_shrinkage": 1e6})
    return fit_model_calibration(module, forward, feats, Y, train_idx, names, shared_only, device, seed,
                                 batch_size)


def held_out_metrics(module, graph, H, feats: EncodedImages, Y, val_idx, names, batch_size: int) -> dict:
    """Metrics on the validation split of the partial labels (what model selection saw)."""
    from worker.eval.evaluate import evaluate_outputs

    if len(val_idx) == 0:
        return {"split": "none (fewer than train.min_split_images examples)", "images": 0}

    def forward(batch, known, targets=None):
        return module(batch, H, graph, known).logits, None, None

    logits = predict_logits(module, forward, feats, val_idx, torch.device("cpu"), batch_size)
    out = evaluate_outputs(logits, Y[val_idx], names, ks=(1, 3, 5))
    out.pop("AP_per_label", None)
    return {"mAP": out.pop("mAP"), **out, "split": "held-out partial labels"}
