"""The `semlabel` command as a user runs it: real processes, real files."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from tests.test_images import bomb_png

LABELS = "cat,truck,coffee cup,rocket,person"


def semlabel(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    exe = shutil.which("semlabel") or str(Path(sys.executable).parent / "semlabel")
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def test_predict_ranks_real_photos_and_reuses_features(tmp_path, sample_images):
    data_dir = tmp_path / "data"
    env = {"SEMLABEL_DATA_DIR": str(data_dir)}
    images = [str(sample_images[n]) for n in ("chelsea", "coffee", "rocket")]
    first = semlabel("predict", "--labels", LABELS, *images, env=env)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    top = {Path(r["image"]).stem: max(r["scores"], key=r["scores"].get) for r in out["results"]}
    assert top == {"chelsea": "cat", "coffee": "coffee cup", "rocket": "rocket"}
    assert out["backbone"].startswith("packaged:") and out["errors"] == []
    assert out["features"] == {"computed": 3, "cached": 0}
    assert "Traceback" not in first.stderr

    second = semlabel("predict", "--labels", LABELS, *images, env=env)
    again = json.loads(second.stdout)
    assert again["features"] == {"computed": 0, "cached": 3}  # nothing recomputed
    assert again["results"] == out["results"]

    table = semlabel("predict", "--table", "--labels", LABELS, images[0], env=env)
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].endswith("chelsea.png") and lines[1].split()[0] == "cat"


def test_bad_inputs_one_line_each_and_the_rest_still_scored(tmp_path, sample_images):
    text = tmp_path / "text.jpg"
    text.write_text("hello\n")
    full = io.BytesIO()
    Image.open(sample_images["chelsea"]).convert("RGB").save(full, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(full.getvalue()[:4000])
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(30000, 30000))
    bad = [str(tmp_path / "missing.jpg"), str(text), str(truncated), str(bomb), "https://images.example.com/a.jpg"]
    result = semlabel("predict", "--labels", LABELS, str(sample_images["coffee"]), *bad)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [l for l in result.stderr.splitlines() if l.startswith("semlabel: error:")]
    assert len(errors) == len(bad)
    for source, line, reason in zip(
        bad, errors, ["file not found", "not an image", "truncated", "too large", "not allowed"]
    ):
        assert source in line and reason in line, line
    out = json.loads(result.stdout)
    assert [Path(r["image"]).name for r in out["results"]] == ["coffee.png"]
    assert len(out["errors"]) == len(bad)


def test_usage_errors_are_one_line(tmp_path):
    result = semlabel("predict", "--labels", " , ", str(tmp_path / "x.png"))
    assert result.returncode == 2 and "no label names" in result.stderr and "Traceback" not in result.stderr


def test_doctor_reports_backbone_device_redis_and_store(redis_url):
    result = semlabel("doctor", env={"REDIS_URL": redis_url})
    assert result.returncode == 0, result.stderr
    report = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    report = {k.strip(): v for k, v in report.items()}
    backbone = json.loads(report["backbone"])
    assert backbone["name"].startswith("packaged:") and backbone["reason"]
    assert json.loads(report["redis"])["reachable"] is True
    assert json.loads(report["torch"])["cuda_available"] is torch.cuda.is_available()
    assert json.loads(report["feature_store"])["path"].startswith(os.environ["SEMLABEL_DATA_DIR"])
    down = semlabel("doctor", env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert json.loads(dict(
        (k.strip(), v) for k, v in (l.split(": ", 1) for l in down.stdout.splitlines() if ": " in l)
    )["redis"])["reachable"] is False
