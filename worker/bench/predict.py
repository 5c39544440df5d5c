"""Benchmark of ``semlabel predict``: whole-command time cold and warm, and where it goes.

Cold = the image features are not cached (a fresh feature store; the one-off text-embedding
cache of the packaged backbone's class names is copied in, as after a first run); warm = the
same command again. Each repetition runs real ``semlabel predict`` processes; the in-process
breakdown (start-up, feature extraction, scoring) is measured in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def _run(cmd: list[str], env: dict) -> tuple[float, int, dict]:
    """Wall seconds, peak RSS (bytes) of the process tree, and its JSON output."""
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    out = proc.stdout.read()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} … exited {proc.returncode}")
    return wall, peak, json.loads(out)


def run(images: list[str], labels: str, runs: int, out_dir: Path) -> dict:
    exe = shutil.which("semlabel") or str(Path(sys.executable).parent / "semlabel")
    base = Path(tempfile.mkdtemp(prefix="semlabel-bench-"))
    env = {**os.environ, "SEMLABEL_DATA_DIR": str(base / "seed")}
    cmd = [exe, "predict", "--labels", labels, *images]
    _run(cmd, env)  # builds the text-embedding cache once
    cold, warm, peaks = [], [], []
    for i in range(runs):
        data = base / f"run{i}"
        data.mkdir()
        for f in (base / "seed").glob("text-embeddings.sqlite*"):
            shutil.copy2(f, data / f.name)
        env["SEMLABEL_DATA_DIR"] = str(data)
        wall, peak, payload = _run(cmd, env)
        assert payload["features"]["cached"] == 0, payload["features"]
        cold.append(wall)
        peaks.append(peak)
        wall, peak, payload = _run(cmd, env)
        assert payload["features"]["computed"] == 0, payload["features"]
        warm.append(wall)
        peaks.append(peak)

    runtime, in_process = _in_process(images, labels, base)
    shutil.rmtree(base, ignore_errors=True)

    report = {
        "images": len(images),
        "runs": runs,
        "backbone": runtime.backbone.name,
        "command_cold_s": {"median": statistics.median(cold), "all": cold},
        "command_warm_s": {"median": statistics.median(warm), "all": warm},
        "cold_over_warm": statistics.median(cold) / statistics.median(warm),
        "peak_rss_mb": max(peaks) / 2**20,
        "in_process_s": in_process,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "predict-bench.json").write_text(json.dumps(report, indent=2))
    (out_dir / "predict-bench.md").write_text(_markdown(report))
    return report


def _in_process(images: list[str], labels: str, base: Path):
    """(the runtime, seconds of start-up and model load, feature extraction cold and warm,
    zero-shot scoring), measured in this process with a fresh feature store."""
    os.environ["SEMLABEL_DATA_DIR"] = str(base / "inproc")
    (base / "inproc").mkdir()
    for f in (base / "seed").glob("text-embeddings.sqlite*"):
        shutil.copy2(f, base / "inproc" / f.name)
    from backend.runtime import Runtime
    from backend.settings import reload_settings

    t0 = time.perf_counter()
    runtime = Runtime.create(reload_settings())
    startup = time.perf_counter() - t0
    space = runtime.label_space([l for l in labels.split(",") if l.strip()])
    t0 = time.perf_counter()
    feats = runtime.features_for(images, progress=False)
    extract_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    feats = runtime.features_for(images, progress=False)
    extract_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    runtime.zero_shot(feats, space)
    scoring = time.perf_counter() - t0
    return runtime, {
        "startup_and_model_load": startup,
        "features_cold": extract_cold,
        "features_warm": extract_warm,
        "features_cold_over_warm": extract_cold / max(extract_warm, 1e-9),
        "zero_shot_scoring": scoring,
    }


def _markdown(r: dict) -> str:
    ip = r["in_process_s"]
    return "\n".join(
        [
            f"# `semlabel predict` on {r['images']} images ({r['backbone']})",
            "",
            f"Medians of {r['runs']} runs, one machine, one session.",
            "",
            "| | seconds |",
            "|---|---|",
            f"| whole command, cold features | {r['command_cold_s']['median']:.2f} |",
            f"| whole command, warm features | {r['command_warm_s']['median']:.2f} |",
            f"| start-up and model load (in process) | {ip['startup_and_model_load']:.2f} |",
            f"| feature extraction, cold | {ip['features_cold']:.3f} |",
            f"| feature extraction, warm (cache) | {ip['features_warm']:.3f} |",
            f"| zero-shot scoring | {ip['zero_shot_scoring']:.4f} |",
            "",
            f"Peak RSS of one `semlabel predict`: {r['peak_rss_mb']:.0f} MiB. "
            f"Feature extraction cold/warm: {ip['features_cold_over_warm']:.0f}×.",
            "",
        ]
    )
