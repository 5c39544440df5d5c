"""Finding Redis, the clear error when none answers, and the embedded valkey-server."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import redis

from backend.errors import RedisUnavailable
from backend.net import free_port
from tests.helpers.processes import REPO, run_cli, stop_all
from tests.helpers.waiting import wait_for


def answers(port: int) -> bool:
    """A server is listening on ``port`` (one that demands a password counts)."""
    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.5).ping())
    except redis.AuthenticationError:
        return True
    except redis.RedisError:
        return False


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """Settings with a fresh data dir, no REDIS_URL and an unused 'local' Redis port."""
    from backend.settings import reload_settings

    port = free_port()
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("SEMLABEL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SEMLABEL_REDIS__EMBEDDED__PORT", str(port))
    monkeypatch.setenv("SEMLABEL_REDIS__CONNECT_TIMEOUT_S", "0.5")
    monkeypatch.setenv("SEMLABEL_WORKER__PRELOAD", "false")
    yield reload_settings(), port
    monkeypatch.undo()
    reload_settings()


def test_a_missing_redis_is_one_clear_line(isolated, monkeypatch):
    from backend.redis.connection import ensure_redis, redis_client
    from backend.settings import reload_settings

    settings, port = isolated
    monkeypatch.setenv("REDIS_URL", f"redis://:hunter2@127.0.0.1:{port}/0")
    settings = reload_settings()
    with pytest.raises(RedisUnavailable) as info:
        redis_client(settings)
    message = str(info.value)
    assert message.startswith(f"no Redis answers at redis://:***@127.0.0.1:{port}/0")
    assert "check REDIS_URL" in message and "hunter2" not in message and "\n" not in message
    # With REDIS_URL set, nothing is started in its place.
    with pytest.raises(RedisUnavailable):
        ensure_redis(settings)
    assert not answers(port)
    # The CLI says the same in one line and exits 1.
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{port}/0", "SEMLABEL_REDIS__CONNECT_TIMEOUT_S": "0.5"}
    proc = run_cli("worker", "--burst", env=env, timeout=120)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("semlabel: error:")]
    assert lines and f"no Redis answers at redis://127.0.0.1:{port}/0" in lines[0]


def test_embedded_server_starts_with_append_only_persistence_and_stops(isolated):
    from backend.redis.connection import ensure_redis, resolve_redis_url

    settings, port = isolated
    url, server = ensure_redis(settings)
    try:
        assert server is not None and url.startswith("redis://:") and url.endswith(f"@127.0.0.1:{port}/0")
        # A generated password, kept for this user only, is the only way in.
        password = (settings.redis_data_path / "password").read_text().strip()
        assert len(password) >= 32 and url == f"redis://:{password}@127.0.0.1:{port}/0"
        assert mode(settings.redis_data_path) == 0o700
        assert mode(settings.redis_data_path / "password") == mode(settings.redis_data_path / "url") == 0o600
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).set("anyone", "in")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, password="guess").ping()
        client = redis.Redis.from_url(url)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert Path(client.config_get("dir")["dir"]) == settings.redis_data_path
        assert (settings.redis_data_path / "url").read_text().strip() == url
        assert resolve_redis_url(settings) == url
        # Another process of this machine finds the running embedded server instead of a second one.
        again, none = ensure_redis(settings)
        assert again == url and none is None
        client.set("survives", "restart")
        pid = server.pid
    finally:
        server.stop()
    assert not answers(port) and (not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie")
    assert not (settings.redis_data_path / "url").exists()
    aof = list((settings.redis_data_path / "appendonly").iterdir())
    assert any(p.name.endswith(".aof") for p in aof)
    url2, server2 = ensure_redis(settings)
    try:
        assert url2 == url  # the same password after a restart
        assert redis.Redis.from_url(url2).get("survives") == b"restart"
    finally:
        server2.stop()


def test_local_stack_starts_redis_and_a_worker_and_stops_both_on_exit(isolated, tmp_path):
    """What `semlabel serve --with-worker` runs: a fresh machine (no Redis on the port), an
    embedded server and a worker subprocess; a process forked inside (a gunicorn worker)
    exiting leaves both alone; a SIGTERM to the process stops both."""
    settings, port = isolated
    script = textwrap.dedent("""
        import json, os, sys, time
        from worker.rq_worker import healthy_workers, local_stack
        with local_stack(worker_args=["--name", "stack-test"], worker_log=sys.argv[1]) as stack:
            for _ in range(600):
                if healthy_workers():
                    break
                time.sleep(0.1)
            child = os.fork()
            if child == 0:
                sys.exit(0)  # unwinds through local_stack and atexit, as a gunicorn worker does
            os.waitpid(child, 0)
            time.sleep(0.5)
            print(json.dumps({"url": stack.redis_url, "redis_pid": stack.embedded.pid,
                              "worker_pid": stack.worker.pid, "workers": healthy_workers()}), flush=True)
            time.sleep(600)
    """)
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "worker.log")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)
    family = []
    try:
        line = proc.stdout.readline()
        family = psutil.Process(proc.pid).children(recursive=True)
        info = json.loads(line)
        assert info["url"].endswith(f"@127.0.0.1:{port}/0") and info["workers"] == ["stack-test"]
        assert answers(port) and psutil.pid_exists(info["worker_pid"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
    finally:
        stop_all([proc], timeout=30)
        for child in family:  # nothing of ours may outlive a failed test
            if child.is_running():
                child.kill()
    wait_for(lambda: not (answers(port) or psutil.pid_exists(info["worker_pid"])), 10,
             what="the embedded Redis and the worker to go")
    assert not answers(port)
    assert not psutil.pid_exists(info["worker_pid"])
    assert not psutil.pid_exists(info["redis_pid"])
