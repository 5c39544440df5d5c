"""Probes of issue 13 against the Redis side, each bounded and on loopback only.

Redis outages run against a private Redis server of the test (never the shared one), which the
test pauses (SIGSTOP) or kills (SIGKILL) and starts again with its append-only data. Nothing
here times anything: the answers, the counts and the stored bytes are asserted; the latency of
the same scenario is measured by ``semlabel bench-outage``.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
import redis as redis_lib

from backend.errors import InvalidWebhook
from backend.queue.eventlog import read_events, read_state, record_webhook
from tests.helpers.processes import run_cli
from tests.helpers.redis_server import PrivateRedis
from tests.helpers.waiting import wait_for
from worker.bench.outage import annotation_webhook, count_training_input, outage_burst


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def backend(private_redis, tmp_path, settings, runtime):
    """The backend app (review jobs off: nothing but the event path) on the private Redis,
    with its own data directory (and so its own disk spool), background threads running."""
    from backend.ls.app import create_app
    from backend.redis.connection import redis_client
    from backend.store import ModelStore, ServedModels

    back = settings.backend.model_copy(update={"review": settings.backend.review.model_copy(update={"enabled": False})})
    s = settings.model_copy(update={"data_dir": str(tmp_path / "data"), "backend": back})
    client = redis_client(s, private_redis.url)
    store = ModelStore.from_settings(root=tmp_path / "models", redis=client)
    served = ServedModels.from_settings(store, runtime, redis=client, poll_interval_s=60, start=False)
    app = create_app(s, runtime=runtime, redis=client, served=served, start_threads=True)
    test_client = app.test_client()

    def post(payload):
        resp = test_client.post("/webhook", json=payload)
        return resp.status_code, resp.json

    app.post = post
    app.redis = client
    app.s = s
    yield app
    app.extensions["semlabel"].close()


def test_redis_killed_mid_burst_loses_no_annotation_and_stores_none_twice(backend, private_redis):
    """Finding 6 / the acceptance scenario, shortened: 60 annotation webhooks, Redis killed
    after 20 and started again (with its data) before the 46th. Before: 503 for every webhook
    while Redis was down, and those annotations were gone. Now every webhook is accepted (201
    stored, 202 kept in the disk spool), the spool is replayed in order when Redis is back,
    and the next training reads each of the 60 annotations exactly once."""
    service = backend.extensions["semlabel"]
    burst = outage_burst(backend.post, project=3, n=60, kill_after=20, kill=private_redis.kill,
                         restart=private_redis.start, outage_s=0, restart_after=45)
    assert set(burst["statuses"]) <= {201, 202} and burst["statuses"][202] >= 25, burst["statuses"]
    assert burst["statuses"][201] >= 20
    wait_for(service.events.spool.empty, 60, step=0.05, what="the spool to be replayed")
    counts = count_training_input(backend.redis, 3, 60, backend.post, backend.s)
    assert counts["start_training_status"] == 201 and counts["job_claimed"]
    assert counts["reached_training"] == counts["distinct_in_training"] == 60 and counts["lost"] == 0
    assert counts["stored_events"] == 60 and counts["stored_twice"] == 0
    # In order: the stream holds the annotations as they were sent.
    ids = [int(e["annotation_id"]) for e in read_events(backend.redis, 3, backend.s)]
    assert ids == list(range(1, 61))


def test_a_paused_redis_gets_webhooks_spooled_and_replayed_once(backend, private_redis):
    """A Redis that hangs (SIGSTOP): before, a webhook waited 5 s and got a 503 (Label Studio
    had given up after 1 s) and the event was lost. Now the webhook path gives up after
    `redis.webhook_timeout_s`, the event is kept on disk (202) and stored once on resume."""
    service = backend.extensions["semlabel"]
    assert backend.post(annotation_webhook(4, 1))[0] == 201
    private_redis.pause()
    try:
        answers = [backend.post(annotation_webhook(4, i)) for i in range(2, 6)]
        assert [a[0] for a in answers] == [202] * 4 and all(a[1]["spooled"] for a in answers)
        # The same event sent again while it waits is one event (identity), not two.
        assert backend.post(annotation_webhook(4, 5))[0] == 202
        spool = service.events.spool
        assert spool.stats()["entries"] == 5
        assert stat.S_IMODE(os.stat(spool.path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(spool.dir).st_mode) == 0o700
    finally:
        private_redis.resume()
    wait_for(service.events.spool.empty, 60, step=0.05, what="the spool to be replayed")
    ids = [int(e["annotation_id"]) for e in read_events(backend.redis, 4, backend.s)]
    assert ids == [1, 2, 3, 4, 5]
    # Replaying an entry twice (a crash between the Redis write and the delete) stores nothing new.
    again = record_webhook(backend.redis, annotation_webhook(4, 3), backend.s)
    assert again.stored == 0 and again.duplicates == 1 and again.training is None


def test_a_setup_made_while_redis_is_down_is_recorded_when_it_returns_without_the_token(backend, private_redis):
    """Before: a /setup made while Redis was down lived only in that process; and Redis held
    the Label Studio token in plain text. Now it is spooled and written when Redis returns,
    with a reference to the token (the token stays on this machine, mode 0600)."""
    from backend.ls.setup_record import read_setup

    service = backend.extensions["semlabel"]
    token = "tok-" + "s3cr3t" * 6
    private_redis.kill()
    service.connections.remember_setup("8", "http://127.0.0.1:8080", token)
    assert not service.events.spool.empty()
    private_redis.start()
    wait_for(service.events.spool.empty, 60, step=0.05, what="the /setup record to be replayed")
    record = {k.decode(): v.decode() for k, v in backend.redis.hgetall("semlabel:ls:8").items()}
    assert record["url"] == "http://127.0.0.1:8080" and len(record["token_ref"]) == 32 and "token" not in record
    dump = b"".join(backend.redis.dump(k) or b"" for k in backend.redis.keys("*"))
    assert token.encode() not in dump
    # Another backend process of this machine (no in-process copy) resolves the reference.
    assert read_setup(backend.redis, "8", backend.s) == ("http://127.0.0.1:8080", token)
    secret = backend.s.data_path / "secrets" / f"ls-token-{record['token_ref']}"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    # A record an older version wrote with the token in plain text is converted on first read.
    backend.redis.hset("semlabel:ls:9", mapping={"url": "http://127.0.0.1:8080", "token": token})
    assert read_setup(backend.redis, "9", backend.s) == ("http://127.0.0.1:8080", token)
    assert backend.redis.hget("semlabel:ls:9", "token") is None


@pytest.mark.parametrize("payload, reason", [
    ({"action": "ANNOTATION_CREATED", "project": {"id": -5}, "annotation": {"id": 1, "task": 2}}, "positive integer"),
    ({"action": "ANNOTATION_CREATED", "project": 0, "annotation": {"id": 1, "task": 2}}, "positive integer"),
    ({"action": "ANNOTATION_CREATED", "project": 1, "annotation": {"id": True, "task": 2}}, "annotation id"),
    ({"action": "ANNOTATION_CREATED", "project": 1, "annotation": {"id": 2**70, "task": 2}}, "positive integer"),
    ({"action": "ANNOTATION_CREATED", "project": 1, "annotation": {"id": 1, "task": 2, "result": [1, 2]}},
     "result"),
    ({"action": "ANNOTATION_CREATED", "project": 1,
      "annotation": {"id": 1, "task": 2, "result": [{}] * 1001}}, "more than 1000 result items"),
    ({"action": "ANNOTATION_CREATED", "project": 1,
      "annotation": {"id": 1, "task": 2, "result": [{"value": "x" * 300_000}]}}, "larger than 256 KB"),
    ({"action": "ANNOTATION_CREATED", "project": 1,
      "annotation": {"id": 1, "task": 2, "was_cancelled": "maybe"}}, "was_cancelled"),
    ({"action": "ANNOTATION_CREATED", "project": 1,
      "annotation": {"id": 1, "task": 2, "updated_at": "x" * 100}}, "updated_at"),
    ({"action": "TASKS_CREATED", "project": 1, "tasks": [{"id": 3, "data": {"image": "x" * 20_000}}]},
     "larger than 16 KB"),
    ({"action": "PROJECT_UPDATED", "project": {"id": 1, "label_config": "<View>" + " " * (1 << 20) + "</View>"}},
     "label config is larger"),
])
def test_forged_looking_webhooks_are_refused_and_store_nothing(redis_conn, settings, payload, reason):
    """Finding 2 (storage half) and 10: only a webhook of Label Studio's shape reaches the
    event log — positive integer ids, an annotation of the pydantic-checked shape, bounded
    sizes. Before: project id -5 and ids of any size were stored as training data."""
    before = redis_conn.dbsize()
    with pytest.raises(InvalidWebhook, match=reason):
        record_webhook(redis_conn, payload, settings)
    assert redis_conn.dbsize() == before


def test_a_pickled_job_planted_in_redis_runs_no_code_in_the_worker(redis_url, redis_conn, tmp_path):
    """Finding 8: RQ unpickled whatever job anyone who can write to Redis put on the queue.
    With RQ's JSON serializer the worker reads jobs as data: a pickle that would create a file
    when loaded is refused, and the file is never created."""
    from rq import Queue

    marker = tmp_path / "pwned"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    Queue("gpu", connection=redis_conn).enqueue("builtins.print", Planted())  # RQ's default: pickle
    assert not marker.exists()
    env = {**os.environ, "REDIS_URL": redis_url, "SEMLABEL_DATA_DIR": str(tmp_path / "data"),
           "SEMLABEL_WORKER__PRELOAD": "false"}
    proc = run_cli("worker", "--burst", "--queue", "gpu", env=env, timeout=300)
    assert not marker.exists(), proc.stderr[-2000:]
    assert "UnpicklingError" not in proc.stderr


def test_the_tasks_hash_is_bounded_and_forgets_deleted_tasks(redis_conn, settings):
    """Finding 7: every task /predict or TASKS_CREATED ever named stayed in the project's
    hash. Now at most `redis.max_remembered_tasks`, updates of known tasks still land, and
    deleted tasks are removed."""
    from backend.queue.eventlog import remember_tasks, task_data

    s = settings.model_copy(update={"redis": settings.redis.model_copy(update={"max_remembered_tasks": 10})})
    assert remember_tasks(redis_conn, 1, [{"id": i, "data": {"image": f"/{i}.png"}} for i in range(1, 26)], s) == 10
    assert redis_conn.hlen("semlabel:tasks:1") == 10
    record_webhook(redis_conn, {"action": "TASKS_CREATED", "project": 1,
                                "tasks": [{"id": i, "data": {"image": f"/new-{i}.png"}} for i in range(1, 40)]}, s)
    known = task_data(redis_conn, 1, s)
    assert len(known) == 10 and all(v["image"].startswith("/new-") for v in known.values())
    gone = sorted(known)[:3]
    record_webhook(redis_conn, {"action": "TASKS_DELETED", "project": 1, "tasks": [{"id": t} for t in gone]}, s)
    assert redis_conn.hlen("semlabel:tasks:1") == 7
    assert remember_tasks(redis_conn, 1, [{"id": 100 + i, "data": {"image": "/x.png"}} for i in range(5)], s) == 3


def test_a_training_folds_the_stream_so_the_next_reads_the_annotations_not_the_history(redis_conn, settings):
    """Finding 7: the event stream had no bound and every training read all of it. After a
    training folds it, the stream holds only what came since, and the next training reads
    the snapshot (one entry per annotation) plus the new events — the same annotations."""
    from backend.queue.debounce import claim_pending, training_state
    from backend.queue.eventlog import compact_events

    for round_ in range(20):  # five annotations, each updated twenty times
        for ann in range(1, 6):
            hook = annotation_webhook(5, ann)
            hook["annotation"]["updated_at"] = f"2026-12-01T11:{round_:02d}:00.{ann:06d}Z"
            hook["annotation"]["result"][0]["value"]["choices"] = ["cat"] if round_ % 2 else ["dog"]
            assert record_webhook(redis_conn, hook, settings).stored == 1
    record_webhook(redis_conn, {"action": "ANNOTATION_DELETED", "project": 5, "annotation": {"id": 5}}, settings)
    before = read_state(redis_conn, 5, settings)
    assert before["events_read"] == 101 and len(before["annotations"]) == 4
    _, upto = claim_pending(redis_conn, "5", "a-training-job", settings)
    folded = compact_events(redis_conn, 5, upto, settings)
    assert folded["folded"] == 101 and folded["trimmed"] == 101 and folded["annotations"] == 4
    assert redis_conn.xlen("semlabel:events:5") == 0
    after = read_state(redis_conn, 5, settings)
    assert after["events_read"] == 0 and after["annotations"] == before["annotations"]
    assert after["task_data"] == before["task_data"] and len(after["task_data"]) == 5
    # New events after the fold: the next training reads them and the snapshot, nothing else.
    record_webhook(redis_conn, annotation_webhook(5, 6), settings)
    nxt = read_state(redis_conn, 5, settings)
    assert nxt["events_read"] == 1 and sorted(nxt["annotations"]) == [1, 2, 3, 4, 6]
    _, upto = claim_pending(redis_conn, "5", "the-next-job", settings)
    assert compact_events(redis_conn, 5, upto, settings)["written"] == 2  # one annotation + its task
    assert training_state(redis_conn, 5, settings)["folded_annotations"] == 5
    # An event folded away is still known by its identity: a resend is not stored again.
    assert record_webhook(redis_conn, annotation_webhook(5, 6), settings).duplicates == 1
    assert json.loads(redis_conn.hget("semlabel:state:5", "a:6"))["task"] == 10006
