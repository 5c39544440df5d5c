"""Heads on top of the frozen backbone: zero-shot, SigRL (GMC + SVFR), suggestions.

Serving API (details in each module):

- ``load_predictor(model_dir, runtime) -> SigRLPredictor`` (:mod:`.serving`), raising
  :class:`~backend.errors.ModelLoadError` for a corrupt or mismatched directory;
- ``save_model(trained, out_dir, metrics)`` / ``load_model(model_dir)`` (:mod:`.checkpoint`).
"""

from __future__ import annotations

_LAZY = {
    "load_predictor": ".serving",
    "SigRLPredictor": ".serving",
    "save_model": ".checkpoint",
    "load_model": ".checkpoint",
    "read_model_json": ".checkpoint",
    "TrainedModel": ".checkpoint",
}


def __getattr__(name):  # imported on first use: the backbone-only paths stay light
    if name == "ModelLoadError":
        from ..errors import ModelLoadError

        return ModelLoadError
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)


__all__ = [*_LAZY, "ModelLoadError"]
