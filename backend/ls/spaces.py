"""The label spaces of the label configs a backend process serves, embedded once each.

A :class:`~backend.labels.LabelSpace` (names, prompt texts, text embeddings, taxonomy) is
built the first time a ``<Choices>`` label set is seen and kept (LRU) by the labels
themselves, so every request with that label set gets the same object: the heads cache what
they derive from it by its identity.

The text encoder runs for new labels only, under its own lock: one new label set at a time,
while requests with known labels keep the compute lock.
"""

from __future__ import annotations

import threading

from ..lru import LRU
from .config import Binding


class LabelSpaces:
    """Args: ``runtime`` returns the loaded :class:`~backend.runtime.Runtime`; ``taxonomy``
    (optional) is passed to every space; ``size``: label sets kept (``backend.max_label_spaces``)."""

    def __init__(self, runtime, size: int, taxonomy=None):
        self._runtime = runtime
        self.taxonomy = taxonomy
        self._spaces: LRU[tuple, object] = LRU(size)
        #: held while a new label set is being embedded
        self.embedding = threading.Lock()

    def get(self, binding: Binding):
        """The label space of ``binding``'s labels."""
        hit = self._spaces.get(binding.labels)
        if hit is not None:
            return hit
        with self.embedding:
            return self._spaces.get_or_create(binding.labels, lambda: self._runtime().label_space(
                binding.labels, taxonomy=self.taxonomy))
