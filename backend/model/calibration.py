"""Calibration of label scores from partial annotations, and the observation-rate model.

Annotators leave labels out: a label that is present is *chosen* with probability ``c_k``
(its observation rate), independently of the image given the label (SCAR, "selected
completely at random"). For a score ``z`` (a logit of the heads, or a zero-shot
similarity) the calibrated probability that label k is present is a per-label logistic map
and the probability that it was chosen is that times ``c_k``:

.. math::

    P(y_k = 1 \\mid z) = \\sigma(a_k z + b_k), \\qquad
    P(o_k = 1 \\mid z) = c_k \\, \\sigma(a_k z + b_k).

``(a_k, b_k, c_k)`` are fitted by maximum likelihood of the *observed* labels ``o`` of
held-out images (never the ones the scores were trained on). ``c_k`` is identifiable because
``σ`` saturates at 1: images the scores are sure about show how often a present label is
chosen — the same information Elkan & Noto (2008) read off as ``c = E[g(x) | o = 1]``, whose
estimate initialises the fit; unlike that estimator the joint fit is not biased low when the
positives are not perfectly separable. Rare labels are shrunk towards a shared calibration
``(a, b, c)`` fitted on all labels at once: label k keeps ``n_k / (n_k + κ)`` of its own fit
(``n_k`` its held-out observed positives, ``κ`` = ``calibration.shrinkage``), so a label
with few held-out positives keeps close to the shared map and a label never seen in
held-out data uses it exactly.

Single-positive annotation (one chosen label per image) is not SCAR: a present label is
chosen with chance ``1/|Y|``, and the likelihood cannot tell ``c`` from the map there. Then
the pooled rate is read off the distribution of the held-out scores (:func:`best_bin_rate`,
Best Bin Estimation) and held fixed.

Shapes: ``scores [n, C]``, ``observed [n, C]`` (0/1), ``mask [n, C]`` (1: the entry counts;
0 e.g. for labels given to the model as known). Everything here is plain torch, CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass
class Calibration:
    """Per-label logistic maps ``p = σ(a_k z + b_k)`` and observation rates ``c_k``, by label
    name; ``shared`` is the map (and rate) of labels without their own fit."""

    names: list[str]
    slope: list[float]
    offset: list[float]
    rate: list[float]
    shared_slope: float = 1.0
    shared_offset: float = 0.0
    shared_rate: float = 1.0
    positives: list[int] = field(default_factory=list)  # held-out observed positives per label
    images: int = 0

    @classmethod
    def identity(cls, names: Sequence[str] = ()) -> "Calibration":
        """The map that changes nothing (``p = σ(z)``)."""
        n = len(names)
        return cls(list(names), [1.0] * n, [0.0] * n, [1.0] * n)

    def parameters(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slope, offset, rate), each ``[len(names)]``, aligned to ``names`` (shared values
        for labels this calibration does not know)."""
        index = {n: i for i, n in enumerate(self.names)}
        a, b, c = [], [], []
        for name in names:
            i = index.get(name)
            a.append(self.slope[i] if i is not None else self.shared_slope)
            b.append(self.offset[i] if i is not None else self.shared_offset)
            c.append(self.rate[i] if i is not None else self.shared_rate)
        return torch.tensor(a), torch.tensor(b), torch.tensor(c)

    def logits(self, scores: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """Calibrated logits ``a_k z + b_k`` of ``scores [B, C]`` for labels ``names``."""
        a, b, _ = self.parameters(names)
        return scores.float() * a.to(scores.device) + b.to(scores.device)

    def probabilities(self, scores: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """``P(label present | score)`` ``[B, C]``."""
        return torch.sigmoid(self.logits(scores, names))

    def to_json(self) -> dict:
        return {
            "names": list(self.names),
            "slope": [round(float(x), 6) for x in self.slope],
            "offset": [round(float(x), 6) for x in self.offset],
            "rate": [round(float(x), 6) for x in self.rate],
            "shared": {"slope": round(self.shared_slope, 6), "offset": round(self.shared_offset, 6),
                       "rate": round(self.shared_rate, 6)},
            "positives": list(self.positives),
            "images": int(self.images),
        }

    @classmethod
    def from_json(cls, data: dict) -> "Calibration":
        names = [str(n) for n in data["names"]]
        slope, offset, rate = (list(map(float, data[k])) for k in ("slope", "offset", "rate"))
        if not (len(names) == len(slope) == len(offset) == len(rate)):
            raise ValueError("calibration lists of different lengths")
        shared = data.get("shared") or {}
        if any(not 0.0 < r <= 1.0 for r in rate):
            raise ValueError("observation rates out of (0, 1]")
        return cls(names, slope, offset, rate, float(shared.get("slope", 1.0)), float(shared.get("offset", 0.0)),
                   float(shared.get("rate", 1.0)), [int(x) for x in data.get("positives", [])],
                   int(data.get("images", 0)))


def elkan_noto_rate(scores: torch.Tensor, observed: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Elkan–Noto's ``c_k = E[g_k(z) | o_k = 1]`` ``[C]``, with ``g_k`` a logistic fit of the
    observed labels on the scores (one shared slope, per-label offsets; a few Newton-free
    gradient steps suffice for an initial value). Labels without observed positives: NaN."""
    mask = torch.ones_like(observed) if mask is None else mask
    z = scores.float()
    a = torch.ones((), requires_grad=True)
    b = torch.zeros(z.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([a, b], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(a * z + b, observed, reduction="none") * mask).sum()
        loss = loss / mask.sum().clamp(min=1.0)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        g = torch.sigmoid(a * z + b)
        pos = observed * mask
        n = pos.sum(0)
        rate = (g * pos).sum(0) / n.clamp(min=1.0)
        return torch.where(n > 0, rate, torch.full_like(rate, float("nan")))


def _pu_nll(zs, o, m, a, b, c):
    """``−Σ m · log Bernoulli(o; c σ(a z + b))`` (parameters broadcast over labels), in log
    space without clamping: ``log P(o=1) = log c + log σ(u)`` and ``log P(o=0) =
    log((1 − c) + c σ(−u))`` — exact, with a gradient everywhere (clamped probabilities
    have none where they clamp)."""
    u = a * zs + b
    c = torch.as_tensor(c, dtype=u.dtype)
    log_c = torch.log(c)
    log_not_c = torch.log1p(-c.clamp(max=1.0))  # −inf at c = 1: then log P(o=0) = log σ(−u)
    log_chosen = log_c + F.logsigmoid(u)
    log_unchosen = torch.logaddexp(log_not_c.expand_as(u), log_c + F.logsigmoid(-u))
    return -(m * (o * log_chosen + (1 - o) * log_unchosen)).sum()


def _minimise(params, loss_fn, iterations: int) -> None:
    """L-BFGS on ``params`` in place; the result is the best point it evaluated (its strong
    Wolfe line search does not promise that the last point is the best one)."""
    opt = torch.optim.LBFGS(params, max_iter=iterations, line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                            tolerance_change=1e-12)
    with torch.no_grad():
        best = [float(loss_fn()), [p.detach().clone() for p in params]]

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        value = float(loss.detach())
        if math.isfinite(value) and value < best[0]:
            best[0], best[1] = value, [p.detach().clone() for p in params]
        return loss

    opt.step(closure)
    with torch.no_grad():
        for p, kept in zip(params, best[1]):
            p.copy_(kept)


def fit_calibration(
    scores: torch.Tensor,
    observed: torch.Tensor,
    names: Sequence[str],
    mask: torch.Tensor | None = None,
    *,
    shrinkage: float,
    rate_shrinkage: float,
    min_rate: float,
    prior_strength: float,
    rate_prior: float,
    iterations: int,
    single_positive_share: float,
    bbe_delta: float,
    bbe_gamma: float,
    single_positive: bool | None = None,
    fixed_rate: float | None = None,
    per_label: bool = True,
) -> Calibration:
    """Fit :class:`Calibration` to held-out ``scores [n, C]`` and their observed labels.

    1. the shared map ``(a, b, c)``: maximum likelihood of ``Σ mask · log Bernoulli(o;
       c σ(a z + b))`` over all labels (a weak pull of ``a, b, logit c`` towards 1, 0,
       ``logit rate_prior`` of ``prior_strength`` images keeps separable data finite and
       decides where the data cannot);
    2. per label, the same likelihood with a pull of ``prior_strength`` images towards the
       shared map — first with one rate common to all labels (the pooled rate), then with
       per-label rates as well;
    3. shrinkage: label k keeps ``w_k = n_k / (n_k + κ)`` of its own parameters and takes
       ``1 − w_k`` of the shared ones (``n_k``: its held-out observed positives; ``κ``:
       ``shrinkage`` for ``a, b`` and ``rate_shrinkage`` for ``logit c``).

    Single-positive annotation (at least ``single_positive_share`` of the images with a
    chosen label have exactly one) breaks the constant rate the likelihood assumes — a
    present label is chosen with chance ``1/|Y|`` — and the likelihood then cannot tell
    the rate from the map (on the bench it settled at 0.85 against a true 0.31: every
    probability far too low). There the pooled rate is estimated from the distribution of
    the scores instead (:func:`best_bin_rate` with ``bbe_delta``, ``bbe_gamma``) and held
    fixed while the maps are fitted. ``single_positive``: the caller's decision (None: from
    ``observed``; outputs given known labels leave one target in many images, so their
    caller passes False).

    ``fixed_rate``: every ``c_k`` is this value (e.g. 1 for complete labels);
    ``per_label=False`` fits the shared map only (zero-shot calibration of a backbone, where
    labels are not known in advance). Scores are standardised internally (one prior fits
    logits and cosines alike); the result maps raw scores."""
    z = scores.detach().float()
    o = observed.detach().float()
    m = torch.ones_like(o) if mask is None else mask.detach().float()
    n_img, C = z.shape
    if n_img == 0 or float((o * m).sum()) == 0:
        return Calibration.identity(names)
    if single_positive is None:
        single_positive = one_positive_share(o, m) >= single_positive_share
    if fixed_rate is None and single_positive:
        fixed_rate = _single_positive_rate(z, o, m, names, shrinkage=shrinkage, rate_shrinkage=rate_shrinkage,
                                           min_rate=min_rate, prior_strength=prior_strength, rate_prior=rate_prior,
                                           iterations=iterations, delta=bbe_delta, gamma=bbe_gamma)
    flat = z[m > 0]
    mu, sd = float(flat.mean()), float(flat.std().clamp(min=1e-6))
    fit = _PUFit((z - mu) / sd, o, m, min_rate=min_rate, prior_strength=prior_strength, rate_prior=rate_prior,
                 iterations=iterations, fixed_rate=fixed_rate)
    A0, B0, C0 = fit.shared()
    positives = (o * m).sum(0)
    if per_label:
        a, b, cl, C0 = fit.per_label(A0, B0, C0)
        with torch.no_grad():
            w = positives / (positives + shrinkage) if shrinkage > 0 else torch.ones(C)
            wc = positives / (positives + rate_shrinkage) if rate_shrinkage > 0 else torch.ones(C)
            a = w * a + (1 - w) * A0
            b = w * b + (1 - w) * B0
            cl = wc * cl + (1 - wc) * C0
    else:
        a, b, cl = A0.repeat(C), B0.repeat(C), C0.repeat(C)
    with torch.no_grad():
        c = fit.rate_of(cl).expand(C)
        # back to raw scores: σ(a (z − μ)/σ + b) = σ((a/σ) z + b − a μ/σ)
        return Calibration(
            list(names), (a / sd).tolist(), (b - a * mu / sd).tolist(), c.tolist(),
            float(A0) / sd, float(B0) - float(A0) * mu / sd, float(fit.rate_of(C0)),
            [int(x) for x in positives.tolist()], int(n_img),
        )


class _PUFit:
    """The likelihood fits behind :func:`fit_calibration`, on standardised scores ``zs [n, C]``."""

    def __init__(self, zs, o, m, *, min_rate, prior_strength, rate_prior, iterations, fixed_rate):
        self.zs, self.o, self.m = zs, o, m
        self.n_img = zs.shape[0]
        self.prior_strength, self.iterations, self.fixed_rate = prior_strength, iterations, fixed_rate
        self.min_rate = min_rate
        self.lo = math.log(min_rate / (1 - min_rate))
        # Where the scores cannot tell (they rank nothing), only c·P(y) is identified: the weak
        # pull towards a high rate then reads unobserved labels as absent — the safe side for
        # pre-selection (a flat map below 0.5 ticks nothing, costing what a blank task costs).
        self.rate_prior_logit = math.log(rate_prior / (1 - rate_prior))

    def rate_of(self, logit_c):
        if self.fixed_rate is not None:
            return torch.as_tensor(float(self.fixed_rate))
        # c in [min_rate, 1): a soft floor keeps rare labels from explaining misses by c → 0
        return torch.sigmoid(self.lo + F.softplus(logit_c - self.lo))

    def _nll(self, a, b, logit_c):
        return _pu_nll(self.zs, self.o, self.m, a, b, self.rate_of(logit_c))

    def _rates(self, *params):
        """``params`` plus the rate parameter(s) when the rate is fitted."""
        return list(params[:-1]) + ([params[-1]] if self.fixed_rate is None else [])

    def shared(self):
        """Step 1: the shared map ``(a, b, logit c)``, pulled weakly towards ``(1, 0, logit rate_prior)``."""
        en = elkan_noto_rate(self.zs, self.o, self.m)
        c0 = float(torch.nanmean(en)) if torch.isfinite(en).any() else 0.5
        c0 = min(max(c0, self.min_rate + 1e-3), 1.0 - 1e-3)
        A = torch.tensor(1.0, requires_grad=True)
        B = torch.tensor(0.0, requires_grad=True)
        Cl = torch.tensor(math.log(c0 / (1 - c0)), requires_grad=True)
        k = self.prior_strength

        def loss():
            prior = 0.5 * k * ((A - 1.0) ** 2 + B ** 2)
            if self.fixed_rate is None:
                prior = prior + 0.5 * k * (Cl - self.rate_prior_logit) ** 2
            return (self._nll(A, B, Cl) + prior) / self.n_img

        _minimise(self._rates(A, B, Cl), loss, self.iterations)
        return A.detach(), B.detach(), Cl.detach()

    def per_label(self, A0, B0, C0):
        """Step 2: per-label maps pulled towards the shared one — first with one pooled rate
        (not biased by a shared map that fits no label well), then with per-label rates pulled
        weakly towards it. Returns ``a, b, logit c`` per label and the pooled ``logit c``."""
        C, k = self.zs.shape[1], self.prior_strength
        a = A0.repeat(C).requires_grad_(True)
        b = B0.repeat(C).requires_grad_(True)
        common = C0.clone().requires_grad_(True)
        _minimise(self._rates(a, b, common), lambda: (
            self._nll(a, b, common) + 0.5 * k * ((a - A0) ** 2 + (b - B0) ** 2).sum()) / self.n_img,
            self.iterations)
        pooled = common.detach()
        a1, b1 = a.detach().clone(), b.detach().clone()  # not views: a, b move on below
        cl = pooled.repeat(C).requires_grad_(True)

        def label_loss():
            prior = 0.5 * k * ((a - a1) ** 2 + (b - b1) ** 2 + (cl - pooled) ** 2).sum()
            return (self._nll(a, b, cl) + prior) / self.n_img

        _minimise(self._rates(a, b, cl), label_loss, self.iterations)
        return a.detach(), b.detach(), cl.detach(), pooled


def _single_positive_rate(z, o, m, names, *, shrinkage, delta, gamma, **likelihood) -> float:
    """The pooled rate of single-positive annotation: :func:`best_bin_rate`'s, from ``n`` chosen
    labels, shrunk towards the likelihood's rate with the pseudo-count ``shrinkage``,
    ``(n·c_BBE + κ·c_lik) / (n + κ)``. A few held-out images (a small project) cannot place
    the top bin; the likelihood's rate, too high there, errs on the safe side (unchosen
    labels read as absent, little pre-selected)."""
    n = float((o * m).sum())
    c_bbe = best_bin_rate(z, o, m, delta=delta, gamma=gamma)
    c_lik = fit_calibration(z, o, names, m, shrinkage=shrinkage, single_positive=False, single_positive_share=1.0,
                            bbe_delta=delta, bbe_gamma=gamma, per_label=False, **likelihood).shared_rate
    return max(likelihood["min_rate"], (n * c_bbe + shrinkage * c_lik) / (n + shrinkage))


def best_bin_rate(scores: torch.Tensor, observed: torch.Tensor, mask: torch.Tensor | None = None, *,
                  delta: float, gamma: float) -> float:
    r"""The pooled observation rate from the *distribution* of held-out scores: Best Bin
    Estimation (Garg et al. 2021, "Mixture proportion estimation and PU learning: a modern
    approach"). Scores are standardised per label and pooled; ``α``, the share of present
    labels among the unchosen entries, is read off the top bin where the chosen ones
    dominate,

    .. math::

        \hat t = \arg\min_t \frac{q_U(t)}{q_P(t)} + \frac{1 + \gamma}{q_P(t)}
                 \Big(\sqrt{\tfrac{\log(4/\delta)}{2 n_P}} + \sqrt{\tfrac{\log(4/\delta)}{2 n_U}}\Big),
        \qquad \hat\alpha = q_U(\hat t) / q_P(\hat t),

    (``q(t)``: the share of chosen (P) / unchosen (U) entries scoring ≥ t), and the rate is
    ``n_P / (n_P + α n_U)``. It needs the top scores to be mostly present labels (a model
    that ranks), not a constant rate per label — which single-positive annotation breaks (a
    present label is chosen with chance ``1/|Y|``), and where the likelihood of
    :func:`fit_calibration` then cannot tell the rate from the map."""
    z = scores.detach().float()
    o = observed.detach() > 0
    m = torch.ones_like(z, dtype=torch.bool) if mask is None else mask.detach() > 0
    zs = ((z - z.mean(0)) / z.std(0).clamp(min=1e-6))[m]
    on = o[m]
    zp, zu = zs[on], zs[~on]
    n_p, n_u = len(zp), len(zu)
    if n_p == 0 or n_u == 0:
        return 1.0
    bound = math.sqrt(math.log(4 / delta) / (2 * n_p)) + math.sqrt(math.log(4 / delta) / (2 * n_u))
    thresholds = torch.cat([zp, zu]).sort(descending=True).values
    # q(t) for every threshold at once: the share of each sample at or above it (the top
    # threshold is a score itself, so q_P > 0 wherever a positive is at or above it)
    qp = 1 - torch.searchsorted(zp.sort().values, thresholds).float() / n_p
    qu = 1 - torch.searchsorted(zu.sort().values, thresholds).float() / n_u
    objective = torch.where(qp > 0, (qu + (1 + gamma) * bound) / qp.clamp(min=1e-12),
                            torch.full_like(qp, float("inf")))
    t = int(objective.argmin())
    alpha = float(qu[t] / qp[t])
    return float(n_p / (n_p + alpha * n_u))


def one_positive_share(observed: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Share of images with a chosen label that have exactly one."""
    o = observed.detach().float() * (1 if mask is None else mask.detach().float())
    counts = o.sum(1)
    labelled = counts > 0
    return float((counts[labelled] == 1).float().mean()) if bool(labelled.any()) else 0.0


def fit_options(cfg) -> dict:
    """The keyword arguments of :func:`fit_calibration` from ``configs: calibration``."""
    return dict(shrinkage=cfg.shrinkage, rate_shrinkage=cfg.rate_shrinkage, min_rate=cfg.min_observation_rate,
                prior_strength=cfg.prior_strength, rate_prior=cfg.rate_prior, iterations=cfg.iterations,
                single_positive_share=cfg.single_positive_share, bbe_delta=cfg.bbe_delta, bbe_gamma=cfg.bbe_gamma)


def fit_zero_shot_calibration(similarity: torch.Tensor, observed: torch.Tensor, mask: torch.Tensor | None = None,
                              **kwargs) -> tuple[float, float, float]:
    """A backbone's zero-shot calibration from data: ``(scale, bias, rate)`` such that
    ``P(label | s) = σ(scale · (s − bias))`` for zero-shot similarities ``s [n, C]``, fitted
    with the observation-rate model on partially observed labels (one map shared by all
    labels: a zero-shot model meets labels nobody has annotated)."""
    cal = fit_calibration(similarity, observed, [str(i) for i in range(similarity.shape[1])], mask,
                          per_label=False, **kwargs)
    scale = cal.shared_slope
    if scale <= 1e-6:
        # The similarities do not rank the observed labels at all: every label gets the
        # base rate, σ(offset) — a flat map, written as a tiny slope and a far centre.
        scale = 1e-6
    return scale, -cal.shared_offset / scale, cal.shared_rate


def expected_calibration_error(probabilities: torch.Tensor, truth: torch.Tensor, *, bins: int) -> float:
    """ECE over every image–label pair: ``Σ_b (n_b / n) |mean p − mean y|`` in ``bins`` equal-width
    probability bins."""
    p = probabilities.detach().float().flatten()
    y = truth.detach().float().flatten()
    idx = (p * bins).long().clamp(max=bins - 1)
    total = 0.0
    for k in range(bins):
        sel = idx == k
        if sel.any():
            total += float(sel.sum()) * abs(float(p[sel].mean()) - float(y[sel].mean()))
    return total / max(1, p.numel())


__all__ = ["Calibration", "elkan_noto_rate", "expected_calibration_error", "fit_calibration",
           "best_bin_rate", "fit_options", "one_positive_share",
           "fit_zero_shot_calibration"]
