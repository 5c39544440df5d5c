"""`semlabel bench` end to end on a small real-image configuration."""

from __future__ import annotations

import json

import pytest

from backend.settings import Settings
from worker.bench.bench import run_bench
from worker.bench.summary import insert_readme_table
from worker.training.data import examples_from_tasks, label_config_binding, read_export


@pytest.fixture(scope="module")
def small_settings(settings) -> Settings:
    s = settings.model_copy(deep=True)
    s.train.epochs = 4
    s.train.patience = 4
    s.bench.timing_repeats = 1
    s.bench.seeds = [0, 1]
    return s


def test_small_bench_writes_label_studio_exports_reports_and_reuses_features(small_settings, tmp_path):
    methods = ["zero-shot", "linear probe + EM", "SigRL (GMC + SVFR)"]
    out = tmp_path / "bench"
    first = run_bench(out, train_images=60, test_images=40, settings=small_settings, methods=methods,
                      update_readme=False, timing=False, show_progress=False)
    # Label Studio exports: partial / single-positive train labels, complete test labels.
    cfg = label_config_binding((out / "label_config.xml").read_text())
    assert len(cfg.labels) == 10 and cfg.control == "label" and cfg.data_key == "image"
    test_tasks = read_export(out / "test.json")
    assert len(test_tasks) == 40 and test_tasks[0]["data"]["image"].startswith("/data/local-files/?d=images/")
    test_examples, _ = examples_from_tasks(test_tasks, cfg.names, images_root=out)
    single, _ = examples_from_tasks(read_export(out / "train_single.json"), cfg.names, images_root=out)
    partial, _ = examples_from_tasks(read_export(out / "train_partial.json"), cfg.names, images_root=out)
    assert all(len(e.positives) == 1 for e in single)
    assert all(2 <= len(e.positives) <= 4 for e in test_examples)
    assert any(len(e.positives) > 1 for e in partial)
    for s, p in zip(single, partial):  # the same images, and labels from the same complete set
        assert s.image == p.image
    assert (out / "images").is_dir() and len(list((out / "images").glob("*.png"))) == 100

    report = json.loads((out / "bench.json").read_text())
    assert report["features"]["computed"] == 100 and report["class_temperature"] == 16.0
    for mode in ("single", "partial"):
        rows = report["results"][mode]["rows"]
        assert set(methods) <= set(rows)
        for name in methods:
            row = rows[name]
            assert 0.0 < row["mAP"] <= 1.0 and "F1@3" in row and "hidden_recall@3" in row
            # What an annotator sees of the backend's decision rule on the served probabilities.
            assert 0.0 <= row["micro-F1"] <= 1.0 and 0.0 <= row["ECE"] <= 1.0
            assert row["blank_edit_cost"] == report["data"]["mean_labels_per_test_image"]
            assert row["edit_cost_vs_blank"] == pytest.approx(row["edit_cost"] / row["blank_edit_cost"], abs=2e-3)
        # The probe was tuned per seed over the configured grid, on the training export's validation split.
        tuned = report["results"][mode]["probe_tuning"]["linear probe + EM"]
        grid = {(lr, wd) for lr in small_settings.bench.probe_lr for wd in small_settings.bench.probe_weight_decay}
        assert [t["seed"] for t in tuned] == [0, 1] and all(t["candidates"] == len(grid) for t in tuned)
        assert all((t["lr"], t["weight_decay"]) in grid for t in tuned)
        unseen = report["results"][mode]["unseen_labels"]
        assert unseen["labels"] == ["Sandal", "Coat"] and 0.0 < unseen["AP"] <= 1.0
        assert unseen["gain_over_zero_shot"] == pytest.approx(unseen["AP"] - unseen["zero_shot_AP"], abs=1e-3)
        assert set(unseen["AP_per_label"]) == {"Sandal", "Coat"}
        # reliability diagram data of the served probabilities
        bins = report["calibration"][mode]["SigRL (GMC + SVFR)"]["bins"]
        assert sum(b["count"] for b in bins) == 40 * 10
        # trained methods: the mean over the two seeds, with the spread
        assert rows["SigRL (GMC + SVFR)"]["seeds"] == [0, 1] and "mAP_std" in rows["SigRL (GMC + SVFR)"]
        assert "linear probe + EM × co-occurrence" in rows and "SigRL (GMC + SVFR), known labels ignored" in rows
    acc = report["acceptance"]["partial"]
    assert {"mAP_over_best_linear_baseline", "edit_cost_vs_blank", "ECE", "zero_shot_edit_cost_vs_blank",
            "unseen_AP_over_zero_shot", "hidden_recall@3"} <= set(acc)
    assert (out / "models" / "partial" / "model.json").is_file()
    md = (out / "bench.md").read_text()
    assert "| SigRL (GMC + SVFR) |" in md and "pr_partial.png" in md and (out / "label_graph_partial.png").is_file()
    assert "reliability_partial.png" in md and (out / "reliability_partial.png").stat().st_size > 10_000
    assert "| *blank task* |" in first["markdown"] and "Unseen labels (Sandal, Coat" in first["markdown"]
    assert not (out / "models" / "runs").exists()  # scratch models of other seeds removed

    again = run_bench(out, train_images=60, test_images=40, settings=small_settings, methods=methods[:2],
                      update_readme=False, timing=False, show_progress=False)
    assert again["features"] == {"computed": 0, "cached": 160}  # nothing re-encoded (test + 2 train exports)
    assert again["results"]["partial"]["rows"]["zero-shot"]["mAP"] == first["results"]["partial"]["rows"]["zero-shot"]["mAP"]


def test_validation_split_scores_on_training_file_items_no_training_mosaic_uses(small_settings, tmp_path,
                                                                               monkeypatch):
    import worker.bench.bench as bench_module
    from backend.settings import config_dir
    from worker.bench.fashion import OutfitStructure, build_mosaics

    inserted = []
    monkeypatch.setattr(bench_module, "insert_readme_table", inserted.append)
    out = tmp_path / "bench"
    report = run_bench(out, train_images=60, test_images=40, settings=small_settings, methods=["zero-shot"],
                       modes=("partial",), update_readme=True, timing=False, show_progress=False, split="validation")
    assert report["data"]["split"] == "validation" and report["command"].endswith("--split validation")
    assert not inserted  # validation figures never replace the README's test table
    tasks = read_export(out / "validation.json")
    assert len(tasks) == 40 and tasks[0]["data"]["image"].startswith("/data/local-files/?d=images/validation/")
    assert not (out / "test.json").exists() and len(list((out / "images" / "validation").glob("*.png"))) == 40
    assert "40 fully labelled validation images" in report["markdown"]
    # The validation mosaics draw from the training file, leaving out the training mosaics' items.
    structure = OutfitStructure.from_yaml(config_dir() / small_settings.bench.outfits)
    train = build_mosaics(structure, "train", 60, tmp_path / "t", seed=small_settings.bench.seed)
    used = {j for items in train.items for j in items}
    validation = build_mosaics(structure, "train", 40, tmp_path / "v", seed=small_settings.bench.validation_seed,
                               exclude_items=sorted(used))
    assert all(j not in used for items in validation.items for j in items)
    assert [p.read_bytes() for p in validation.paths] == [
        p.read_bytes() for p in sorted((out / "images" / "validation").glob("*.png"))]


def test_readme_table_insertion(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- section:model -->\nintro\n<!-- bench:table:start -->\nold\n"
                      "<!-- bench:table:end -->\nafter\n<!-- section:backend -->\n")
    assert insert_readme_table("| new | table |\n", readme)
    text = readme.read_text()
    assert "old" not in text and "| new | table |" in text and text.endswith("after\n<!-- section:backend -->\n")
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert not insert_readme_table("x", plain) and plain.read_text() == "no markers\n"
