"""Labels as the model sees them: names, prompt texts, text embeddings, taxonomy.

A :class:`Label` is a name plus optional extra texts (Label Studio ``alias``/``hint``,
descriptions, synonyms). Its embedding is the normalised weighted mean of the prompt
ensemble over all its texts (``configs: prompts``). Embeddings are cached on disk by
(text encoder, text), so adding a label costs one encoder call for the new texts only.
"""

from __future__ import annotations

import hashlib
import logging
import random
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Label:
    """One label: its name (what Label Studio stores) and extra prompt texts."""

    name: str
    texts: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"label name must be a non-empty string, got {self.name!r}")

    @classmethod
    def coerce(cls, value: "Label | str") -> "Label":
        return value if isinstance(value, Label) else cls(str(value))


class TextEmbeddingCache:
    """SQLite-backed cache of text embeddings keyed by (encoder fingerprint, text).

    SQLite serialises writers across processes; WAL lets readers proceed meanwhile.
    ``max_rows`` bounds it: a side table records when each row was last used, and past the
    bound the least recently used rows are deleted (their pages are reused, and the WAL is
    truncated), so label configs sent from outside cannot grow the file without end. The
    embeddings table keeps its original four columns, so an older semlabel sharing the file
    still writes to it (its rows count as least recently used).
    """

    def __init__(self, path: str | Path | None, max_rows: int | None = None, *, wait_s: float):
        self.path = Path(path) if path else None
        self.max_rows = max_rows
        self.wait_s = wait_s
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_settings(cls, settings) -> "TextEmbeddingCache":
        """The cache under ``<data_dir>`` bounded by ``limits.text_cache_*``."""
        limits = settings.limits
        return cls(settings.text_cache_path, limits.text_cache_max_rows, wait_s=limits.text_cache_wait_s)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            if self.path is None:
                self._conn = self._init(sqlite3.connect(":memory:", check_same_thread=False))
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = self._open_shared(self.path, self.wait_s)
        return self._conn

    @staticmethod
    def _init(conn: sqlite3.Connection) -> sqlite3.Connection:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS text_embedding ("
            " encoder TEXT NOT NULL, text_hash TEXT NOT NULL, dim INTEGER NOT NULL,"
            " vector BLOB NOT NULL, PRIMARY KEY (encoder, text_hash))"
        )
        conn.execute(
            "CREATE TABLE IF NOT EXISTS text_embedding_used ("
            " encoder TEXT NOT NULL, text_hash TEXT NOT NULL, last_used REAL NOT NULL,"
            " PRIMARY KEY (encoder, text_hash))"
        )
        conn.execute("CREATE INDEX IF NOT EXISTS text_embedding_used_at ON text_embedding_used (last_used)")
        conn.commit()
        return conn

    @classmethod
    def _open_shared(cls, path: Path, wait_s: float) -> sqlite3.Connection:
        """Open the file that backend and worker processes share. Switching a new file to WAL
        answers "database is locked" at once, without sqlite's busy wait, while another
        process does the same (``serve --with-worker`` starts two at once): retry that."""
        deadline = time.monotonic() + wait_s
        while True:
            conn = sqlite3.connect(str(path), timeout=wait_s, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return cls._init(conn)
            except sqlite3.OperationalError as exc:
                conn.close()
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.01, 0.05))

    @staticmethod
    def _hash(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def get_or_compute(
        self,
        encoder: str,
        texts: Sequence[str],
        compute: Callable[[list[str]], torch.Tensor],
    ) -> torch.Tensor:
        """Embeddings ``[len(texts), D]`` (float32), computing only the missing texts."""
        unique = list(dict.fromkeys(texts))
        found: dict[str, np.ndarray] = {}
        with self._lock:
            db = self._db()
            hashes = {t: self._hash(t) for t in unique}
            for start in range(0, len(unique), 500):
                chunk = unique[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    f"SELECT text_hash, dim, vector FROM text_embedding WHERE encoder=? "
                    f"AND text_hash IN ({marks})",
                    [encoder, *(hashes[t] for t in chunk)],
                ).fetchall()
                by_hash = {h: np.frombuffer(v, dtype=np.float32).reshape(d) for h, d, v in rows}
                for t in chunk:
                    if hashes[t] in by_hash:
                        found[t] = by_hash[hashes[t]]
                if self.max_rows and by_hash:
                    self._touch(db, encoder, list(by_hash))
            if self.max_rows and found:
                db.commit()
        missing = [t for t in unique if t not in found]
        self.hits += len(unique) - len(missing)
        self.misses += len(missing)
        if missing:
            vectors = compute(missing).detach().float().cpu().numpy()
            with self._lock:
                db = self._db()
                db.executemany(
                    "INSERT OR REPLACE INTO text_embedding VALUES (?, ?, ?, ?)",
                    [
                        (encoder, self._hash(t), v.shape[0], v.astype(np.float32).tobytes())
                        for t, v in zip(missing, vectors)
                    ],
                )
                if self.max_rows:
                    self._touch(db, encoder, [self._hash(t) for t in missing])
                db.commit()
                if self.max_rows:
                    self._evict(db)
            found.update(zip(missing, vectors))
        return torch.from_numpy(np.stack([found[t] for t in texts]).astype(np.float32))

    @staticmethod
    def _touch(db: sqlite3.Connection, encoder: str, hashes: list[str]) -> None:
        now = time.time()
        db.executemany(
            "INSERT INTO text_embedding_used VALUES (?, ?, ?) "
            "ON CONFLICT (encoder, text_hash) DO UPDATE SET last_used = excluded.last_used",
            [(encoder, h, now) for h in hashes],
        )

    def _evict(self, db: sqlite3.Connection) -> int:
        """Delete the least recently used rows beyond ``max_rows``; returns how many."""
        (rows,) = db.execute("SELECT COUNT(*) FROM text_embedding").fetchone()
        extra = rows - self.max_rows
        if extra <= 0:
            return 0
        db.execute(
            "DELETE FROM text_embedding WHERE rowid IN (SELECT t.rowid FROM text_embedding t "
            "LEFT JOIN text_embedding_used u ON u.encoder = t.encoder AND u.text_hash = t.text_hash "
            "ORDER BY COALESCE(u.last_used, 0) LIMIT ?)", (extra,))
        db.execute(
            "DELETE FROM text_embedding_used WHERE NOT EXISTS (SELECT 1 FROM text_embedding t "
            "WHERE t.encoder = text_embedding_used.encoder AND t.text_hash = text_embedding_used.text_hash)")
        db.commit()
        if self.path is not None:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        log.info("text-embedding cache: removed the %d least recently used rows (limits.text_cache_max_rows=%d)",
                 extra, self.max_rows)
        return extra

    def rows(self) -> int:
        with self._lock:
            return self._db().execute("SELECT COUNT(*) FROM text_embedding").fetchone()[0]


@dataclass
class LabelSpace:
    """An ordered label list with its text embeddings ``H [C, D]``."""

    labels: list[Label]
    embeddings: torch.Tensor  # [C, D], L2-normalised
    taxonomy: "Taxonomy | None" = None
    encoder: str = ""
    index: dict[str, int] = field(init=False)

    def __post_init__(self):
        self.index = {label.name: i for i, label in enumerate(self.labels)}
        if len(self.index) != len(self.labels):
            dupes = sorted({l.name for l in self.labels if sum(m.name == l.name for m in self.labels) > 1})
            raise ConfigError(f"duplicate label names: {dupes}")

    @property
    def names(self) -> list[str]:
        return [label.name for label in self.labels]

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the names and the embedding matrix, computed once per space (a space is
        not changed after it is built): what caches of derived tensors are keyed by."""
        digest = hashlib.sha256("\x1f".join(self.names).encode())
        digest.update(self.embeddings.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def build(
        cls,
        labels: Iterable[Label | str],
        backbone,
        cache: TextEmbeddingCache,
        templates: Sequence[str],
        name_weight: float,
        taxonomy: "Taxonomy | None" = None,
    ) -> "LabelSpace":
        labels = [Label.coerce(l) for l in labels]
        if not labels:
            raise ConfigError("a label space needs at least one label")
        embeddings = embed_labels(labels, backbone, cache, templates, name_weight)
        return cls(labels, embeddings, taxonomy, encoder=backbone.text_fingerprint)


def prompt_texts(label: Label, templates: Sequence[str], name_weight: float) -> list[tuple[str, float]]:
    """(prompt, weight) pairs for one label: every template × (name and each extra text)."""
    pairs: list[tuple[str, float]] = []
    for i, text in enumerate((label.name, *label.texts)):
        weight = name_weight if i == 0 else 1.0
        for template in templates:
            pairs.append((template.format(text) if "{}" in template else f"{template} {text}", weight))
    return pairs


def embed_labels(
    labels: Sequence[Label],
    backbone,
    cache: TextEmbeddingCache,
    templates: Sequence[str],
    name_weight: float,
) -> torch.Tensor:
    """``[C, D]`` label embeddings (weighted prompt-ensemble means, L2-normalised)."""
    per_label = [prompt_texts(label, templates, name_weight) for label in labels]
    flat = [text for pairs in per_label for text, _ in pairs]
    vectors = cache.get_or_compute(backbone.text_fingerprint, flat, backbone.encode_texts)
    out, start = [], 0
    for pairs in per_label:
        weights = torch.tensor([w for _, w in pairs], dtype=torch.float32)
        chunk = vectors[start : start + len(pairs)]
        start += len(pairs)
        out.append((weights[:, None] * chunk).sum(0) / weights.sum())
    return F.normalize(torch.stack(out), dim=-1)


class Taxonomy:
    """A label tree read from YAML (format documented in ``configs/taxonomy.example.yaml``).

    The YAML is a nested mapping; a key is an inner node, a list holds leaves, and a
    mapping value of ``null`` is a leaf too::

        clothing:
          tops: [T-shirt/top, Pullover, Shirt, Coat]
          footwear: [Sandal, Sneaker, Ankle boot]
    """

    ROOT = "<root>"

    def __init__(self, parent: dict[str, str]):
        self.parent = parent

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Taxonomy":
        import yaml

        with open(path, encoding="utf-8") as fh:
            tree = yaml.safe_load(fh)
        return cls.from_tree(tree)

    @classmethod
    def from_tree(cls, tree) -> "Taxonomy":
        parent: dict[str, str] = {}

        def walk(node, up: str):
            if node is None:
                return
            if isinstance(node, str):
                add(node, up)
            elif isinstance(node, list):
                for item in node:
                    walk(item, up)
            elif isinstance(node, dict):
                for key, child in node.items():
                    add(str(key), up)
                    walk(child, str(key))
            else:
                raise ConfigError(f"taxonomy: unexpected {type(node).__name__} under {up!r}")

        def add(name: str, up: str):
            if name in parent and parent[name] != up:
                raise ConfigError(f"taxonomy: {name!r} appears under both {parent[name]!r} and {up!r}")
            parent[name] = up

        walk(tree, cls.ROOT)
        if not parent:
            raise ConfigError("taxonomy is empty")
        return cls(parent)

    def path(self, name: str) -> list[str]:
        """Root-to-node path (without the synthetic root); ``[name]`` for unknown names."""
        if name not in self.parent:
            return [name]
        out = [name]
        while self.parent.get(out[-1], self.ROOT) != self.ROOT:
            out.append(self.parent[out[-1]])
        return out[::-1]

    def lca_distance(self, a: str, b: str) -> int:
        """Height of the lowest common ancestor above the deeper node (0 when a == b).

        This is the mistake severity of Bertinetto et al. used by Perotti et al.
        """
        if a == b:
            return 0
        pa, pb = [self.ROOT, *self.path(a)], [self.ROOT, *self.path(b)]
        common = 0
        for x, y in zip(pa, pb):
            if x != y:
                break
            common += 1
        return max(len(pa), len(pb)) - common
