"""The model store: versioned trained models, the promotion gate and the models served.

- :mod:`.versions` — :class:`ModelStore`: publish (atomic), list, verify, promote, rollback,
  prune; :class:`PublishResult`, :class:`VersionInfo`;
- :mod:`.pointer` — which version is current: the ``CURRENT`` file, its Redis mirror, the
  announcement (Redis key and channel names);
- :mod:`.gate` — :class:`GateDecision` and :func:`decide`, the promotion gate (pure);
- :mod:`.manifest` — ``manifest.json``: every file's size and SHA-256 (the one hash);
- :mod:`.history` — ``history.jsonl`` and ``refused.json``, a project's story;
- :mod:`.served` — :class:`ServedModels`: the predictor per project in this process, hot swap;
- :mod:`.ids`, :mod:`.files` — version/project ids; durable writes.
"""

from .files import atomic_write_json
from .gate import GateDecision, decide
from .ids import check_project, is_version_id, new_version_id
from .served import ServedModels
from .versions import ModelStore, PublishResult, VersionInfo

__all__ = [
    "GateDecision",
    "ModelStore",
    "PublishResult",
    "ServedModels",
    "VersionInfo",
    "atomic_write_json",
    "check_project",
    "decide",
    "is_version_id",
    "new_version_id",
]
