"""Typed configuration of the SigRL model, its losses, training, suggestions and benchmark.

The numbers live in ``configs/default.yaml`` (sections ``model``, ``loss``, ``train``,
``calibration``, ``suggest``, ``scoring``, ``bench``) and only there: these classes give them
types and bounds, never a default. A trained
model stores its own :class:`ModelSettings` and :class:`LossSettings` in ``model.json``, so
later changes to the configuration never change how a saved model scores.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..sections import Section


class ModelSettings(Section):
    """Architecture of the heads (see ``backend/model/sigrl.py``)."""

    # Projection of the backbone's native features into the label space (NativeProjection):
    # a zero-initialised linear map plus an optional residual MLP (adapter_hidden, 0: none) on
    # standardised features, reduced first to their top-r principal directions (0: all).
    adapter_hidden: int = Field(ge=0)
    adapter_dropout: float = Field(ge=0.0, lt=1.0)
    native_global_rank: int = Field(ge=0)
    native_local_rank: int = Field(ge=0)
    # Scale of the heads' cosine scores in training (their output is mapped back to the
    # zero-shot scale, and calibrated after training).
    logit_scale: float = Field(gt=0.0)
    # GMC: two GATv2 layers over the label graph.
    use_gmc: bool
    gat_heads: int = Field(ge=1)
    gat_hidden: int = Field(ge=1)
    dropout: float = Field(ge=0.0, lt=1.0)
    cooc_threshold: float = Field(ge=0.0, le=1.0)  # τ of ML-GCN
    cooc_reweight: float = Field(ge=0.0, le=1.0)  # p of ML-GCN
    text_blend: float = Field(ge=0.0, le=1.0)  # λ: weight of text similarity in edges
    max_neighbours: int = Field(ge=1)
    # SVFR: label-guided attention over the local features, reconstruction, scoring.
    use_svfr: bool
    attn_dim: int = Field(ge=1)
    local_top_k: int = Field(ge=1)
    global_weight: float = Field(ge=0.0, le=1.0)
    recon_temperature: float = Field(gt=0.0)
    chunk_size: int = Field(ge=1)
    # Conditioning on the labels an annotator already chose.
    use_known: bool
    known_cooc_init: float
    # Labels without training annotations: weight of the unadapted-feature path (0..1).
    unseen_raw_weight: float = Field(ge=0.0, le=1.0)
    # ... and of the evidence its trained graph neighbours explain away (0: off).
    unseen_explain_away: float = Field(ge=0.0)


class LossSettings(Section):
    """Partial-label loss, semantic loss and auxiliary terms (see ``worker/training/losses.py``)."""

    kind: Literal["an_ls", "em", "em_pl"]
    smoothing: float = Field(ge=0.0, lt=1.0)  # AN-LS ε
    em_alpha: float = Field(ge=0.0)  # EM α
    pl_threshold: float = Field(ge=0.0, le=1.0)  # θ: zero-shot probability for a pseudo-positive
    pl_weight: float = Field(ge=0.0)
    semantic: bool
    semantic_beta: float = Field(ge=0.0, le=1.0)  # β of b3p
    semantic_source: Literal["taxonomy", "text"]
    semantic_temperature: float = Field(gt=0.0)  # taxonomy: LCA steps
    semantic_text_temperature: float = Field(gt=0.0)  # text: (1 − cos) units
    ranking_weight: float = Field(ge=0.0)
    reconstruction_weight: float = Field(ge=0.0)
    # Loss of the known-label term (trained on the labels held out from the known ones).
    conditional_kind: Literal["an_ls", "em", "em_pl"]


class CalibrationSettings(Section):
    """Per-label calibration of trained outputs (``backend/model/calibration.py``)."""

    # Pseudo-count of the shrinkage of a label's calibration towards the shared one: a label
    # with n held-out observed positives gets weight n / (n + shrinkage) on its own fit.
    shrinkage: float = Field(ge=0.0)
    # Observation rate (share of present labels an annotator chooses): its floor, and the
    # pseudo-count of its shrinkage towards the shared rate (larger: a rate is weakly
    # identified per label, and a property of how a project is annotated more than of a label).
    min_observation_rate: float = Field(gt=0.0, le=1.0)
    rate_shrinkage: float = Field(ge=0.0)
    # L2 pull of the slope/offset towards 1/0 (in units of held-out images), so few data
    # cannot produce extreme calibrations.
    prior_strength: float = Field(ge=0.0)
    # Where scores rank nothing only c·P(label) is identified; the weak pull goes to this rate.
    rate_prior: float = Field(gt=0.0, lt=1.0)
    iterations: int = Field(ge=10)
    # Single-positive annotation (this share of labelled images with exactly one chosen label):
    # the pooled rate comes from the held-out scores' distribution (Best Bin Estimation,
    # confidence delta, slack gamma), not from the likelihood.
    single_positive_share: float = Field(gt=0.0)
    bbe_delta: float = Field(gt=0.0, lt=1.0)
    bbe_gamma: float = Field(ge=0.0)
    # Known-label (conditional) outputs: held-out positives given as known per image, in turns.
    conditional_samples: int = Field(ge=1)


class TrainSettings(Section):
    lr: float = Field(gt=0.0)
    weight_decay: float = Field(ge=0.0)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    patience: int = Field(ge=1)
    val_fraction: float = Field(ge=0.0, lt=1.0)
    # At least this many validation images whenever there are 2x as many examples (small
    # projects still get a held-out check, calibration and shrinkage towards zero-shot).
    min_val_images: int = Field(ge=0)
    # Weights of the trained heads against the zero-shot model tried on held-out data
    # (z = w z_heads + (1 - w) z_zero_shot); the largest w within shrink_tolerance of the best
    # held-out score wins.
    shrink_weights: list[float]
    # The largest shrink weight within this much held-out observed-label AUC of the best.
    shrink_tolerance: float = Field(ge=0.0)
    # Minimum number of training images with known labels sampled before the known-label
    # expert is used at inference (below it the expert contributes nothing).
    min_known_samples: int = Field(ge=0)
    seed: int
    known_rate: float = Field(ge=0.0, le=1.0)
    # Exponential moving average of the weights (per step); validation and the saved model
    # use the average. 0 disables it.
    ema_decay: float = Field(ge=0.0, lt=1.0)
    device: str
    threads: int = Field(ge=0)
    # Rows (images x locations) the native-feature statistics and principal bases are fitted on.
    projection_fit_rows: int = Field(ge=100)
    # Fewer examples than this: no validation split at all.
    min_split_images: int = Field(ge=0)
    # Training features up to this size are moved to the device once, larger ones per batch.
    max_device_mb: float = Field(ge=0.0)


class SpotSettings(Section):
    add: int = Field(ge=0)
    listed: int = Field(ge=1)
    min_probability: float = Field(ge=0.0, le=1.0)
    point_sigma: float = Field(gt=0.0)
    local_gain: float = Field(ge=0.0)


class SuggestSettings(Section):
    top_k: int = Field(ge=1)
    neighbours: int = Field(ge=0)
    min_probability: float = Field(ge=0.0, le=1.0)
    co_occurring: int = Field(ge=0)
    spot: SpotSettings


class ScoringSettings(Section):
    """Batched forwards of the heads (serving, evaluation, training's held-out predictions)."""

    batch_size: int = Field(ge=1)
    # Label graphs (one per label set) a served model keeps ready.
    graph_cache: int = Field(ge=1)


class BenchSettings(Section):
    train_images: int = Field(ge=10)
    test_images: int = Field(ge=10)
    seed: int
    seeds: list[int]  # training seeds; figures are their mean
    partial_keep: float = Field(gt=0.0, le=1.0)
    hidden_seed: int
    validation_seed: int  # complete-label validation mosaics (training-file items)
    outfits: str
    taxonomy: str
    class_temperature: float = Field(gt=0.0)
    timing_repeats: int = Field(ge=1)
    recall_k: int = Field(ge=1)
    unseen_labels: list[str]
    ece_bins: int = Field(ge=2)
    ece_binning: Literal["equal_mass", "equal_width"]
    probe_lr: list[float]
    probe_weight_decay: list[float]
    # The targets every run is checked against (worker/bench/summary.py), and the training-time one.
    goals: dict[str, float | dict[str, float]]
    train_seconds_goal: float = Field(gt=0.0)
