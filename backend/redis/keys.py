"""The name of every Redis key and pub/sub channel semlabel uses, under ``redis.key_prefix``.

One place, so a newcomer (or an operator reading ``redis-cli --scan``) finds what each key
holds, and no two modules spell the same key differently. RQ's own keys (``rq:...``) are
RQ's business and not named here.

========================================  ====================================================
key                                       what it holds
========================================  ====================================================
``<prefix>:events:<project>``             stream: the project's webhook events (the event log)
``<prefix>:state:<project>``              hash: the snapshot the event log was folded into
``<prefix>:seen:<project>``               sorted set: recent event identities → stored at (dedup)
``<prefix>:pending:<project>``            hash: the project's pending training job, its due time
``<prefix>:training:<project>``           string: the training lock (JSON of the holder)
``<prefix>:jobs:<project>``               list: the project's recent training job ids
``<prefix>:project:<project>``            hash: what webhooks told about it (label config, title)
``<prefix>:tasks:<project>``              hash: task id → task ``data`` JSON
``<prefix>:projects``                     set: projects that sent a webhook
``<prefix>:ls:<project>``                 hash: what ``/setup`` told (Label Studio URL, token ref)
``<prefix>:review``                       stream: review jobs, drained by the backends
``<prefix>:review:seen:<project>``        hash: annotation id → the edit last reviewed
``<prefix>:review:annotations:<project>`` hash: annotation id → task id (of review predictions)
``<prefix>:current:<project>``            string: the project's served model version
``<prefix>:models``                       channel: served-version changes (``{"project", "version"}``)
========================================  ====================================================
"""

from __future__ import annotations

from ..settings import Settings, get_settings


class Keys:
    """Names of semlabel's Redis keys and channels (see the module doc)."""

    def __init__(self, prefix: str = "semlabel"):
        self.prefix = prefix

    def _name(self, *parts: str | int) -> str:
        return ":".join([self.prefix, *(str(p) for p in parts)])

    # -- event log and training trigger ------------------------------------------------------
    def events(self, project: str) -> str:
        return self._name("events", project)

    def state(self, project: str) -> str:
        """Hash: the snapshot the event stream was folded into."""
        return self._name("state", project)

    def seen(self, project: str) -> str:
        """Sorted set: identities of the project's recent events → when stored (dedup)."""
        return self._name("seen", project)

    def pending(self, project: str) -> str:
        return self._name("pending", project)

    def lock(self, project: str) -> str:
        return self._name("training", project)

    def jobs(self, project: str) -> str:
        return self._name("jobs", project)

    def project(self, project: str) -> str:
        return self._name("project", project)

    def tasks(self, project: str) -> str:
        """Hash task id → task ``data`` JSON (from TASKS_CREATED webhooks and /predict)."""
        return self._name("tasks", project)

    @property
    def projects(self) -> str:
        return self._name("projects")

    # -- Label Studio ------------------------------------------------------------------------
    def setup(self, project: str) -> str:
        """Hash: what ``/setup`` told about Label Studio (``url``, ``token_ref``)."""
        return self._name("ls", project)

    @property
    def review(self) -> str:
        """Stream: review jobs (one consumer group of all backend processes)."""
        return self._name("review")

    def review_seen(self, project: str) -> str:
        return self._name("review", "seen", project)

    def review_annotations(self, project: str) -> str:
        return self._name("review", "annotations", project)

    # -- model store -------------------------------------------------------------------------
    def current(self, project: str) -> str:
        """String: the version the project's served model is."""
        return self._name("current", project)

    @property
    def models(self) -> str:
        """Pub/sub channel announcing changes of a project's served version."""
        return self._name("models")


def keys_for(settings: Settings | None = None) -> Keys:
    return Keys((settings or get_settings()).redis.key_prefix)
