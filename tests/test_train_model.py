"""Training the SigRL heads on real images (Fashion-MNIST mosaics, packaged-backbone features),
saving, loading and serving the result."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from backend.errors import ModelLoadError
from backend.model import load_predictor, save_model
from backend.settings import Settings
from backend.model.sigrl import SigRL, label_graph
from worker.bench.fashion import partial_labels
from worker.eval.metrics import mean_average_precision
from worker.training.data import Example
from worker.training.fit import sample_known
from worker.training.train import train_model

FIT_ROWS = Settings().train.projection_fit_rows

FAST = Settings().train.with_changes(epochs=20, patience=20, batch_size=64, lr=3e-3, val_fraction=0.2, seed=0, known_rate=0.5)


def _examples(fashion_set, drop: str | None = None):
    observed = partial_labels(fashion_set["train"]["labels"], "partial", np.random.default_rng(0), 0.5)
    out = []
    for path, names in zip(fashion_set["train"]["paths"], observed):
        names = [n for n in names if n != drop]
        out.append(Example(str(path), names))
    keep = [i for i, e in enumerate(out) if e.positives]
    return [out[i] for i in keep], keep


def _test_scores(model, space, fashion_set, known=None):
    module = model.module.eval()
    graph = label_graph(model.stats, space.names, space.embeddings, module.cfg)
    with torch.no_grad():
        return module(fashion_set["test"]["batch"], space.embeddings, graph, known).logits


def _y(label_sets, names):
    y = torch.zeros(len(label_sets), len(names))
    for i, labels in enumerate(label_sets):
        for n in labels:
            y[i, names.index(n)] = 1
    return y


@pytest.fixture(scope="module")
def trained(fashion_set, runtime, settings):
    examples, _ = _examples(fashion_set)
    space = runtime.label_space(fashion_set["classes"])
    records = []
    result = train_model(examples, space, fashion_set["train"]["batch"], settings,
                         backbone=runtime.backbone, train_cfg=FAST, progress=records.append, show_progress=False)
    return {"result": result, "space": space, "records": records, "examples": examples}


def test_short_training_beats_the_untrained_model(trained, fashion_set, runtime, settings):
    space, result = trained["space"], trained["result"]
    y = _y(fashion_set["test"]["labels"], space.names)
    untrained = SigRL(runtime.backbone.dim, settings.model, runtime.backbone.zero_shot_scale,
                      runtime.backbone.zero_shot_bias, runtime.backbone.native_dim)
    untrained.fit_feature_stats(fashion_set["train"]["batch"], FIT_ROWS)
    from backend.model.checkpoint import TrainedModel
    from backend.model.cooccurrence import CooccurrenceStats

    fresh = TrainedModel(untrained, space.names, CooccurrenceStats(), {})
    before = mean_average_precision(_test_scores(fresh, space, fashion_set), y)
    after = mean_average_precision(_test_scores(result.model, space, fashion_set), y)
    assert after > before + 0.15, (before, after)
    # The held-out split of the partial labels saw it too.
    assert result.metrics["split"] == "held-out partial labels" and result.metrics["mAP"] > 0.3
    assert result.summary["train_images"] + result.summary["val_images"] == len(trained["examples"])
    # Progress: one dict per epoch for the worker's job.meta, then a summary.
    epochs = [r for r in trained["records"] if r["stage"] == "train"]
    assert [r["epoch"] for r in epochs] == list(range(1, len(epochs) + 1))
    assert all({"loss", "val_auc", "seconds", "epochs"} <= set(r) for r in epochs)
    assert trained["records"][-1]["stage"] == "trained"


def test_training_is_deterministic_on_cpu(fashion_set, runtime, settings):
    examples, _ = _examples(fashion_set)
    space = runtime.label_space(fashion_set["classes"])
    cfg = FAST.model_copy(update={"epochs": 3, "patience": 3})
    features = fashion_set["train"]["batch"]
    runs = [train_model(examples, space, features, settings, backbone=runtime.backbone, train_cfg=cfg,
                        seed=7, show_progress=False) for _ in range(2)]
    a, b = (r.model.module.state_dict() for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = train_model(examples, space, features, settings, backbone=runtime.backbone, train_cfg=cfg, seed=8,
                        show_progress=False).model.module.state_dict()
    assert any(not torch.equal(a[k], other[k]) for k in a)


def test_known_label_sampling():
    y = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0]])
    for seed in range(20):
        known = sample_known(y, 1.0, torch.Generator().manual_seed(seed))
        assert (known <= y).all()  # only chosen labels become known
        assert known[1].sum() == 0  # one positive: nothing to hide
        assert 1 <= known[0].sum() <= 2 and known[2].sum() == 1  # at least one positive stays a target
    assert sample_known(y, 0.0, torch.Generator().manual_seed(0)).sum() == 0


def test_save_load_serve_and_suggest(trained, fashion_set, runtime, tmp_path):
    from backend.labels import Taxonomy
    from backend.settings import config_dir

    result, space = trained["result"], trained["space"]
    model_dir = save_model(result.model, tmp_path / "model", metrics=result.metrics)
    assert {p.name for p in model_dir.iterdir()} == {"weights.safetensors", "model.json", "metrics.json"}
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["backbone"]["fingerprint"] == runtime.backbone.fingerprint
    assert meta["labels"] == space.names and meta["cooccurrence"]["n_images"] == len(trained["examples"])
    assert json.loads((model_dir / "metrics.json").read_text())["mAP"] == result.metrics["mAP"]

    predictor = load_predictor(model_dir, runtime)
    assert predictor.version == f"sigrl-{meta['model_id']}@{runtime.backbone.name}"
    feats = fashion_set["test"]["features"][:8]
    probs = predictor.probabilities(feats, space)
    # served probabilities are the heads' logits through the saved per-label calibration
    calibration = predictor.model.calibration["visual"]
    expected = calibration.probabilities(_test_scores(result.model, space, fashion_set)[:8], space.names)
    assert torch.allclose(probs, expected, atol=1e-5)
    assert meta["calibration"]["visual"]["names"] == space.names
    assert 0.05 <= calibration.shared_rate <= 1.0

    # Known labels change the ranking of the others; suggestions carry plain-data reasons.
    taxonomy = Taxonomy.from_yaml(config_dir() / "bench" / "fashion_taxonomy.yaml")
    tspace = runtime.label_space(space.names, taxonomy)
    known = [fashion_set["test"]["labels"][i][:1] for i in range(8)]
    conditional = predictor.probabilities(feats, tspace, known)
    assert not torch.allclose(conditional, probs)
    suggestions = predictor.suggest(feats, tspace, known, top_k=3)
    assert len(suggestions) == 8 and all(len(s) == 3 for s in suggestions)
    for k, items in zip(known, suggestions):
        assert all(s.label not in k for s in items)
        assert [s.probability for s in items] == sorted((s.probability for s in items), reverse=True)
        first = items[0].to_dict()
        assert {"visual", "zero_shot", "co_occurring", "neighbours", "taxonomy_path"} <= set(first["reasons"])
        assert all(first["reasons"][k] is None for k in ("local", "mean_local", "attention", "spot"))  # no spot here
        assert first["reasons"]["taxonomy_path"][-1] == first["label"]
        assert len(first["reasons"]["neighbours"]) == 3
        for chosen, strength in first["reasons"]["co_occurring"]:
            assert chosen in k and 0 < strength <= 1
    assert any(s.reasons.co_occurring for items in suggestions for s in items)


def test_a_model_with_reduced_native_features_loads_with_its_full_native_width(fashion_set, runtime, settings,
                                                                                tmp_path):
    """Training reduces the native features once (principal bases); the saved model records
    the backbone's native width, not the reduced one, so it loads and scores raw features."""
    examples, _ = _examples(fashion_set)
    space = runtime.label_space(fashion_set["classes"])
    cfg = settings.model.with_changes(native_global_rank=16, native_local_rank=8)
    result = train_model(examples, space, fashion_set["train"]["batch"], settings, backbone=runtime.backbone,
                         model_cfg=cfg, train_cfg=FAST.model_copy(update={"epochs": 2, "patience": 2}),
                         show_progress=False)
    native = fashion_set["test"]["batch"].native_global.shape[1]
    assert result.model.backbone["native_dim"] == native and native > 16
    predictor = load_predictor(save_model(result.model, tmp_path / "model"), runtime)
    assert predictor.model.module.native_dim == native
    feats = fashion_set["test"]["features"][:8]
    expected = result.model.calibration["visual"].probabilities(
        _test_scores(result.model, space, fashion_set)[:8], space.names)
    assert torch.allclose(predictor.probabilities(feats, space), expected, atol=1e-5)


def test_bad_model_directories_are_refused(trained, runtime, tmp_path):
    good = save_model(trained["result"].model, tmp_path / "good")
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_predictor(tmp_path / "missing", runtime)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    data = bytearray((corrupt / "weights.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (corrupt / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="checksum mismatch"):
        load_predictor(corrupt, runtime)
    other = tmp_path / "other-backbone"
    shutil.copytree(good, other)
    meta = json.loads((other / "model.json").read_text())
    meta["backbone"]["fingerprint"] = "0" * 16
    (other / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="retrain"):
        load_predictor(other, runtime)
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    (broken / "model.json").write_text("{")
    with pytest.raises(ModelLoadError, match="unreadable"):
        load_predictor(broken, runtime)
    (broken / "model.json").unlink()
    with pytest.raises(ModelLoadError, match="no model.json"):
        load_predictor(broken, runtime)


def test_a_label_without_training_annotations_is_still_scored(fashion_set, runtime, settings):
    """Train without any 'Bag' annotation (and without 'Bag' in the label set); the model
    scores it afterwards from its text embedding, ranking test images that contain a bag
    above those that do not."""
    held = "Bag"
    examples, keep = _examples(fashion_set, drop=held)
    seen = [c for c in fashion_set["classes"] if c != held]
    result = train_model(examples, runtime.label_space(seen),
                         fashion_set["train"]["batch"][keep], settings,
                         backbone=runtime.backbone, train_cfg=FAST, show_progress=False)
    assert held not in result.model.labels and held not in result.model.stats.counts
    space = runtime.label_space(fashion_set["classes"])
    scores = _test_scores(result.model, space, fashion_set)[:, space.index[held]]
    truth = [held in labels for labels in fashion_set["test"]["labels"]]
    auc = roc_auc_score(truth, scores.numpy())
    assert auc > 0.6, auc


def test_single_positive_training_applies_no_untrained_known_label_term(fashion_set, runtime, settings):
    """With one chosen label per image the known-label expert never sees a training example
    (a known label needs a second chosen one to predict): at inference it must contribute
    nothing — known labels leave every probability as it is."""
    observed = partial_labels(fashion_set["train"]["labels"], "single", np.random.default_rng(0))
    examples = [Example(str(p), names) for p, names in zip(fashion_set["train"]["paths"], observed)]
    space = runtime.label_space(fashion_set["classes"])
    cfg = FAST.model_copy(update={"epochs": 3, "patience": 3})
    result = train_model(examples, space, fashion_set["train"]["batch"], settings, backbone=runtime.backbone,
                         train_cfg=cfg, show_progress=False)
    assert result.summary["known_samples"] == 0 and result.summary["known_expert"] is False
    assert float(result.model.module.known_active) == 0.0
    assert "conditional" not in result.model.calibration
    from backend.model.serving import SigRLPredictor

    predictor = SigRLPredictor.from_settings(result.model, Settings())
    feats = fashion_set["test"]["features"][:16]
    known = [labels[:1] for labels in fashion_set["test"]["labels"][:16]]
    assert torch.equal(predictor.probabilities(feats, space, known), predictor.probabilities(feats, space))
    # ... while partial labels (images with several chosen labels) do train it.
    partial, _ = _examples(fashion_set)
    trained = train_model(partial, space, fashion_set["train"]["batch"], settings, backbone=runtime.backbone,
                          train_cfg=cfg, show_progress=False)
    assert trained.summary["known_expert"] is True and float(trained.model.module.known_active) == 1.0
