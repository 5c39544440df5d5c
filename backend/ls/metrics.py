"""Prometheus metrics of the backend (``GET /metrics``).

With several gunicorn workers, ``semlabel serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before any
worker starts, and ``/metrics`` aggregates every worker's values (prometheus_client's
multiprocess mode). The metric objects are module globals: one set per process.
"""

from __future__ import annotations

import os
import threading

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REQUESTS = Counter(
    "semlabel_http_requests_total", "HTTP requests by route, method and status", ["route", "method", "status"]
)
LATENCY = Histogram(
    "semlabel_http_request_duration_seconds",
    "HTTP request latency by route",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 100.0),
)
PREDICTIONS = Counter(
    "semlabel_predictions_total",
    "Task predictions by kind (preannotation, interactive, review) and outcome (ok, error)",
    ["kind", "outcome"],
)
FEATURES = Counter(
    "semlabel_image_features_total", "Image features served, by source (cache, computed)", ["source"]
)
WEBHOOKS = Counter(
    "semlabel_webhook_events_total",
    "Label Studio webhooks by action and outcome (stored, ignored, invalid, unauthorized, unavailable)",
    ["action", "outcome"],
)
REVIEWS = Counter(
    "semlabel_review_jobs_total", "Review jobs by outcome (stored, deleted, skipped, retried, failed)", ["outcome"]
)
MODEL = Gauge(
    "semlabel_model_info",
    "1 for the model version each project is served with in this process",
    ["project", "version", "backbone"],
    multiprocess_mode="liveall",
)

_models: dict[str, tuple[str, str]] = {}
_lock = threading.Lock()


def set_model(project: str, version: str, backbone: str) -> None:
    """Record the served version of a project (the previous label set is removed)."""
    with _lock:
        old = _models.get(project)
        if old == (version, backbone):
            return
        if old is not None:
            try:
                MODEL.remove(project, *old)
            except KeyError:
                pass
        MODEL.labels(project, version, backbone).set(1)
        _models[project] = (version, backbone)


def render() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def sample(name: str, **labels: str) -> float:
    """The current value of the sample ``name`` (e.g. ``semlabel_review_jobs_total``) with
    these labels in this process's registry; 0 when it has not been counted yet."""
    return REGISTRY.get_sample_value(name, labels) or 0.0
