"""A private Redis database for a test session on the real server at 127.0.0.1:6379.

Each session claims the first empty database among 1..15 with a marker key (so two test
runs on one machine never share one), and flushes it when done."""

from __future__ import annotations

import os
import socket
import time

import pytest

REDIS_HOST = os.environ.get("SEMLABEL_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("SEMLABEL_TEST_REDIS_PORT", "6379"))
CLAIM_KEY = "__semlabel_test_claim__"


def claim_db():
    """``(url, client)`` of an empty database now owned by this process, or skip."""
    import redis

    try:
        base = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=2)
        base.ping()
    except Exception as exc:  # noqa: BLE001
        _skip_or_fail(f"no Redis on {REDIS_HOST}:{REDIS_PORT} ({exc})")
    marker = f"{socket.gethostname()}:{os.getpid()}:{time.time()}"
    for db in range(15, 0, -1):
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
        if client.set(CLAIM_KEY, marker, nx=True, ex=3600):
            if client.dbsize() == 1:
                return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}", client
            client.delete(CLAIM_KEY)
    _skip_or_fail("no empty Redis database among 1..15")


def _skip_or_fail(reason: str) -> None:
    """Skip on a developer's machine; under CI (``CI`` set) the real thing must be there."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def reset_db(client) -> None:
    """Empty a claimed database and keep the claim, in one transaction (another test run
    must never see it free in between)."""
    marker = client.get(CLAIM_KEY) or b"claimed"
    client.pipeline(transaction=True).flushdb().set(CLAIM_KEY, marker, ex=3600).execute()


def release_db(client) -> None:
    client.flushdb()
