"""Metrics on hand-checked cases; `semlabel train` + `semlabel eval` on real exports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.labels import Taxonomy
from worker.bench.fashion import label_config_xml, label_studio_export, partial_labels
from worker.eval.metrics import (
    calibration,
    edit_cost,
    evaluate_scores,
    label_subset_map,
    selection_f1,
    selection_metrics,
    hidden_recall_at_k,
    hide_positives,
    hierarchical_distance_at_k,
    mean_average_precision,
    mistake_severity,
    precision_recall_at_k,
)

NAMES = ["a", "b", "c", "d"]
TAX = Taxonomy.from_tree({"x": ["a", "b"], "y": {"z": ["c"], "w": ["d"]}})


def test_map_and_precision_recall_at_k():
    y = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 1]])
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.2, 0.9, 0.1, 0.3], [0.5, 0.6, 0.1, 0.4]])
    # AP per label: a: positives at ranks 1 and 2 of [0.9, 0.5, 0.2] → 1; b: [0.9 (+), 0.8, 0.6] → 1;
    # c: its positive 0.7 ranks first → 1; d: its positive 0.4 ranks first → 1.
    assert mean_average_precision(scores, y) == pytest.approx(1.0)
    worse = scores.clone()
    worse[0, 2] = 0.0  # c's only positive now ranks last of three → AP 1/3
    assert mean_average_precision(worse, y) == pytest.approx((1 + 1 + 1 / 3 + 1) / 4)
    p, r, f1 = precision_recall_at_k(scores, y, 1)
    # top-1: a (hit), b (hit), b (miss)
    assert (p, r) == (pytest.approx(2 / 3), pytest.approx((1 / 2 + 1 + 0) / 3))
    assert f1 == pytest.approx(2 * p * r / (p + r))


def test_hidden_positive_recall_and_taxonomy_metrics():
    y = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 1, 1]])
    known, hidden = hide_positives(y, seed=3)
    assert torch.equal(known + hidden, torch.where(y.sum(1, keepdim=True) >= 2, y, torch.zeros_like(y)))
    assert (known.sum(1)[[0, 2]] >= 1).all() and (hidden.sum(1)[[0, 2]] >= 1).all()
    assert known[1].sum() == hidden[1].sum() == 0  # a single positive cannot be split
    k = torch.tensor([[1.0, 0, 0, 0]])
    h = torch.tensor([[0.0, 1, 1, 0]])
    s = torch.tensor([[0.99, 0.1, 0.8, 0.9]])  # ranking of the non-known: d, c, b
    assert hidden_recall_at_k(s, k, h, 1) == 0.0
    assert hidden_recall_at_k(s, k, h, 2) == pytest.approx(0.5)
    assert hidden_recall_at_k(s, k, h, 3) == pytest.approx(1.0)
    # Mistake severity: image 0 predicts d (truth {a}); LCA(d, a) is the root: height 3.
    y2 = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0]])
    s2 = torch.tensor([[0.1, 0.2, 0.3, 0.9], [0.1, 0.2, 0.9, 0.3]])
    assert mistake_severity(s2, y2, TAX, NAMES) == 3.0
    # hier. distance@2: image 0 top-2 {d, c}: 3 and 3; image 1 {c (hit), d}: 0 and 2 (z, w under y).
    assert hierarchical_distance_at_k(s2, y2, TAX, NAMES, 2) == pytest.approx(((3 + 3) / 2 + (0 + 2) / 2) / 2)
    out = evaluate_scores(s2, y2, names=NAMES, ks=(1, 2), taxonomy=TAX)
    assert {"mAP", "P@1", "R@2", "F1@2", "mistake_severity", "hier_dist@1", "AP_per_label"} <= set(out)


def test_edit_cost_f1_and_unseen_label_ap_by_hand():
    y = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]])
    s = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    # task 0: b missed, c wrong -> 2; task 1 exact -> 0; task 2 blank -> its 2 true labels.
    assert edit_cost(s, y).tolist() == [2.0, 0.0, 2.0]
    assert edit_cost(torch.zeros_like(s), y).tolist() == y.sum(1).tolist()
    f = selection_f1(s, y)
    # TP 2 (a of task 0, c of task 1), FP 1, FN 3 -> micro-F1 4 / 8; per label: a 2/3, b 0, c 2/3, d 0.
    assert f["micro-F1"] == pytest.approx(0.5) and f["macro-F1"] == pytest.approx((2 / 3 + 0 + 2 / 3 + 0) / 4)
    assert (f["micro-precision"], f["micro-recall"]) == (pytest.approx(2 / 3), pytest.approx(2 / 5))
    m = selection_metrics(s.float() * 0.9, s, y, bins=15, strategy="equal_mass")
    assert m["edit_cost"] == pytest.approx(4 / 3, abs=1e-4) and m["blank_edit_cost"] == pytest.approx(5 / 3, abs=1e-4)
    assert m["edit_cost_vs_blank"] == pytest.approx(0.8, abs=1e-4) and m["selected_per_task"] == pytest.approx(1.0)
    scores = torch.tensor([[0.9, 0.1, 0.2, 0.3], [0.1, 0.2, 0.8, 0.4], [0.3, 0.9, 0.1, 0.2]])
    sub = label_subset_map(scores, y, [1, 3])
    # b: its positive (0.1) ranks last of three -> AP 1/3; d: its positive (0.2) ranks third -> 1/3.
    assert set(sub["AP"]) == {1, 3} and sub["mAP"] == pytest.approx(1 / 3)


def test_expected_calibration_error_on_known_cases():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(4000, 5))
    calibrated = (rng.uniform(size=p.shape) < p).astype(np.float32)
    for strategy in ("equal_width", "equal_mass"):
        assert calibration(p, calibrated, 10, strategy)["ECE"] < 0.02
        # Over-confident by a fixed 0.2 where p > 0.2: ECE = 0.2 * P(p > 0.2) = 0.16 (+ noise).
        shifted = np.where(p > 0.2, p - 0.2, p)
        truth = (rng.uniform(size=p.shape) < shifted).astype(np.float32)
        assert calibration(p, truth, 10, strategy)["ECE"] == pytest.approx(0.16, abs=0.02)
    # Hand-checked: two bins of equal width; pairs (0.1, 0), (0.3, 1), (0.8, 1), (0.6, 0).
    out = calibration(np.array([0.1, 0.3, 0.8, 0.6]), np.array([0, 1, 1, 0]), 2, "equal_width")
    # bin [0, .5): mean p 0.2, frequency 0.5; bin [.5, 1]: mean p 0.7, frequency 0.5 -> ECE 0.5*0.3 + 0.5*0.2
    assert out["ECE"] == pytest.approx(0.25) and [b["count"] for b in out["bins"]] == [2, 2]
    mass = calibration(rng.beta(0.2, 3.0, size=2000), np.zeros(2000), 8, "equal_mass")
    counts = [b["count"] for b in mass["bins"]]
    assert len(counts) == 8 and max(counts) - min(counts) <= 1  # equal mass: ~n / bins pairs each
    with pytest.raises(ValueError):
        calibration(p, calibrated, 10, "nope")


def _semlabel(*args, timeout=600):
    exe = shutil.which("semlabel") or str(Path(sys.executable).parent / "semlabel")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def test_train_and_eval_commands_on_label_studio_exports(fashion_set, tmp_path):
    """The CLI round trip a user runs: export → `semlabel train` → `semlabel eval --report`."""
    classes = fashion_set["classes"]
    train = fashion_set["train"]
    test = fashion_set["test"]
    root = fashion_set["root"]
    observed = partial_labels(train["labels"], "partial", np.random.default_rng(0), 0.5)
    rel = lambda paths: [f"/data/local-files/?d={p.name}" for p in paths]  # noqa: E731
    (tmp_path / "train.json").write_text(json.dumps(label_studio_export(rel(train["paths"]), observed)))
    (tmp_path / "test.json").write_text(json.dumps(label_studio_export(rel(test["paths"][:80]), test["labels"][:80])))
    (tmp_path / "config.xml").write_text(label_config_xml(classes))
    model_dir = tmp_path / "model"
    env_cfg = tmp_path / "fast.yaml"
    env_cfg.write_text("train:\n  epochs: 8\n  patience: 8\n")
    os.environ["SEMLABEL_CONFIG"] = str(env_cfg)
    try:
        trained = _semlabel("train", "--export", str(tmp_path / "train.json"), "--images-root", str(root),
                            "--label-config", str(tmp_path / "config.xml"), "--out", str(model_dir))
        assert trained.returncode == 0, trained.stderr
        summary = json.loads(trained.stdout)
        assert summary["export"]["examples"] == len(train["paths"]) and summary["summary"]["epochs_run"] <= 8
        assert (model_dir / "model.json").is_file()
        taxonomy = Path(__file__).resolve().parent.parent / "configs" / "bench" / "fashion_taxonomy.yaml"
        evaluated = _semlabel("eval", "--export", str(tmp_path / "test.json"), "--images-root", str(root),
                              "--model", str(model_dir), "--taxonomy", str(taxonomy),
                              "--report", str(tmp_path / "report"))
    finally:
        del os.environ["SEMLABEL_CONFIG"]
    assert evaluated.returncode == 0, evaluated.stderr
    out = json.loads(evaluated.stdout)
    for key in ("mAP", "F1@3", "F1@5", "P@3", "R@3", "P@5", "R@5", "hidden_recall@3", "mistake_severity",
                "hier_dist@3", "unconditioned_hidden_recall", "zero_shot", "version", "backbone"):
        assert key in out, key
    assert out["images"] == 80 and out["version"].startswith("sigrl-")
    assert out["zero_shot"]["mAP"] < out["mAP"]
    assert {"mAP", "F1@3", "hidden_recall@3"} <= set(out["zero_shot"])
    # What an annotator sees: the backend's pre-selection on the served probabilities.
    for view in (out, out["zero_shot"]):
        assert view["blank_edit_cost"] == pytest.approx(np.mean([len(x) for x in test["labels"][:80]]), abs=1e-3)
        assert 0.0 <= view["edit_cost"] <= 10.0 and 0.0 <= view["micro-F1"] <= 1.0 and 0.0 <= view["ECE"] <= 1.0
        assert sum(b["count"] for b in view["calibration"]["bins"]) == 80 * len(classes)
    report = tmp_path / "report"
    assert {"report.md", "pr_curves.png", "label_graph.png", "eval.json", "reliability.png"} <= {
        p.name for p in report.iterdir()}
    assert (report / "pr_curves.png").stat().st_size > 10_000
    assert "![PR curves](pr_curves.png)" in (report / "report.md").read_text()

    bad = _semlabel("eval", "--export", str(tmp_path / "test.json"), "--model", str(tmp_path))
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("semlabel: error:")
    assert "no model.json" in bad.stderr
    assert "Traceback" not in bad.stderr
