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

    # Visual adapter: zero-initialised residual MLP on standardised global/local features.
    adapter_hidden: int = Field(128, ge=0)
    adapter_dropout: float = Field(0.3, ge=0.0, lt=1.0)
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


class TrainSettings(_Section):
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(64, ge=1)
    patience: int = Field(8, ge=1)
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    seed: int = 0
    known_rate: float = Field(0.5, ge=0.0, le=1.0)
    # Exponential moving average of the weights (per step); validation and the saved model
    # use the average. 0 disables it.
    ema_decay: float = Field(0.95, ge=0.0, lt=1.0)
    device: str = "auto"
    threads: int = Field(0, ge=0)


class SuggestSettings(_Section):
    top_k: int = Field(5, ge=1)
    neighbours: int = Field(3, ge=0)
    min_probability: float = Field(0.05, ge=0.0, le=1.0)
    co_occurring: int = Field(3, ge=0)


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
    tune_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    probe_lr: list[float] = [0.002, 0.01, 0.05]
    probe_weight_decay: list[float] = [0.0001, 0.01, 0.1]
