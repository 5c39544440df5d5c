"""The promotion gate: does a newly trained version replace the one served, and why.

Pure: :func:`decide` reads no files. It compares the new version's held-out ``metric`` with
the best evidence about what is served now, in this order:

1. ``baseline`` — the current version evaluated on the new version's held-out split
   (``{"version", "metrics"}``; the trainer measures it when it can);
2. the current version's own recorded metrics (from its manifest);
3. for a project's first version, a baseline named by a non-store version (the zero-shot
   predictor, e.g. ``zero-shot@<backbone>``).

The new version is promoted unless its value is lower than the baseline's by more than
``margin``; a current version without the metric never blocks, a new version without it never
replaces a measured one. ``promote=True`` skips the gate, ``promote=False`` never promotes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ids import is_version_id


@dataclass
class GateDecision:
    """Whether a new version replaces the current one, and why."""

    promoted: bool
    reason: str
    metric: str
    value: float | None = None
    baseline_version: str | None = None
    baseline_value: float | None = None
    margin: float = 0.0


def metric_value(metrics: dict | None, name: str) -> float | None:
    """``metrics[name]`` (or ``metrics["holdout"][name]``) as a float; None when absent or NaN."""
    if not metrics:
        return None
    value = metrics.get(name)
    if value is None and isinstance(metrics.get("holdout"), dict):
        value = metrics["holdout"].get(name)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if value == value else None  # NaN is no value


def decide(
    metrics: dict | None,
    *,
    metric: str,
    margin: float,
    current: str | None,
    current_metrics: dict | None = None,
    baseline: dict | None = None,
    promote: bool | None = None,
    promote_reason: str | None = None,
) -> GateDecision:
    """The gate's decision for a version with held-out ``metrics`` (see the module docstring);
    ``current``: the project's current version (None: zero-shot is served), ``current_metrics``
    its recorded metrics."""
    decision = _compare(metrics, metric, margin, current, current_metrics, baseline)
    if promote is True:
        return GateDecision(True, promote_reason or "promoted on request (gate skipped)", metric,
                            metric_value(metrics, metric), decision.baseline_version,
                            decision.baseline_value, margin)
    if promote is False:
        decision.promoted, decision.reason = False, "kept without promotion on request"
    return decision


def _compare(metrics, name, margin, current, current_metrics, baseline) -> GateDecision:
    value = metric_value(metrics, name)
    if current is None:
        # What is served now is the zero-shot predictor; compare with it when the trainer
        # evaluated it on the same held-out tasks.
        zs = baseline.get("version") if baseline else None
        zs_value = metric_value(baseline.get("metrics"), name) if zs and not is_version_id(zs) else None
        if zs_value is None or value is None:
            return GateDecision(True, "first version of the project", name, value, None, None, margin)
        if value < zs_value - margin:
            return GateDecision(False, f"held-out {name} {value:.4f} is worse than {zs} ({zs_value:.4f}) "
                                       f"by more than the margin {margin:g}", name, value, zs, zs_value, margin)
        return GateDecision(True, f"first version: held-out {name} {value:.4f} vs {zs} {zs_value:.4f} "
                                  f"(margin {margin:g})", name, value, zs, zs_value, margin)
    base_value = None
    if baseline and baseline.get("version") == current:
        base_value = metric_value(baseline.get("metrics"), name)
    if base_value is None:
        base_value = metric_value(current_metrics, name)
    if base_value is None:
        return GateDecision(True, f"current version {current} has no held-out {name}", name, value,
                            current, None, margin)
    if value is None:
        return GateDecision(False, f"no held-out {name} to compare with {current} ({base_value:.4f})",
                            name, None, current, base_value, margin)
    if value < base_value - margin:
        return GateDecision(False, f"held-out {name} {value:.4f} is worse than current {current} "
                                   f"({base_value:.4f}) by more than the margin {margin:g}",
                            name, value, current, base_value, margin)
    return GateDecision(True, f"held-out {name} {value:.4f} vs current {base_value:.4f} "
                              f"(margin {margin:g})", name, value, current, base_value, margin)
