"""semlabel's model behind label-studio-ml's ``LabelStudioMLBase`` contract.

:class:`SemlabelModel` is what label-studio-ml calls a model: ``predict(tasks, context=...)``
returns one Label Studio prediction per task, ``fit(...)``/``process_event(...)`` take Label
Studio's events. Instances are cheap (one per project and label config, cached): the heavy
parts — backbone, feature cache, served models — live in the process's shared
:class:`~.service.BackendService`.

label-studio-ml 1.0.9's own Flask server is not used: against Label Studio 1.23 it answers
``GET /versions`` with 405, fails ``/predict`` before ``/setup`` in the same process, re-creates
the model on every ``/setup``, drops ``START_TRAINING`` and ``ANNOTATIONS_DELETED`` and lets
webhook jobs collide within a second. :mod:`.app` serves every route itself and calls
:class:`~.predict.Predictions` directly; this class is not on that path. It is kept as the
label-studio-ml contract semlabel promises (README, *The pinned web stack*): code written for
``LabelStudioMLBase`` — label-studio-ml's own server or tools — can drive semlabel through it.
"""

from __future__ import annotations

import multiprocessing
from typing import Any


def _import_base():
    # label_studio_ml.model switches the process to the "spawn" start method at import; undo
    # that so the rest of semlabel (and RQ's forks) keep the platform default.
    before = multiprocessing.get_start_method(allow_none=True)
    from label_studio_ml.model import LabelStudioMLBase

    if before is None:
        multiprocessing.set_start_method(None, force=True)
    return LabelStudioMLBase


LabelStudioMLBase = _import_base()


class SemlabelModel(LabelStudioMLBase):
    """One project's model as label-studio-ml sees it."""

    def __init__(self, service, project: str | None = None, label_config: str | None = None, **kwargs):
        super().__init__(label_config=label_config, **kwargs)
        self.service = service
        self.project = project
        self.config = service.configs.get(label_config) if label_config else None

    @property
    def model_version(self) -> str:
        return self.service.predictor(self.project).version

    def predict(self, tasks, context: Any = None, **kwargs) -> list[dict]:
        """One prediction per task, in order; with ``context`` (interactive pre-annotation)
        the annotator's partial choices plus suggestions with reasons."""
        config = self.config or self.service.configs.get(self.label_config)
        entries, _ = self.service.predictions.predict(self.project, config, list(tasks), context)
        return entries

    def fit(self, tasks, workdir=None, event: str | None = None, data: dict | None = None, **kwargs) -> dict:
        """Record a Label Studio event (persisted in Redis; training is debounced and runs on
        the RQ ``gpu`` queue). Returns what :func:`backend.queue.eventlog.record_webhook` did."""
        from ..queue.webhook import parse_webhook
        from .webhooks import handle_webhook

        payload = dict(data or {})
        if event:
            payload["action"] = event
        return handle_webhook(self.service, parse_webhook(payload, self.service.settings))

    def process_event(self, event, data, job_id=None, additional_params=None):
        # Every event goes to fit(): the base class ignores START_TRAINING and all deletions.
        return self.fit((), event=event, data=data, job_id=job_id, **(additional_params or {}))
