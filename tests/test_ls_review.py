"""The durable review-job stream: nothing lost when a consumer dies, bounded retries (real Redis)."""

from __future__ import annotations

import json
import time

import pytest

from backend.ls import metrics
from backend.ls.review import GROUP, ReviewQueue
from backend.queue.webhook import parse_webhook
from tests.helpers.waiting import wait_for
from tests.test_app import CONFIG


@pytest.fixture
def service(settings, runtime, redis_conn, tmp_path):
    from backend.ls.service import BackendService
    from backend.store import ModelStore, ServedModels

    review = settings.backend.review.model_copy(update={"max_attempts": 3, "retry_after_s": 0.2})
    s = settings.model_copy(update={"backend": settings.backend.model_copy(update={"review": review}),
                                    "label_studio_url": None, "label_studio_api_key": None})
    store = ModelStore.from_settings(root=tmp_path / "models", redis=redis_conn)
    served = ServedModels.from_settings(store, runtime, redis=None, poll_interval_s=60, start=False)
    svc = BackendService(s, runtime=runtime, redis=redis_conn, served=served, start_threads=False)
    yield svc
    svc.close()


def _review_job(ann_id=1, project="5"):
    return {"kind": "review", "project": project, "task_id": 3, "task_data": {"image": "/x.jpg"},
            "annotation": {"id": ann_id, "result": [{"from_name": "labels", "to_name": "image",
                                                     "type": "choices", "value": {"choices": ["dog"]}}],
                           "updated_at": "2026-11-23T01:00:00Z"},
            "label_config": CONFIG}


def test_jobs_follow_the_webhook_actions(settings):
    payload = {"action": "ANNOTATIONS_CREATED", "project": {"id": 5, "label_config": CONFIG},
               "annotations": [
                   {"id": 1, "task": 3, "result": [{"type": "choices"}]},
                   {"id": 2, "task": 4, "result": [], "was_cancelled": True},
                   {"id": 3, "task": {"id": 6, "data": {"image": "a.jpg"}}, "result": [{"type": "choices"}]},
               ]}
    jobs = parse_webhook(payload, settings).review_jobs
    assert [(j["annotation"]["id"], j["task_id"], j["task_data"]) for j in jobs] == [(1, 3, None), (3, 6, {"image": "a.jpg"})]
    assert all(j["label_config"] == CONFIG and j["project"] == "5" for j in jobs)
    deleted = parse_webhook({"action": "ANNOTATIONS_DELETED", "project": 5, "annotations": [{"id": 1}, {"id": 9}]},
                            settings).review_jobs
    assert deleted == [{"kind": "delete", "project": "5", "annotation_ids": [1, 9], "action": "ANNOTATIONS_DELETED"}]
    assert parse_webhook({"action": "PROJECT_UPDATED", "project": {"id": 5}}, settings).review_jobs == []
    off = settings.model_copy(update={"backend": settings.backend.model_copy(
        update={"review": settings.backend.review.model_copy(update={"enabled": False})})})
    assert parse_webhook(payload, off).review_jobs == []


def test_a_job_queued_while_no_backend_runs_is_handled_by_the_next_one(service, redis_conn):
    producer = ReviewQueue(service)
    producer.push(redis_conn, [{"kind": "delete", "project": "5", "annotation_ids": [1]}])
    assert redis_conn.xlen(producer.key) == 1
    consumer = ReviewQueue(service)  # a backend process starting later
    before = metrics.sample("semlabel_review_jobs_total", outcome="skipped")
    assert consumer.drain(redis_conn) == 1
    assert metrics.sample("semlabel_review_jobs_total", outcome="skipped") == before + 1  # nothing to delete
    assert redis_conn.xlen(producer.key) == 0
    assert redis_conn.xpending(producer.key, GROUP)["pending"] == 0


def test_a_job_taken_by_a_process_that_died_is_claimed_by_another(service, redis_conn):
    queue = ReviewQueue(service)
    queue.push(redis_conn, [{"kind": "delete", "project": "5", "annotation_ids": [2]}])
    queue._ensure_group(redis_conn)
    # "dead" reads the job and never acknowledges it
    taken = redis_conn.xreadgroup(GROUP, "dead-process", {queue.key: ">"}, count=1)
    assert len(taken[0][1]) == 1
    survivor = ReviewQueue(service)
    assert survivor.claim_stale(redis_conn) == 0  # not idle long enough yet
    time.sleep(0.3)
    assert survivor.claim_stale(redis_conn) == 1
    assert redis_conn.xlen(queue.key) == 0 and redis_conn.xpending(queue.key, GROUP)["pending"] == 0


def test_a_failing_job_is_retried_then_dropped(service, redis_conn):
    queue = ReviewQueue(service)
    queue.push(redis_conn, [_review_job()])  # project 5 has no Label Studio host: it cannot succeed
    retried = metrics.sample("semlabel_review_jobs_total", outcome="retried")
    failed = metrics.sample("semlabel_review_jobs_total", outcome="failed")
    assert queue.drain(redis_conn) == 1  # attempt 1
    assert redis_conn.xpending(queue.key, GROUP)["pending"] == 1
    for _ in range(2):  # attempts 2 and 3, after retry_after_s each
        time.sleep(0.3)
        assert queue.claim_stale(redis_conn) == 1
    assert metrics.sample("semlabel_review_jobs_total", outcome="retried") == retried + 2
    assert metrics.sample("semlabel_review_jobs_total", outcome="failed") == failed + 1
    assert redis_conn.xlen(queue.key) == 0 and redis_conn.xpending(queue.key, GROUP)["pending"] == 0


def test_a_stale_edit_is_skipped(service, redis_conn):
    queue = ReviewQueue(service)
    redis_conn.hset("semlabel:review:seen:5", "1", "2026-11-23T02:00:00Z")  # a newer edit was reviewed
    assert queue.run_job(json.loads(json.dumps(_review_job()))) == "skipped"


def test_the_consumer_thread_drains_the_stream(service, redis_conn):
    queue = ReviewQueue(service, block_ms=100)
    queue.push(redis_conn, [{"kind": "delete", "project": "5", "annotation_ids": [i]} for i in range(3)])
    queue.start()
    try:
        wait_for(lambda: redis_conn.xlen(queue.key) == 0, 10, step=0.05, what="the stream to drain")
        # the count follows the delete of each entry: wait for it rather than race it
        wait_for(lambda: queue.handled >= 3, 5, step=0.05, what="three handled jobs")
        assert queue.handled == 3
    finally:
        queue.stop()
