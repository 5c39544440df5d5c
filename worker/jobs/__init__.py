"""RQ job bodies. The backend enqueues them by dotted name (``worker.jobs.train_project``,
``worker.jobs.extract_features``, failure callback ``worker.jobs.record_failure``): these
names are this package's public API."""

from .features import extract_features
from .progress import record_failure
from .train import train_project

__all__ = ["extract_features", "record_failure", "train_project"]
