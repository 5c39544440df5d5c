r"""The pre-selection an annotator sees: the choices with the fewest expected toggles.

An annotator turns a pre-annotated task into its truth :math:`Y \subseteq \{1..C\}` by
toggling every label on which the pre-selection :math:`S` and the truth disagree. With
calibrated, per-label probabilities :math:`p_c = P(c \in Y \mid x)` the expected cost of a
selection is (linearity of expectation, no independence needed)

.. math::

    \mathbb{E}[\mathrm{toggles}(S)] = \sum_{c \in S} a\,(1 - p_c) + \sum_{c \notin S} b\,p_c

where :math:`a` is the cost of a wrong tick (the annotator unticks it) and :math:`b` the
cost of a missed tick (the annotator ticks it); a toggle is a toggle, so both are 1 by
default (``backend.preannotation`` in configs/default.yaml). Writing the cost as
:math:`\sum_c b\,p_c - \sum_{c \in S} g_c` with the gain of ticking :math:`c`

.. math::

    g_c = b\,p_c - a\,(1 - p_c),

the expected cost is minimised by ticking exactly the labels with :math:`g_c > 0`, i.e.
:math:`p_c > a / (a + b)` (0.5 for unit costs). A blank task (:math:`S = \emptyset`) costs
:math:`\sum_c b\,p_c` in expectation, so the optimum never costs more than a blank task
*in expectation* — with calibrated probabilities, also on average over tasks.

Optional cardinality bounds :math:`m \le |S| \le M` (a single-choice ``<Choices>`` needs
:math:`M = 1`; a project may insist on at least one label) keep the rule exact: the best
selection of size :math:`k` takes the :math:`k` largest gains, and the best :math:`k` is the
number of positive gains clipped to :math:`[m, M]`. Ties (:math:`g_c = 0`) are left
unticked: fewer ticks to look at for the same expected cost.

Shapes: probabilities ``[B, C]`` (or ``[C]``), torch or numpy; selections bool of the same
shape, as numpy arrays.
"""
from __future__ import annotations

import numpy as np

__all__ = ["decide", "expected_toggles", "preselect", "tick_gain"]


def _as_numpy(x) -> np.ndarray:
    """A float64 numpy copy of a torch tensor / numpy array / nested list."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def tick_gain(probabilities, *, wrong_tick_cost: float, missed_tick_cost: float) -> np.ndarray:
    r"""Expected toggles saved by ticking each label: :math:`g_c = b\,p_c - a\,(1 - p_c)`.

    Args:
        probabilities: ``[..., C]`` calibrated probabilities.
        wrong_tick_cost: :math:`a`, cost of a tick the annotator removes.
        missed_tick_cost: :math:`b`, cost of a tick the annotator adds.
    Returns:
        ``[..., C]`` float64.
    """
    if wrong_tick_cost < 0 or missed_tick_cost < 0 or wrong_tick_cost + missed_tick_cost <= 0:
        raise ValueError("tick costs must be >= 0 and not both 0")
    p = _as_numpy(probabilities)
    return missed_tick_cost * p - wrong_tick_cost * (1.0 - p)


def decide(
    probabilities,
    *,
    wrong_tick_cost: float,
    missed_tick_cost: float,
    min_labels: int = 0,
    max_labels: int | None = None,
) -> np.ndarray:
    r"""The selection minimising the expected number of toggles (module docstring).

    Args:
        probabilities: ``[B, C]`` or ``[C]`` calibrated per-label probabilities
            (torch tensor or numpy array).
        wrong_tick_cost: :math:`a`; missed_tick_cost: :math:`b` (both 1: every toggle counts once).
        min_labels: :math:`m`, fewest labels ticked per task (clipped to C).
        max_labels: :math:`M`, most labels ticked per task (``None``: no bound).
    Returns:
        bool ``[B, C]`` (or ``[C]``): True where the label is pre-selected.
    """
    gain = tick_gain(probabilities, wrong_tick_cost=wrong_tick_cost, missed_tick_cost=missed_tick_cost)
    squeeze = gain.ndim == 1
    if squeeze:
        gain = gain[None]
    if gain.ndim != 2:
        raise ValueError(f"probabilities must be [B, C] or [C], got shape {gain.shape}")
    n, c = gain.shape
    lo = min(max(int(min_labels), 0), c)
    hi = c if max_labels is None else min(int(max_labels), c)
    if hi < lo:
        raise ValueError(f"max_labels ({max_labels}) < min_labels ({min_labels})")
    # Stable sort so that equal gains keep label order (deterministic selections).
    order = np.argsort(-gain, axis=1, kind="stable")
    k = np.clip((gain > 0).sum(axis=1), lo, hi)  # [B]
    rank = np.empty_like(order)
    rank[np.arange(n)[:, None], order] = np.arange(c)[None, :]
    chosen = rank < k[:, None]
    return chosen[0] if squeeze else chosen


def expected_toggles(
    probabilities, selected, *, wrong_tick_cost: float, missed_tick_cost: float
) -> np.ndarray:
    r"""Expected toggles of a selection: :math:`\sum_{c\in S} a(1-p_c) + \sum_{c\notin S} b\,p_c`.

    Args:
        probabilities: ``[..., C]``; selected: bool ``[..., C]`` (broadcastable).
    Returns:
        ``[...]`` float64, one expected cost per task.
    """
    p = _as_numpy(probabilities)
    s = _as_numpy(selected) > 0.5
    cost = np.where(s, wrong_tick_cost * (1.0 - p), missed_tick_cost * p)
    return cost.sum(axis=-1)


def preselect(probabilities, cfg, multiple: bool = True) -> np.ndarray:
    """The backend's pre-selection of a ``<Choices>``: :func:`decide` with the costs and the
    bound of ``backend.preannotation`` (``cfg``); a single-choice ``<Choices>`` gets exactly
    its most likely label (a radio button is changed with one click, never emptied).

    The benchmark calls this very function on each method's served probabilities."""
    if not multiple:
        return decide(probabilities, wrong_tick_cost=cfg.wrong_tick_cost, missed_tick_cost=cfg.missed_tick_cost,
                      min_labels=1, max_labels=1)
    return decide(probabilities, wrong_tick_cost=cfg.wrong_tick_cost, missed_tick_cost=cfg.missed_tick_cost,
                  max_labels=cfg.max_labels)
