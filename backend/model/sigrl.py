"""The SigRL heads: visual adapter + GMC + SVFR + known-label conditioning.

Every parameter is a function of label *embeddings* or of image features — there is no
per-label weight row — so a trained model scores any label list, including labels added to
the Label Studio config after training (they enter through their text embedding, GMC's text
edges and zero co-occurrence counts).

Pieces (each can be switched off for ablations, ``configs: model``):

- **visual adapter**: features are standardised with statistics of the training features
  (buffers), passed through a residual MLP whose last layer starts at zero:
  ``g' = normalise(g + MLP(std(g)))``, likewise for every local feature;
- **GMC** (:mod:`.gmc`): ``Ĥ = GMC(H, graph)``;
- **SVFR** (:mod:`.svfr`): the similarity ``s [B, C]`` from global, local top-k and
  label-specific features, plus a reconstruction loss. Without SVFR, ``s = ⟨g', ĥ_c⟩``;
- **calibration**: ``z_c = e^{σ} (s_c − s_0) + b + ⟨w_b, ĥ_c⟩``, with ``e^{σ}`` and ``s_0`` the
  backbone's zero-shot calibration and ``b = 0``, ``w_b = 0`` at first, so a fresh model *is*
  the zero-shot model (training moves ``b`` to the label density first);
- **known labels** K (chosen by the annotator): a product of experts. A co-occurrence expert
  predicts each label from the known labels alone, ``u_c = b + mean_{j∈K} ⟨W ĥ_j, ĥ_c⟩ +
  γ_1 mean_{j∈K} P(c|j) + γ_2 log mean_{j∈K} P̂(c|j)`` — a learnable compatibility through the
  GMC output plus the co-occurrence counts (``P̂(c|j) = (M_jc + P̂(c)) / (N_j + 1)``,
  ``P̂(c) = (N_c + 1) / (n + 2)``) — and the visual logit is moved by its evidence beyond the
  prior: ``z_c += u_c − logit P̂(c)`` (0 for labels without counts). The expert is trained on
  its own (from the known labels to the other chosen labels, counts leaving the training
  image out), so it never learns to correct the visual model's in-sample confidence. With no
  known labels the model is the visual model;
- **labels without training annotations** are scored through the trained heads on the
  backbone's unadapted features (:meth:`SigRL.score_unseen`), so an added label keeps its
  zero-shot quality instead of inheriting an adaptation made for other labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelSettings
from .gmc import GMC, LabelGraph
from .svfr import SVFR


class FeatureNorm(nn.Module):
    """Per-dimension standardisation with fixed statistics (set once from training data)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp(min=1e-4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Adapter(nn.Module):
    """``normalise(x + MLP(std(x)))`` with the MLP's last layer at zero."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.norm = FeatureNorm(dim)
        self.hidden = hidden
        if hidden > 0:
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_hidden(x)[0]

    def forward_with_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(adapted features, the MLP's hidden activation or None)."""
        if self.hidden <= 0:
            return x, None
        first = self.mlp[0]
        # The standardisation folded into the first layer: W (x − μ)/σ = (W/σ) x − (W/σ) μ.
        weight = first.weight / self.norm.std
        h = self.mlp[2](self.mlp[1](F.linear(x, weight, first.bias - weight @ self.norm.mean)))
        return F.normalize(x + self.mlp[3](h), dim=-1), h


@dataclass
class SigRLOutput:
    logits: torch.Tensor  # [B, C] (with the known-label term when known was given)
    visual_logits: torch.Tensor  # [B, C] image only
    reconstruction_loss: torch.Tensor  # scalar (0 without SVFR)
    label_embeddings: torch.Tensor  # [C, D] Ĥ
    cooc_logits: torch.Tensor | None = None  # [B, C] co-occurrence expert (with known labels)


class SigRL(nn.Module):
    def __init__(self, dim: int, cfg: ModelSettings, zero_shot_scale: float, zero_shot_bias: float):
        super().__init__()
        self.dim = dim
        self.cfg = cfg
        self.global_adapter = Adapter(dim, cfg.adapter_hidden, cfg.adapter_dropout)
        self.local_adapter = Adapter(dim, cfg.adapter_hidden, cfg.adapter_dropout)
        self.gmc = GMC(dim, cfg.gat_hidden, cfg.gat_heads, cfg.dropout) if cfg.use_gmc else None
        self.svfr = (
            SVFR(dim, cfg.attn_dim, cfg.adapter_hidden or None, cfg.local_top_k, cfg.global_weight,
                 cfg.recon_temperature, cfg.chunk_size)
            if cfg.use_svfr
            else None
        )
        # z = e^{log_scale} (s − centre) + bias + ⟨label_bias, ĥ_c⟩; bias in logit units.
        self.log_scale = nn.Parameter(torch.tensor(float(zero_shot_scale)).log())
        self.register_buffer("centre", torch.tensor(float(zero_shot_bias)))
        self.bias = nn.Parameter(torch.zeros(()))
        self.label_bias = nn.Parameter(torch.zeros(dim))
        if cfg.use_known:
            self.compat = nn.Linear(dim, dim, bias=False)
            nn.init.zeros_(self.compat.weight)
            self.gamma_cond = nn.Parameter(torch.tensor(float(cfg.known_cooc_init)))
            self.gamma_lift = nn.Parameter(torch.tensor(float(cfg.known_cooc_init)))
            self.cooc_bias = nn.Parameter(torch.zeros(()))

    # -- pieces ----------------------------------------------------------------------------
    def fit_feature_stats(self, global_: torch.Tensor, local: torch.Tensor) -> None:
        self.global_adapter.norm.fit(global_)
        self.local_adapter.norm.fit(local)

    def label_embeddings(self, embeddings: torch.Tensor, graph: LabelGraph) -> torch.Tensor:
        """``Ĥ [C, D]``: the GMC output (the text embeddings themselves without GMC)."""
        if self.gmc is None:
            return F.normalize(embeddings, dim=-1)
        return self.gmc(embeddings, graph)

    def known_matrix(self, label_embeddings: torch.Tensor, graph: LabelGraph) -> torch.Tensor | None:
        """``S [C, C]``, ``S[j, c] = ⟨W ĥ_j, ĥ_c⟩``: the learned part of the support that known
        label j gives label c (diagonal 0). The count-based part is in :meth:`cooc_logits`."""
        if not self.cfg.use_known:
            return None
        S = self.compat(label_embeddings) @ label_embeddings.T
        return S * (1.0 - torch.eye(S.shape[0], device=S.device, dtype=S.dtype))

    def cooc_logits(self, known, S, graph: LabelGraph, targets=None):
        """The co-occurrence expert: logit of P(c | known labels) ``[B, C]``, from the known
        labels alone (no image): ``b + mean_j S[j, c] + γ₁ mean_j P(c|j) + γ₂ log mean_j P̂(c|j)``.

        ``targets [B, C]``: the images' own annotated labels when they are part of the
        counts (training): they are left out of ``M``, ``N`` and ``n`` (leave-one-out)."""
        w = known / known.sum(1, keepdim=True).clamp(min=1.0)  # [B, C(j)]
        z = self.cooc_bias + w @ S
        if graph.counts is None:
            return z
        M, N = graph.pairs, graph.counts
        y = targets if targets is not None else torch.zeros_like(known)
        in_counts = (y.sum(1, keepdim=True) > 0).to(w.dtype)
        Nj = N[None, :] - y * known  # the known labels' counts without this image
        # mean_j P(c | j) = Σ_j w_j (M_jc − y_c) / N_j  (a known j with no other example: 0)
        inv = torch.where(Nj > 0, w / Nj.clamp(min=1e-6), torch.zeros_like(w))
        cond = inv @ M - y * inv.sum(1, keepdim=True)
        # smoothed: P̂(c | j) = (M_jc + P̂(c)) / (N_j + 1), P̂(c) = (N_c + 1) / (n + 2)
        prior = self.count_prior(graph, y, in_counts)
        inv_s = w / (Nj + 1.0)
        smooth = inv_s @ M - y * inv_s.sum(1, keepdim=True) + prior * inv_s.sum(1, keepdim=True)
        return z + self.gamma_cond * cond + self.gamma_lift * torch.log(smooth.clamp(min=1e-6))

    @staticmethod
    def count_prior(graph: LabelGraph, y=None, in_counts=None):
        """``P̂(c) = (N_c + 1) / (n + 2)`` (leaving out the images whose labels are ``y``)."""
        if y is None:
            return (graph.counts + 1.0) / (graph.n_images + 2.0)
        return (graph.counts[None, :] - y + 1.0) / (graph.n_images - in_counts + 2.0)

    def known_term(self, known, S, graph: LabelGraph, targets=None, cooc=None):
        """``[B, C]`` logit change given ``known [B, C]`` (0/1): the product of the visual
        expert and the co-occurrence expert, ``z_c += cooc_c − logit P̂(c)`` (0 for images
        without known labels and for labels without counts)."""
        if cooc is None:
            cooc = self.cooc_logits(known, S, graph, targets)
        has = (known.sum(1, keepdim=True) > 0).to(cooc.dtype)
        if graph.counts is None:
            return cooc * has
        prior = self.count_prior(graph).clamp(1e-6, 1 - 1e-6)
        seen = graph.seen.to(cooc.dtype)[None, :]
        return (cooc - torch.logit(prior)[None, :]) * has * seen

    def visual(self, global_, local, label_embeddings, chunk_size=None, adapt: bool = True):
        """(logits ``[B, C]``, reconstruction loss). ``adapt=False`` scores the backbone's own
        features (no residual adaptation) with the trained heads: the path for labels
        without training annotations."""
        g = self.global_adapter(global_) if adapt else global_
        if self.svfr is not None:
            l, hidden = self.local_adapter.forward_with_hidden(local)
            if not adapt:
                l = local
            out = self.svfr(g, l, label_embeddings, target=local, chunk_size=chunk_size, key_input=hidden)
            sim, recon = out.similarity, out.reconstruction_loss
        else:
            sim, recon = g @ label_embeddings.T, g.new_zeros(())
        offset = self.bias + label_embeddings @ self.label_bias  # [C]
        return self.log_scale.exp() * (sim - self.centre) + offset[None, :], recon

    def score_unseen(self, visual, global_, local, H, seen, chunk_size=None):
        """Labels never annotated in training get ``(1 − w)·z_adapted + w·z_unadapted``
        (``w = unseen_raw_weight``): the trained GMC/SVFR heads on the backbone's own features,
        whose text alignment the adapter was not trained to keep for other labels."""
        w = float(self.cfg.unseen_raw_weight)
        unseen = (~seen.bool()).nonzero().flatten()
        if w <= 0 or unseen.numel() == 0:
            return visual
        raw, _ = self.visual(global_, local, H[unseen], chunk_size, adapt=False)
        visual = visual.clone()
        visual[:, unseen] = (1.0 - w) * visual[:, unseen] + w * raw
        return visual

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self,
        global_: torch.Tensor,
        local: torch.Tensor,
        embeddings: torch.Tensor,
        graph: LabelGraph,
        known: torch.Tensor | None = None,
        chunk_size: int | None = None,
        targets: torch.Tensor | None = None,
    ) -> SigRLOutput:
        """Logits of images (``global_ [B, D]``, ``local [B, P, D]``) for labels with text
        embeddings ``[C, D]`` and their graph; ``known [B, C]`` 0/1 labels already chosen;
        ``targets``: the images' annotated labels when they are in the graph's counts
        (training; see :meth:`known_term`). Labels the graph marks unseen go through
        :meth:`score_unseen`."""
        H = self.label_embeddings(embeddings, graph)
        S = self.known_matrix(H, graph) if known is not None else None
        return self.score(global_, local, H, graph, known, S, chunk_size, targets)

    def score(self, global_, local, H, graph: LabelGraph, known=None, S=None, chunk_size=None,
              targets=None) -> SigRLOutput:
        """The heads given the GMC output ``H`` (and known-label matrix ``S``) of a label
        space — what :meth:`forward` does after GMC; the predictor caches ``H`` and ``S``."""
        visual, recon = self.visual(global_, local, H, chunk_size)
        if graph.seen is not None:
            visual = self.score_unseen(visual, global_, local, H, graph.seen, chunk_size)
        logits = visual
        if known is not None and self.cfg.use_known:
            if S is None:
                S = self.known_matrix(H, graph)
            cooc = self.cooc_logits(known, S, graph, targets)
            logits = visual + self.known_term(known, S, graph, targets, cooc)
            return SigRLOutput(logits, visual, recon, H, cooc)
        return SigRLOutput(logits, visual, recon, H)


def label_graph(stats, names, embeddings: torch.Tensor, cfg: ModelSettings) -> LabelGraph:
    """The GMC graph and pair statistics of a label list, from co-occurrence counts stored by
    name (labels the counts do not know get text edges only)."""
    from .gmc import build_label_graph

    graph = build_label_graph(
        embeddings,
        stats.conditional(names),
        stats.npmi(names),
        tau=cfg.cooc_threshold,
        p=cfg.cooc_reweight,
        text_blend=cfg.text_blend,
        max_neighbours=cfg.max_neighbours,
    )
    pairs, counts = stats.matrices(names)
    graph.pairs, graph.counts, graph.n_images = pairs, counts, torch.tensor(float(stats.n_images))
    graph.seen = counts > 0
    return graph
