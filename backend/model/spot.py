"""Spot scoring: which labels the *local* evidence at a point or inside a box supports.

An annotator points at an object (a smart ``<KeyPoint>``) or draws a box around it (a smart
``<Rectangle>``); semlabel ranks the labels by what the backbone's local features say at that
spot, conditioned on the labels already chosen.

**Geometry.** The backbone makes a square of the image, then a ``G × G`` grid of local features
(``local [P, D]``, ``P = G²``, row-major, ``p = row · G + col``). For an image ``W × H`` the grid
covers a centred square of side ``c``: with ``backbone.image_fit: pad`` (the default) the whole
image padded to a square, ``c = max(W, H)``; with ``crop`` the centre crop of the shorter side
``s``, ``c = f · s`` (``f = image_size / resize``: 0.875 for the packaged backbone, 1 for
open_clip's resize-to-crop). A spot in image fractions ``(x, y)`` maps to square fractions
``u = (x W − (W − c)/2) / c``, ``v = (y H − (H − c)/2) / c`` (clamped to ``[0, 1]``), and patch
``p`` has its centre at ``((col + ½)/G, (row + ½)/G)``.

**Patch weights** ``w [P]`` (``Σ_p w_p = 1``):

- point ``(u, v)``: ``w_p ∝ exp(−‖centre_p − (u, v)‖² G² / (2σ²))`` — a Gaussian of ``σ`` patches
  (``suggest.spot.point_sigma``);
- box ``[u₀, u₁] × [v₀, v₁]``: ``w_p ∝`` the area of patch ``p`` inside the box (a box that misses
  the grid: the patch nearest to its centre).

**Scores.** With the model's per-patch label similarity ``m [P, C]`` (``m_pc = ⟨l_p, h_c⟩``: the
local features and label embeddings its local term reads), the local evidence at the spot is
``e_c = Σ_p w_p m_pc`` and its contrast with the image's average patch ``m̄_c = mean_p m_pc``:

    z^spot_c = z_c + γ · α · (e_c − m̄_c),      P^spot_c = σ(z^spot_c)

where ``z [C]`` is the model's logit given the chosen labels (SigRL's known-label expert; the
zero-shot model has none), ``α`` the logit change per unit of local similarity in that model
(zero-shot: ``scale · (1 − w_global)``; SigRL: ``e^σ · w_local``) and ``γ``
(``suggest.spot.local_gain``) how much the spot's contrast counts. The contrast, not ``e_c``
itself, because labels differ in how similar *every* patch is to them ("person" is close to
most scenes): a label the spot supports more than the rest of the image rises, one whose
evidence lies elsewhere falls, and ``γ = 0`` is the image-wide model. For SigRL the
label-specific attention of SVFR (``a_pc = softmax_p⟨W_k k_p, W_q h_c⟩/√A``) gives a reason:
``P · Σ_p w_p a_pc``, how much more than uniformly label c attends to the spot.

Shapes: ``features.local [P, D]``, ``w [P]``, ``m [P, C]``, ``e, m̄, z [C]``. One image and one spot
per call; the cost is one ``[P, D] × [D, C]`` product (the heads' own work for one image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..features import Features
from ..labels import LabelSpace
from .predictor import Predictor, Reasons, Suggestion, co_occurring_support, known_mask, taxonomy_path, text_neighbours


@dataclass(frozen=True)
class Spot:
    """A point (``w = h = 0``) or a box, in fractions of the original image: top-left ``(x, y)``,
    size ``(w, h)``. ``width``/``height``: the image's pixel size when known (for the crop)."""

    x: float
    y: float
    w: float = 0.0
    h: float = 0.0
    width: float | None = None
    height: float | None = None

    @property
    def is_box(self) -> bool:
        return self.w > 0 and self.h > 0

    def describe(self) -> str:
        if self.is_box:
            return (f"box {100 * self.x:.0f}–{100 * (self.x + self.w):.0f}% × "
                    f"{100 * self.y:.0f}–{100 * (self.y + self.h):.0f}%")
        return f"point ({100 * self.x:.0f}%, {100 * self.y:.0f}%)"


@dataclass
class SpotCandidate:
    """One label at a spot: ``probability`` = P^spot, ``local`` = e_c, ``mean_local`` = m̄_c,
    ``attention`` = the SVFR attention ratio (None without SVFR)."""

    index: int
    probability: float
    local: float
    mean_local: float
    attention: float | None = None


def crop_fraction(backbone) -> float | None:
    """``f``: the side of the backbone's centre crop as a fraction of the image's shorter side,
    or ``None`` when the backbone pads the whole image to a square (see the module doc)."""
    if getattr(backbone, "image_fit", "crop") == "pad":
        return None
    cfg = getattr(backbone, "feature_config", {}) or {}
    resize, size = cfg.get("resize"), cfg.get("image_size")
    if resize and size:
        return min(1.0, float(size) / float(resize))
    return 1.0


def _to_crop(x: float, y: float, spot: Spot, fraction: float | None) -> tuple[float, float]:
    W, H = spot.width or 1.0, spot.height or 1.0
    c = max(W, H) if fraction is None else fraction * min(W, H)
    u = (x * W - (W - c) / 2.0) / c
    v = (y * H - (H - c) / 2.0) / c
    return u, v


def patch_weights(spot: Spot, patches: int, fraction: float | None, sigma: float) -> torch.Tensor:
    """``w [P]``: the spot's weight on each patch of a ``√P × √P`` grid (see the module doc)."""
    G = int(round(math.sqrt(patches)))
    if G * G != patches:
        raise ValueError(f"local features of {patches} patches are not a square grid")
    centres = (torch.arange(G, dtype=torch.float32) + 0.5) / G
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")  # [G, G] each, row-major
    if spot.is_box:
        u0, v0 = _to_crop(spot.x, spot.y, spot, fraction)
        u1, v1 = _to_crop(spot.x + spot.w, spot.y + spot.h, spot, fraction)
        u0, u1 = sorted((min(max(u0, 0.0), 1.0), min(max(u1, 0.0), 1.0)))
        v0, v1 = sorted((min(max(v0, 0.0), 1.0), min(max(v1, 0.0), 1.0)))
        edges = torch.arange(G + 1, dtype=torch.float32) / G
        ox = (torch.minimum(edges[1:], torch.tensor(u1)) - torch.maximum(edges[:-1], torch.tensor(u0))).clamp(min=0)
        oy = (torch.minimum(edges[1:], torch.tensor(v1)) - torch.maximum(edges[:-1], torch.tensor(v0))).clamp(min=0)
        w = (oy[:, None] * ox[None, :]).flatten()
        if float(w.sum()) > 0:
            return w / w.sum()
        u, v = (u0 + u1) / 2.0, (v0 + v1) / 2.0
        d2 = (cx - u) ** 2 + (cy - v) ** 2
        w = torch.zeros(patches)
        w[int(d2.flatten().argmin())] = 1.0
        return w
    u, v = _to_crop(spot.x, spot.y, spot, fraction)
    u, v = min(max(u, 0.0), 1.0), min(max(v, 0.0), 1.0)
    d2 = ((cx - u) ** 2 + (cy - v) ** 2) * (G * G)  # squared distance in patches
    w = torch.exp(-d2 / (2.0 * sigma * sigma)).flatten()
    return w / w.sum()


# -- the model's local term, per predictor kind -------------------------------------------
@dataclass
class LocalTerms:
    """What spot scoring needs of a model for one image: ``logits [C]`` given the chosen
    labels, ``visual [C]`` from the image alone, ``match [P, C]``, ``alpha`` (logit per unit of
    local similarity), ``attention [P, C]`` or None."""

    logits: torch.Tensor
    visual: torch.Tensor
    match: torch.Tensor
    alpha: float
    attention: torch.Tensor | None = None


@torch.inference_mode()
def local_terms(predictor: Predictor, features: Features, space: LabelSpace,
                known: Sequence[str]) -> LocalTerms | None:
    """The model's local term for one image, or None for a predictor kind without one."""
    from .serving import SigRLPredictor
    from .zeroshot import ZeroShotPredictor, zero_shot_logits

    if isinstance(predictor, SigRLPredictor):
        return _sigrl_terms(predictor, features, space, known)
    if isinstance(predictor, ZeroShotPredictor):
        bb = predictor.backbone
        E = space.embeddings
        g, l = features.global_[None], features.local[None]
        z = zero_shot_logits(g, l, E, global_weight=predictor.global_weight, top_k=predictor.top_k,
                             scale=bb.zero_shot_scale, bias=bb.zero_shot_bias)[0]
        match = features.local @ E.T  # [P, C]
        return LocalTerms(z, z, match, float(bb.zero_shot_scale) * (1.0 - float(predictor.global_weight)))
    return None


def _sigrl_terms(predictor, features: Features, space: LabelSpace, known: Sequence[str]) -> LocalTerms:
    from ..features import stack_all

    module = predictor.module
    graph, H, S = predictor.prepare(space)
    device = predictor.device
    batch = stack_all([features]).to(device)
    mask = known_mask(space, [list(known)], 1).to(device)
    out = module.score(batch, H, graph, mask, S, embeddings=space.embeddings.to(device))
    _, local, keys = module.project(batch)  # [1, P, D] in the label space, SVFR's key input
    match = (local[0] @ H.T).float()  # [P, C]
    attention = None
    if module.svfr is not None:
        svfr = module.svfr
        k = svfr.key(keys if keys is not None else local)[0]  # [P, A]
        attention = ((k @ svfr.query(H).T) * svfr.scale).softmax(dim=0).float()  # [P, C]
        w_local = float(svfr.w_local)
    else:  # no local term in the model: the spot evidence enters at the zero-shot mix
        w_local = 1.0 - float(module.cfg.global_weight)
    # The similarity's weight in the output logit: e^σ at the heads' scale, times the output
    # map ρ = zero-shot scale / logit_scale and the shrinkage weight (sigrl module doc).
    rho = float(module.zs_scale) / float(module.cfg.logit_scale)
    alpha = float(module.log_scale.exp()) * w_local * rho * float(module.heads_weight)
    return LocalTerms(out.logits[0].float().cpu(), out.visual_logits[0].float().cpu(), match.cpu(), alpha,
                      None if attention is None else attention.cpu())


def image_patches(spot: Spot, patches: int, fraction: float | None) -> torch.Tensor:
    """``[P]`` bool: the patches whose centre lies on the image, not on the padding that
    made it square (all of them for a centre crop or an image of unknown size)."""
    G = int(round(math.sqrt(patches)))
    u0, v0 = _to_crop(0.0, 0.0, spot, fraction)
    u1, v1 = _to_crop(1.0, 1.0, spot, fraction)
    centres = (torch.arange(G, dtype=torch.float32) + 0.5) / G
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    inside = ((cx >= u0) & (cx <= u1) & (cy >= v0) & (cy <= v1)).reshape(-1)
    return inside if bool(inside.any()) else torch.ones(patches, dtype=torch.bool)


def spot_candidates(terms: LocalTerms, weights: torch.Tensor, gain: float,
                    inside: torch.Tensor | None = None) -> list[SpotCandidate]:
    """Every label at the spot, most likely first (``z^spot`` of the module doc); ``m̄_c``
    averages the patches ``inside`` the image (padding is no evidence of anything)."""
    local = weights @ terms.match  # [C]
    match = terms.match if inside is None else terms.match[inside]
    mean = match.mean(0)  # [C]
    z = terms.logits + gain * terms.alpha * (local - mean)
    probs = torch.sigmoid(z)
    attention = None
    if terms.attention is not None:
        attention = (weights @ terms.attention) * weights.shape[0]  # 1 = uniform attention
    order = probs.argsort(descending=True).tolist()
    return [
        SpotCandidate(c, float(probs[c]), float(local[c]), float(mean[c]),
                      None if attention is None else float(attention[c]))
        for c in order
    ]


def suggest_at_spot(
    predictor: Predictor,
    features: Features,
    space: LabelSpace,
    known: Sequence[str],
    spot: Spot,
    *,
    top_k: int,
    min_probability: float,
    sigma: float,
    gain: float,
    fraction: float | None,
    co_occurring: int,
    neighbours: int,
) -> list[Suggestion]:
    """Up to ``top_k`` labels not in ``known`` for the spot, most likely first, with reasons
    (``Reasons.local``: e_c, ``Reasons.mean_local``: m̄_c; ``Reasons.spot``: where; co-occurring chosen labels; neighbours;
    taxonomy path)."""
    terms = local_terms(predictor, features, space, known)
    if terms is None:  # a model without local features: its image-wide suggestions
        items = predictor.suggest([features], space, [list(known)], top_k, min_probability)[0]
        for item in items:
            item.reasons.spot = spot.describe()
        return items
    weights = patch_weights(spot, features.local.shape[0], fraction, sigma)
    chosen = {space.index[n] for n in known if n in space.index}
    cond = None
    graph = getattr(predictor, "prepare", None)
    if graph is not None and chosen:
        cond = predictor.prepare(space)[0].cond.cpu()  # cond[j, c] = P(c | j), observed
    taxonomy = space.taxonomy or getattr(predictor, "taxonomy", None)
    visual = torch.sigmoid(terms.visual)
    out: list[Suggestion] = []
    inside = image_patches(spot, features.local.shape[0], fraction)
    for cand in spot_candidates(terms, weights, gain, inside):
        if len(out) >= top_k or cand.probability < min_probability:
            break
        if cand.index in chosen:
            continue
        c = cand.index
        support = []
        if cond is not None:
            support = co_occurring_support(space, cond, chosen, c, co_occurring)
        out.append(Suggestion(
            label=space.names[c],
            probability=round(cand.probability, 4),
            reasons=Reasons(
                visual=round(float(visual[c]), 4),
                zero_shot=float("nan"),
                co_occurring=support,
                neighbours=text_neighbours(space, c, neighbours),
                taxonomy_path=taxonomy.path(space.names[c]) if taxonomy is not None else taxonomy_path(space, c),
                local=round(cand.local, 4),
                mean_local=round(cand.mean_local, 4),
                attention=None if cand.attention is None else round(cand.attention, 3),
                spot=spot.describe(),
            ),
        ))
    return out
