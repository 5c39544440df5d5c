"""Typed configuration of the SigRL model, its losses, training, suggestions and benchmark.

The numbers live in ``configs/default.yaml`` (sections ``model``, ``loss``, ``train``,
``suggest``, ``bench``); these classes only give them types and document them. A trained
model stores its own :class:`ModelSettings` and :class:`LossSettings` in ``model.json``, so
later changes to the configuration never change how a saved model scores.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow")


class ModelSettings(_Section):
    """Architecture of the heads (see ``backend/model/sigrl.py``)."""

    # Projection of the backbone's native features into the label space (NativeProjection):
    # a zero-initialised linear map plus an optional residual MLP (adapter_hidden, 0: none) on
    # standardised features, reduced first to their top-r principal directions (0: all).
    adapter_hidden: int = Field(128, ge=0)
    adapter_dropout: float = Field(0.3, ge=0.0, lt=1.0)
    native_global_rank: int = Field(0, ge=0)
    native_local_rank: int = Field(128, ge=0)
    # Scale of the heads' cosine scores in training (their output is mapped back to the
    # zero-shot scale, and calibrated after training).
    logit_scale: float = Field(14.0, gt=0.0)
    # GMC: two GATv2 layers over the label graph.
    use_gmc: bool = True
    gat_heads: int = Field(4, ge=1)
    gat_hidden: int = Field(32, ge=1)
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    cooc_threshold: float = Field(0.4, ge=0.0, le=1.0)  # τ of ML-GCN
    cooc_reweight: float = Field(0.2, ge=0.0, le=1.0)  # p of ML-GCN
    text_blend: float = Field(0.5, ge=0.0, le=1.0)  # λ: weight of text similarity in edges
    max_neighbours: int = Field(64, ge=1)
    # SVFR: label-guided attention over the local features, reconstruction, scoring.
    use_svfr: bool = True
    attn_dim: int = Field(64, ge=1)
    local_top_k: int = Field(3, ge=1)
    global_weight: float = Field(0.6, ge=0.0, le=1.0)
    recon_temperature: float = Field(10.0, gt=0.0)
    chunk_size: int = Field(64, ge=1)
    # Conditioning on the labels an annotator already chose.
    use_known: bool = True
    known_cooc_init: float = 1.0
    # Labels without training annotations: weight of the unadapted-feature path (0..1).
    unseen_raw_weight: float = Field(1.0, ge=0.0, le=1.0)
    # ... and of the evidence its trained graph neighbours explain away (0: off).
    unseen_explain_away: float = Field(0.0, ge=0.0)


class LossSettings(_Section):
    """Partial-label loss, semantic loss and auxiliary terms (see ``worker/losses.py``)."""

    kind: Literal["an_ls", "em", "em_pl"] = "em"
    smoothing: float = Field(0.1, ge=0.0, lt=1.0)  # AN-LS ε
    em_alpha: float = Field(0.1, ge=0.0)  # EM α
    pl_threshold: float = Field(0.5, ge=0.0, le=1.0)  # θ: zero-shot probability for a pseudo-positive
    pl_weight: float = Field(1.0, ge=0.0)
    semantic: bool = False
    semantic_beta: float = Field(0.9, ge=0.0, le=1.0)  # β of b3p
    semantic_source: Literal["taxonomy", "text"] = "taxonomy"
    semantic_temperature: float = Field(1.0, gt=0.0)  # taxonomy: LCA steps
    semantic_text_temperature: float = Field(0.1, gt=0.0)  # text: (1 − cos) units
    ranking_weight: float = Field(0.0, ge=0.0)
    reconstruction_weight: float = Field(0.1, ge=0.0)
    # Loss of the known-label term (trained on the labels held out from the known ones).
    conditional_kind: Literal["an_ls", "em", "em_pl"] = "an_ls"


class CalibrationSettings(_Section):
    """Per-label calibration of trained outputs (``backend/model/calibration.py``)."""

    # Pseudo-count of the shrinkage of a label's calibration towards the shared one: a label
    # with n held-out observed positives gets weight n / (n + shrinkage) on its own fit.
    shrinkage: float = Field(20.0, ge=0.0)
    # Observation rate (share of present labels an annotator chooses): its floor, and the
    # pseudo-count of its shrinkage towards the shared rate (larger: a rate is weakly
    # identified per label, and a property of how a project is annotated more than of a label).
    min_observation_rate: float = Field(0.05, gt=0.0, le=1.0)
    rate_shrinkage: float = Field(200.0, ge=0.0)
    # L2 pull of the slope/offset towards 1/0 (in units of held-out images), so few data
    # cannot produce extreme calibrations.
    prior_strength: float = Field(1.0, ge=0.0)
    # Where scores rank nothing only c·P(label) is identified; the weak pull goes to this rate.
    rate_prior: float = Field(0.95, gt=0.0, lt=1.0)
    iterations: int = Field(200, ge=10)
    # Known-label (conditional) outputs: held-out positives given as known per image, in turns.
    conditional_samples: int = Field(2, ge=1)


class TrainSettings(_Section):
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(64, ge=1)
    patience: int = Field(8, ge=1)
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    # At least this many validation images whenever there are 2x as many examples (small
    # projects still get a held-out check, calibration and shrinkage towards zero-shot).
    min_val_images: int = Field(8, ge=0)
    # Weights of the trained heads against the zero-shot model tried on held-out data
    # (z = w z_heads + (1 - w) z_zero_shot); the best held-out score wins, ties to larger w.
    shrink_weights: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0]
    # Minimum number of training images with known labels sampled before the known-label
    # expert is used at inference (below it the expert contributes nothing).
    min_known_samples: int = Field(20, ge=0)
    seed: int = 0
    known_rate: float = Field(0.5, ge=0.0, le=1.0)
    # Exponential moving average of the weights (per step); validation and the saved model
    # use the average. 0 disables it.
    ema_decay: float = Field(0.95, ge=0.0, lt=1.0)
    device: str = "auto"
    threads: int = Field(0, ge=0)


class SpotSettings(_Section):
    add: int = Field(1, ge=0)
    listed: int = Field(3, ge=1)
    min_probability: float = Field(0.2, ge=0.0, le=1.0)
    point_sigma: float = Field(1.5, gt=0.0)
    local_gain: float = Field(5.0, ge=0.0)


class SuggestSettings(_Section):
    top_k: int = Field(5, ge=1)
    neighbours: int = Field(3, ge=0)
    min_probability: float = Field(0.05, ge=0.0, le=1.0)
    co_occurring: int = Field(3, ge=0)
    spot: SpotSettings = SpotSettings()


class BenchSettings(_Section):
    train_images: int = Field(1000, ge=10)
    test_images: int = Field(1000, ge=10)
    seed: int = 0
    seeds: list[int] = [0, 1, 2]  # training seeds; figures are their mean
    partial_keep: float = Field(0.5, gt=0.0, le=1.0)
    hidden_seed: int = 1
    outfits: str = "bench/fashion_outfits.yaml"
    taxonomy: str = "bench/fashion_taxonomy.yaml"
    class_temperature: float = Field(16.0, gt=0.0)
    timing_repeats: int = Field(3, ge=1)
    recall_k: int = Field(3, ge=1)
    unseen_labels: list[str] = ["Sandal", "Coat"]
    ece_bins: int = Field(15, ge=2)
    ece_binning: Literal["equal_mass", "equal_width"] = "equal_mass"
    probe_lr: list[float] = [0.002, 0.01, 0.05]
    probe_weight_decay: list[float] = [0.0001, 0.01, 0.1]
