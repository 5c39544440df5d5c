"""The SigRL heads: visual adapter + GMC + SVFR + known-label conditioning.

Every parameter is a function of label *embeddings* or of image features — there is no
per-label weight row — so a trained model scores any label list, including labels added to
the Label Studio config after training (they enter through their text embedding, GMC's text
edges and zero co-occurrence counts).

Pieces (each can be switched off for ablations, ``configs: model``):

- **native projection** (:class:`NativeProjection`): the backbone's native features
  (pooled ``[N]`` and per location ``[P, N]``), standardised with statistics of the training
  features, are projected into the label-embedding space, residually on the text-aligned
  features: ``g' = normalise(g + W std(n) + MLP(std(n)))`` with ``W`` and the MLP's last
  layer zero at first (likewise for every location); for a backbone whose native space is
  the aligned one, ``n = g``;
- **GMC** (:mod:`.gmc`): ``Ĥ = GMC(H, graph)``;
- **SVFR** (:mod:`.svfr`): the similarity ``s [B, C]`` from global, local top-k and
  label-specific features, plus a reconstruction loss. Without SVFR, ``s = ⟨g', ĥ_c⟩``;
- **scale**: the heads score ``z_h = e^{σ} (s_c − s_0) + b + ⟨w_b, ĥ_c⟩`` at their own scale
  (``e^{σ}`` starts at ``model.logit_scale``; ``s_0`` is the backbone's zero-shot centre;
  ``w_b = 0`` and ``b = b₀``, the label-density shift, at first) and output
  ``z = ρ (z_h − b₀)`` with ``ρ`` the zero-shot scale over ``model.logit_scale``, so a fresh
  model *is* the zero-shot model, logits included. The loss trains ``z_h``; served
  probabilities are a calibration of ``z`` (``backend/model/calibration.py``). After training the
  heads may be shrunk towards that zero-shot model, ``z = w z_heads + (1 − w) z_zero-shot``
  (``heads_weight``, chosen on held-out data; see ``worker/train.py``);
- **known labels** K (chosen by the annotator): a product of experts. A co-occurrence expert
  predicts each label from the known labels alone, ``u_c = b + mean_{j∈K} ⟨W ĥ_j, ĥ_c⟩ +
  γ_1 mean_{j∈K} P(c|j) + γ_2 log mean_{j∈K} P̂(c|j)`` — a learnable compatibility through the
  GMC output plus the co-occurrence counts (``P̂(c|j) = (M_jc + P̂(c)) / (N_j + 1)``,
  ``P̂(c) = (N_c + 1) / (n + 2)``) — and the visual logit is moved by its evidence beyond the
  prior: ``z_c += u_c − logit P̂(c)`` (0 for labels without counts, and 0 altogether while
  ``known_active`` is 0: an expert that training never saw — single-positive data has no
  image with two chosen labels — contributes nothing). The expert is trained on
  its own (from the known labels to the other chosen labels, counts leaving the training
  image out), so it never learns to correct the visual model's in-sample confidence. With no
  known labels the model is the visual model;
- **labels without training annotations** are scored through the trained projection, GMC
  and SVFR from their text embedding, optionally mixed with the unprojected path
  (:meth:`SigRL.score_unseen`, ``unseen_raw_weight``), and optionally minus what their
  trained graph neighbours explain away (``unseen_explain_away``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..features import EncodedImages
from .config import ModelSettings
from .gmc import GMC, LabelGraph
from .projection import NativeProjection, ReducedImages
from .svfr import SVFR


@dataclass
class SigRLOutput:
    logits: torch.Tensor  # [B, C] (with the known-label term when known was given)
    visual_logits: torch.Tensor  # [B, C] image only
    reconstruction_loss: torch.Tensor  # scalar (0 without SVFR)
    label_embeddings: torch.Tensor  # [C, D] Ĥ
    cooc_logits: torch.Tensor | None = None  # [B, C] co-occurrence expert (with known labels)
    head_logits: torch.Tensor | None = None  # [B, C] logits at the heads' own scale (training)
    head_visual: torch.Tensor | None = None  # [B, C] image-only, at the heads' own scale


class SigRL(nn.Module):
    def __init__(self, dim: int, cfg: ModelSettings, zero_shot_scale: float, zero_shot_bias: float,
                 native_dim: int | None = None):
        super().__init__()
        self.dim = dim
        self.native_dim = int(native_dim or dim)
        self.cfg = cfg
        self.global_projection = NativeProjection(self.native_dim, dim, hidden=cfg.adapter_hidden,
                                                  dropout=cfg.adapter_dropout, rank=cfg.native_global_rank)
        self.local_projection = NativeProjection(self.native_dim, dim, hidden=cfg.adapter_hidden,
                                                 dropout=cfg.adapter_dropout, rank=cfg.native_local_rank)
        self.gmc = GMC(dim, hidden=cfg.gat_hidden, heads=cfg.gat_heads, dropout=cfg.dropout) if cfg.use_gmc else None
        self.svfr = (
            SVFR(dim, attn_dim=cfg.attn_dim, key_dim=self.local_projection.width, top_k=cfg.local_top_k,
                 global_weight=cfg.global_weight, recon_temperature=cfg.recon_temperature,
                 chunk_size=cfg.chunk_size)
            if cfg.use_svfr
            else None
        )
        # Heads: z_h = e^{log_scale} (s − centre) + bias + ⟨label_bias, ĥ_c⟩ (bias in logit
        # units), trained at their own scale (model.logit_scale) — a cosine needs a sharp
        # scale to express confidence, whatever the zero-shot calibration is.
        self.log_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale)).log())
        self.register_buffer("centre", torch.tensor(float(zero_shot_bias)))
        self.bias = nn.Parameter(torch.zeros(()))
        self.label_bias = nn.Parameter(torch.zeros(dim))
        # Output: z = ρ (z_h − b₀) with ρ = zero-shot scale / logit_scale and b₀ the bias the
        # heads start from, so a fresh model's logits are the zero-shot logits
        # zs_scale (s − centre) exactly; then the shrinkage towards that zero-shot model,
        # z = w·z + (1 − w)·z_zero-shot (``heads_weight``; w = 1: none).
        self.register_buffer("zs_scale", torch.tensor(float(zero_shot_scale)))
        self.register_buffer("zs_offset", torch.zeros(()))
        self.register_buffer("heads_weight", torch.ones(()))
        # 1 once the known-label expert has been trained; 0 (fresh, or training data without
        # an image with two chosen labels): known labels change nothing.
        self.register_buffer("known_active", torch.zeros(()))
        # 1: the projections read the backbone's native features; 0: they read the aligned
        # ones (a backbone whose native space is aligned, or training given aligned features
        # only) — then serving ignores native features it is handed, whatever their width.
        self.register_buffer("reads_native", torch.tensor(float(self.native_dim != dim)))
        if cfg.use_known:
            self.compat = nn.Linear(dim, dim, bias=False)
            nn.init.zeros_(self.compat.weight)
            self.gamma_cond = nn.Parameter(torch.tensor(float(cfg.known_cooc_init)))
            self.gamma_lift = nn.Parameter(torch.tensor(float(cfg.known_cooc_init)))
            self.cooc_bias = nn.Parameter(torch.zeros(()))

    # -- pieces ----------------------------------------------------------------------------
    def fit_feature_stats(self, features: EncodedImages, max_rows: int) -> None:
        """Standardisation (and principal bases) of the native features, from (a seeded sample
        of at most ``max_rows`` rows of) training data."""
        features = self.inputs(features)
        self.global_projection.fit(features.native_global, max_rows)
        self.local_projection.fit(features.native_local, max_rows)

    def inputs(self, features: EncodedImages) -> EncodedImages:
        """The features as the projections read them (see ``reads_native``)."""
        if float(self.reads_native) > 0 or isinstance(features, ReducedImages):
            return features
        return EncodedImages.aligned_only(features.global_, features.local)

    @torch.no_grad()
    def reduce_native(self, features: EncodedImages, batch_size: int) -> ReducedImages:
        """The features with their native parts reduced by the (fitted) projections' fixed
        part; the heads score them exactly as the unreduced ones (up to float rounding)."""
        if isinstance(features, ReducedImages):
            return features
        features = self.inputs(features)
        parts = [features[start : start + batch_size] for start in range(0, len(features), batch_size)]
        return ReducedImages(
            torch.cat([self.global_projection.reduced(p.native_global) for p in parts]),
            torch.cat([self.local_projection.reduced(p.native_local) for p in parts]),
            features.global_,
            features.local,
        )

    def set_zero_shot_offset(self) -> None:
        """Remember the current bias as the one the heads start from (b₀, after the density
        shift of a fresh model)."""
        with torch.no_grad():
            self.zs_offset.copy_(self.bias.detach())

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

    def known_term(self, known, S, graph: LabelGraph, targets=None, cooc=None, force: bool = False):
        """``[B, C]`` logit change given ``known [B, C]`` (0/1): the product of the visual
        expert and the co-occurrence expert, ``z_c += cooc_c − logit P̂(c)`` (0 for images
        without known labels, for labels without counts, and while the expert is untrained —
        ``known_active = 0``; ``force`` applies it anyway, for training it)."""
        if cooc is None:
            cooc = self.cooc_logits(known, S, graph, targets)
        has = (known.sum(1, keepdim=True) > 0).to(cooc.dtype)
        if not force:
            has = has * self.known_active
        if graph.counts is None:
            return cooc * has
        prior = self.count_prior(graph).clamp(1e-6, 1 - 1e-6)
        seen = graph.seen.to(cooc.dtype)[None, :]
        return (cooc - torch.logit(prior)[None, :]) * has * seen

    def project(self, features: EncodedImages) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(global ``[B, D]``, local ``[B, P, D]`` in the label-embedding space, the reduced
        native local features ``[B, P, r]`` that key SVFR's attention)."""
        features = self.inputs(features)
        is_reduced = isinstance(features, ReducedImages)
        g, _ = self.global_projection(features.global_, features.native_global, is_reduced)
        l, keys = self.local_projection(features.local, features.native_local, is_reduced)
        return g, l, keys

    def visual(self, features: EncodedImages, label_embeddings, chunk_size=None, adapt: bool = True):
        """(logits ``[B, C]``, reconstruction loss). ``adapt=False`` scores the text-aligned
        features themselves (no projection of native features) with the trained heads."""
        if adapt:
            g, l, keys = self.project(features)
        else:
            g, l = features.global_, features.local
            keys = (features.native_local if isinstance(features, ReducedImages)
                    else self.local_projection.reduced(self.inputs(features).native_local))
        if self.svfr is not None:
            out = self.svfr(g, l, label_embeddings, target=features.local, chunk_size=chunk_size, key_input=keys)
            sim, recon = out.similarity, out.reconstruction_loss
        else:
            sim, recon = g @ label_embeddings.T, g.new_zeros(())
        offset = self.bias + label_embeddings @ self.label_bias  # [C]
        return self.log_scale.exp() * (sim - self.centre) + offset[None, :], recon

    def zero_shot_logits(self, features: EncodedImages, embeddings: torch.Tensor) -> torch.Tensor:
        """The logits of the zero-shot model the heads started from ``[B, C]``."""
        from .zeroshot import similarity

        s = similarity(features.global_, features.local, F.normalize(embeddings, dim=-1),
                       self.cfg.global_weight, self.cfg.local_top_k)
        return self.zs_scale * (s - self.centre)

    def to_output(self, head_logits: torch.Tensor) -> torch.Tensor:
        """Head-scale logits → output logits ``ρ (z_h − b₀)`` (module docstring)."""
        return (self.zs_scale / self.cfg.logit_scale) * (head_logits - self.zs_offset)

    def score_unseen(self, visual, features: EncodedImages, H, seen, chunk_size=None, weights=None):
        """Labels never annotated in training get ``(1 − w)·z_projected + w·z_aligned``
        (``w = unseen_raw_weight``). With ``w < 1`` they are scored through the trained
        projection and GMC: a new label gains from the visual evidence learnt for the
        trained labels it is related to (its GMC embedding gathers from them, and the
        projection moved images towards their embeddings).

        Explaining away (``β = unseen_explain_away > 0``, needs the graph's ``weights``): for an
        unseen label u, ``z_u −= β Σ_j a_uj (z_j − z_j^aligned)`` over the trained labels j,
        ``a_uj`` the graph weight of edge j → u normalised over them (text edges for a label
        without counts) and ``z_j − z_j^aligned`` what training moved label j's score away
        from the unprojected text path. The text path of a new label fires on whatever looks
        like its neighbours (a new "Sandal" on every shoe); where a trained neighbour's score
        rose above its text path (a sneaker the heads recognise), that evidence is the
        neighbour's, and the new label's score falls; where it fell, it rises."""
        w = float(self.cfg.unseen_raw_weight)
        beta = float(self.cfg.unseen_explain_away)
        seen = seen.bool()
        unseen = (~seen).nonzero().flatten()
        explain = beta > 0 and weights is not None and bool(seen.any())
        if unseen.numel() == 0 or (w <= 0 and not explain):
            return visual
        # the unprojected path of every label (explaining away) or of the unseen ones only
        raw, _ = self.visual(features, H if explain else H[unseen], chunk_size, adapt=False)
        out = visual.clone()
        if w > 0:
            out[:, unseen] = (1.0 - w) * visual[:, unseen] + w * (raw[:, unseen] if explain else raw)
        if explain:
            a = weights.to(visual.dtype)[unseen][:, seen]  # [U, S] edge weights j → u
            a = a / a.sum(1, keepdim=True).clamp(min=1e-12)
            out[:, unseen] = out[:, unseen] - beta * (visual[:, seen] - raw[:, seen]) @ a.T
        return out

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self,
        features: EncodedImages,
        embeddings: torch.Tensor,
        graph: LabelGraph,
        known: torch.Tensor | None = None,
        chunk_size: int | None = None,
        targets: torch.Tensor | None = None,
        train_known: bool = False,
    ) -> SigRLOutput:
        """Logits of images (:class:`~backend.features.EncodedImages`) for labels with text
        embeddings ``[C, D]`` and their graph; ``known [B, C]`` 0/1 labels already chosen;
        ``targets``: the images' annotated labels when they are in the graph's counts
        (training; see :meth:`known_term`). Labels the graph marks unseen go through
        :meth:`score_unseen`."""
        H = self.label_embeddings(embeddings, graph)
        S = self.known_matrix(H, graph) if known is not None else None
        return self.score(features, H, graph, known, S, chunk_size, targets, embeddings=embeddings,
                          train_known=train_known)

    def score(self, features: EncodedImages, H, graph: LabelGraph, known=None, S=None, chunk_size=None,
              targets=None, embeddings=None, train_known: bool = False) -> SigRLOutput:
        """The heads given the GMC output ``H`` (and known-label matrix ``S``) of a label
        space — what :meth:`forward` does after GMC; the predictor caches ``H`` and ``S``.
        ``embeddings``: the label text embeddings (needed when the heads are shrunk towards
        the zero-shot model, ``heads_weight < 1``)."""
        head, recon = self.visual(features, H, chunk_size)
        if graph.seen is not None:
            head = self.score_unseen(head, features, H, graph.seen, chunk_size, graph.weights)
        head_logits, cooc = head, None
        if known is not None and self.cfg.use_known:
            if S is None:
                S = self.known_matrix(H, graph)
            cooc = self.cooc_logits(known, S, graph, targets)
            head_logits = head + self.known_term(known, S, graph, targets, cooc, force=train_known)
        visual, logits = self.to_output(head), self.to_output(head_logits)
        if float(self.heads_weight) < 1.0:
            if embeddings is None:
                raise ValueError("heads shrunk towards zero-shot need the label text embeddings")
            w = self.heads_weight
            zs = (1.0 - w) * self.zero_shot_logits(features, embeddings)
            visual, logits = w * visual + zs, w * logits + zs
        return SigRLOutput(logits, visual, recon, H, cooc, head_logits, head)


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
