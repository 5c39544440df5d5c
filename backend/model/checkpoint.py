"""Trained-model directories: ``save_model`` / ``load_model``.

A model directory is self-contained (the model store versions whole directories)::

    weights.safetensors   the SigRL state_dict (safetensors: no pickle, safe to load)
    model.json            format, model id, architecture, backbone name + fingerprint,
                          labels seen in training, co-occurrence counts (by name), loss and
                          training settings, seed, taxonomy (parent map) when one was used,
                          training summary (counts, seconds, epochs)
                          and the per-label calibrations fitted on held-out data
                          (``calibration.visual``: image-only outputs; ``.conditional``:
                          outputs given known labels; :mod:`.calibration`) — served
                          probabilities go through them
    metrics.json          held-out metrics (``mAP`` first; the store's gate reads it)

``model_id`` is a hash of the weights and of ``model.json`` (without the id), so two
different models never share an id. Anything wrong with a directory raises
:class:`~backend.errors.ModelLoadError` with a one-line reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelLoadError
from .calibration import Calibration
from .config import ModelSettings
from .cooccurrence import CooccurrenceStats
from .sigrl import SigRL

FORMAT = "semlabel-sigrl"
FORMAT_VERSION = 2  # 2: native-feature projection, calibration.json
WEIGHTS = "weights.safetensors"
MODEL_JSON = "model.json"
METRICS_JSON = "metrics.json"


@dataclass
class TrainedModel:
    module: SigRL
    labels: list[str]
    stats: CooccurrenceStats
    backbone: dict  # {"name", "fingerprint", "dim"}
    loss: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    seed: int = 0
    summary: dict = field(default_factory=dict)
    taxonomy: dict | None = None  # parent map of backend.labels.Taxonomy
    model_id: str = ""
    # "visual" (and "conditional" when the known-label expert is active) → Calibration
    calibration: dict[str, Calibration] = field(default_factory=dict)

    @property
    def config(self) -> ModelSettings:
        return self.module.cfg


def _canonical(payload: dict) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def save_model(model: TrainedModel, out_dir: str | os.PathLike, metrics: dict | None = None) -> Path:
    """Write ``model`` into ``out_dir`` (created if needed); returns the directory.

    Files are written to temporary names and renamed, ``model.json`` last."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.module.state_dict().items()}
    tmp_weights = out / (WEIGHTS + ".tmp")
    save_file(state, str(tmp_weights), metadata={"format": FORMAT})
    weights_hash = hashlib.sha256(tmp_weights.read_bytes()).hexdigest()
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "weights_sha256": weights_hash,
        "architecture": {"dim": model.module.dim, **model.module.cfg.model_dump()},
        "backbone": dict(model.backbone),
        "labels": list(model.labels),
        "cooccurrence": model.stats.to_json(),
        "loss": model.loss,
        "train": model.train,
        "seed": model.seed,
        "taxonomy": model.taxonomy,
        "summary": model.summary,
        "calibration": {k: c.to_json() for k, c in sorted(model.calibration.items())},
    }
    model.model_id = hashlib.sha256(_canonical(payload)).hexdigest()[:12]
    payload["model_id"] = model.model_id
    os.replace(tmp_weights, out / WEIGHTS)
    if metrics is not None:
        _write_json(out / METRICS_JSON, metrics)
    _write_json(out / MODEL_JSON, payload)
    return out


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False))
    os.replace(tmp, path)


def read_model_json(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / MODEL_JSON
    if not Path(model_dir).is_dir():
        raise ModelLoadError(f"{model_dir}: not a model directory")
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{model_dir}: no {MODEL_JSON}") from exc
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelLoadError(f"{path}: not a {FORMAT} model")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(
            f"{path}: format version {payload.get('format_version')} (this build reads {FORMAT_VERSION})"
        )
    return payload


def load_model(
    model_dir: str | os.PathLike, expected_fingerprint: str | None = None, *, weights_sha256: str | None = None
) -> TrainedModel:
    """The :class:`TrainedModel` in ``model_dir`` (on the CPU).

    ``expected_fingerprint``: the feature fingerprint of the backbone that will feed it; a
    model trained on other features is refused. ``weights_sha256``: the weights file's digest
    when the caller has just checked it (the model store's manifest); it is compared with the
    one in ``model.json`` instead of hashing the weights again."""
    payload = read_model_json(model_dir)
    try:
        backbone = dict(payload["backbone"])
        if expected_fingerprint is not None and backbone.get("fingerprint") != expected_fingerprint:
            raise ModelLoadError(
                f"{model_dir}: trained on features of {backbone.get('name')} "
                f"(fingerprint {backbone.get('fingerprint')}), but this backbone's fingerprint is "
                f"{expected_fingerprint}; retrain the model for this backbone"
            )
        arch = dict(payload["architecture"])
        dim = int(arch.pop("dim"))
        cfg = ModelSettings(**arch)
        stats = CooccurrenceStats.from_json(payload["cooccurrence"])
        labels = [str(n) for n in payload["labels"]]
        native_dim = int(backbone.get("native_dim") or dim)
        calibration = {str(k): Calibration.from_json(v) for k, v in (payload.get("calibration") or {}).items()}
    except ModelLoadError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{model_dir}: {MODEL_JSON} is incomplete or invalid ({exc})") from exc
    weights = Path(model_dir) / WEIGHTS
    state = _read_weights(weights, payload.get("weights_sha256"), weights_sha256)
    module = SigRL(dim, cfg, 1.0, 0.0, native_dim)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{weights}: does not match the architecture in {MODEL_JSON} ({str(exc)[:200]})") from exc
    module.eval()
    return TrainedModel(
        module=module,
        labels=labels,
        stats=stats,
        backbone=backbone,
        loss=payload.get("loss") or {},
        train=payload.get("train") or {},
        seed=int(payload.get("seed") or 0),
        summary=payload.get("summary") or {},
        taxonomy=payload.get("taxonomy"),
        model_id=str(payload.get("model_id") or ""),
        calibration=calibration,
    )



def _read_weights(weights: Path, recorded: str | None, known: str | None) -> dict:
    """The state dict in ``weights``, read once, whose SHA-256 (``known``, else hashed from the
    bytes read) must be the one ``model.json`` records (when it records one)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = weights.read_bytes()
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{weights.parent}: no {WEIGHTS}") from exc
    if recorded and (known or hashlib.sha256(data).hexdigest()) != recorded:
        raise ModelLoadError(f"{weights}: checksum mismatch (corrupt or replaced weights)")
    try:
        return load(data)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{weights}: unreadable ({exc})") from exc
