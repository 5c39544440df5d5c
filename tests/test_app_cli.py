"""`semlabel serve`, `suggest` and `bench-api` as commands (real server processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from click.testing import CliRunner

from worker.cli import main


def test_suggest_needs_a_label_studio(monkeypatch):
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    from backend.settings import reload_settings

    reload_settings()
    result = CliRunner().invoke(main, ["suggest", "--project", "3"])
    assert result.exit_code == 2
    assert "give --url and --token" in result.output


def test_serve_help_lists_its_options():
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--host", "--port", "--workers", "--threads", "--with-worker"):
        assert option in result.output


def test_bench_api_measures_a_real_server(tmp_path, session_data_dir):
    env = {**os.environ, "SEMLABEL_DATA_DIR": str(session_data_dir), "HF_HUB_OFFLINE": "1"}
    env.pop("REDIS_URL", None)
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "bench-api", "--out", str(out), "--runs", "2",
                           "--batch", "3"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "api-bench.json").read_text())
    assert set(report["median_s"]) == {"cold_1", "warm_1", "cold_3", "warm_3"}
    assert all(len(v) == 2 for v in report["all_s"].values())
    med = report["median_s"]
    assert report["backbone"].startswith(("packaged:", "open_clip:"))
    assert report["ratios"]["cold_over_warm_3"] == round(med["cold_3"] / med["warm_3"], 2)
    md = (out / "api-bench.md").read_text()
    assert "| 1 task |" in md and "| 3 tasks |" in md
    assert len(list((out / "images").glob("*.png"))) == 1 + 2 + 2 * 3


def test_the_web_worker_quits_once_when_quit_signals_pile_up():
    """Ctrl-C sends SIGINT to the worker and the arbiter sends SIGQUIT: a second signal can
    arrive while the first is shutting the thread pool down. gunicorn's own gthread worker
    re-enters the shutdown then (a deadlock on the pool's lock in real life, until the
    arbiter's SIGKILL); ours ignores it and exits once."""
    import signal
    from types import SimpleNamespace

    import pytest

    from backend.ls.server import QuitOnceThreadWorker

    worker = QuitOnceThreadWorker.__new__(QuitOnceThreadWorker)
    shutdowns = []

    class Pool:  # gunicorn's pool, with the second signal arriving inside its shutdown
        def shutdown(self, wait):
            shutdowns.append(wait)
            worker.handle_quit(signal.SIGQUIT, None)

    worker.tpool, worker.alive = Pool(), True
    worker.cfg = SimpleNamespace(worker_int=lambda w: None)
    with pytest.raises(SystemExit):
        worker.handle_quit(signal.SIGINT, None)
    assert shutdowns == [False] and worker.alive is False
