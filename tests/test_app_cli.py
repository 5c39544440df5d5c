"""`semlabel serve`, `python -m backend.ls`, `suggest` and `bench-api` as commands (real server
processes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from tests.helpers.label_configs import multilabel_config
from tests.helpers.processes import run_cli
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


REPO = Path(__file__).resolve().parent.parent


def test_the_backend_runs_from_a_tree_without_worker(tmp_path, session_data_dir):
    """What the backend image holds: backend/ and configs/ only. `python -m backend.ls` starts
    there and answers /health and a /predict of a real photo; any import of `worker` fails
    loudly (a `worker` package ahead on the path raises ImportError)."""
    import requests

    from backend.ls.server import ServerProcess
    from tests.helpers.photos import copy_photos

    tree = tmp_path / "tree"
    for part in ("backend", "configs"):
        shutil.copytree(REPO / part, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
    blocker = tmp_path / "blocker" / "worker"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("the backend imported worker/")\n')
    photos = copy_photos(tmp_path / "photos", names=("dog",))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BASIC_AUTH_", "SEMLABEL_AUTH__", "LABEL_STUDIO_"))}
    env.update({"PYTHONPATH": os.pathsep.join([str(blocker.parent), str(tree)]),
                "SEMLABEL_DATA_DIR": str(session_data_dir), "HF_HUB_OFFLINE": "1",
                "SEMLABEL_BACKBONE__KIND": "packaged", "SEMLABEL_BACKEND__REVIEW__ENABLED": "false",
                "SEMLABEL_IMAGES__LOCAL_ROOTS": json.dumps([str(photos)]), "REDIS_URL": "redis://127.0.0.1:1/0",
                "SEMLABEL_REDIS__SPOOL__DIR": str(tmp_path / "spool")})
    server = ServerProcess(env={}, cwd=tree, log_path=tmp_path / "backend.log")
    server.env = env
    with server:
        health = requests.get(server.url + "/health", timeout=10).json()
        assert health["status"] == "UP" and health["backbone"].startswith("packaged:")
        xml = multilabel_config(["dog", "rocket", "coffee cup"], reasons=False)
        resp = requests.post(server.url + "/predict", timeout=120, json={
            "tasks": [{"id": 1, "data": {"image": str(photos / "dog.jpg")}}], "label_config": xml})
        assert resp.status_code == 200, resp.text
        region = resp.json()["results"][0]["result"][0]
        assert next(iter(region["meta"]["scores"])) == "dog"
    assert "ImportError" not in server.log_tail(200)
    where = subprocess.run([sys.executable, "-c", "import backend.ls.app, sys; print(backend.ls.app.__file__); "
                            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'worker'))"],
                           env=env, cwd=tree, capture_output=True, text=True, timeout=120)
    assert where.stdout.splitlines() == [str(tree / "backend" / "ls" / "app.py"), "[]"], where.stderr[-2000:]


def test_bench_api_measures_a_real_server(tmp_path, session_data_dir):
    env = {**os.environ, "SEMLABEL_DATA_DIR": str(session_data_dir), "HF_HUB_OFFLINE": "1"}
    env.pop("REDIS_URL", None)
    out = tmp_path / "bench"
    proc = run_cli("bench-api", "--out", str(out), "--runs", "2", "--batch", "3", env=env, timeout=600)
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
