"""Label texts, the text-embedding cache and the taxonomy."""

from __future__ import annotations

import pytest
import torch

from backend.errors import ConfigError
from backend.labels import Label, Taxonomy, TextEmbeddingCache, prompt_texts


def test_prompt_ensemble_weights_name_and_extra_texts():
    pairs = prompt_texts(Label("dog", ("puppy",)), ["a photo of a {}.", "{} in the wild"], name_weight=2.0)
    assert pairs == [
        ("a photo of a dog.", 2.0), ("dog in the wild", 2.0),
        ("a photo of a puppy.", 1.0), ("puppy in the wild", 1.0),
    ]


def test_text_cache_computes_each_text_once(tmp_path, runtime):
    cache = TextEmbeddingCache(tmp_path / "t.sqlite", wait_s=30.0)
    calls: list[list[str]] = []

    def encode(texts):
        calls.append(list(texts))
        return runtime.backbone.encode_texts(texts)

    first = cache.get_or_compute("enc", ["a cat", "a dog", "a cat"], encode)
    second = TextEmbeddingCache(tmp_path / "t.sqlite", wait_s=30.0).get_or_compute("enc", ["a dog", "a bird"], encode)
    assert calls == [["a cat", "a dog"], ["a bird"]]  # persisted across instances, per text
    assert torch.equal(first[1], second[0]) and torch.equal(first[0], first[2])
    assert first.shape == (3, 384)


def _open_and_write(path, start, results):
    start.wait()
    try:
        vec = TextEmbeddingCache(path, wait_s=30.0).get_or_compute("enc", ["a cat"], lambda t: torch.ones(len(t), 4))
        results.put(float(vec.sum()))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        results.put(repr(exc))


def test_processes_opening_a_new_text_cache_at_once_all_succeed(tmp_path):
    """`serve --with-worker` starts a backend and a worker that open the same new cache file
    together; sqlite's switch to WAL then answers "locked" at once to the loser."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for attempt in range(15):
        path = tmp_path / f"t{attempt}.sqlite"
        start, results = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_open_and_write, args=(path, start, results)) for _ in range(4)]
        for proc in procs:
            proc.start()
        start.set()
        outcomes = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        assert outcomes == [4.0] * 4, outcomes


def test_aliases_move_a_label_towards_their_meaning(runtime):
    plain = runtime.label_space(["Ankle boot", "Sneaker", "Bag"])
    aliased = runtime.label_space([Label("Ankle boot"), Label("Sneaker"), Label("Bag", ("handbag", "purse"))])
    purse = runtime.backbone.encode_texts(["a photo of a purse."])[0]
    assert aliased.embeddings[2] @ purse > plain.embeddings[2] @ purse
    assert torch.equal(aliased.embeddings[0], plain.embeddings[0])


def test_label_space_rejects_duplicates_and_empty(runtime):
    with pytest.raises(ConfigError, match="duplicate"):
        runtime.label_space(["cat", "cat"])
    with pytest.raises(ConfigError):
        runtime.label_space([])
    with pytest.raises(ConfigError):
        Label("  ")


def test_taxonomy_paths_and_lca_distance(tmp_path):
    path = tmp_path / "tax.yaml"
    path.write_text(
        "clothing:\n"
        "  tops: [T-shirt/top, Pullover, Shirt, Coat]\n"
        "  bottoms: [Trouser]\n"
        "  footwear:\n"
        "    shoes: [Sneaker, Ankle boot]\n"
        "    open: [Sandal]\n"
        "accessories: [Bag]\n"
    )
    tax = Taxonomy.from_yaml(path)
    assert tax.path("Sneaker") == ["clothing", "footwear", "shoes", "Sneaker"]
    assert tax.path("Bag") == ["accessories", "Bag"]
    assert tax.lca_distance("Sneaker", "Sneaker") == 0
    assert tax.lca_distance("Sneaker", "Ankle boot") == 1
    assert tax.lca_distance("Sneaker", "Sandal") == 2
    assert tax.lca_distance("Shirt", "Sandal") == 3
    assert tax.lca_distance("Bag", "Sandal") == 4
    with pytest.raises(ConfigError, match="appears under both"):
        Taxonomy.from_tree({"a": ["x"], "b": ["x"]})
