"""Webhook validation, the durable event log and the debounced trigger policy (real Redis + RQ)."""

from __future__ import annotations

import time

import pytest
from rq.job import Job
from rq.registry import ScheduledJobRegistry

from backend.errors import InvalidWebhook
from backend.queue.contract import TRAIN_JOB, fetch_job, queue
from backend.queue.debounce import claim_pending, request_training, training_state
from backend.queue.eventlog import read_events, reconcile, record_webhook, remember_tasks, task_data
from backend.queue.webhook import parse_webhook
from tests.helpers.label_configs import multilabel_config

LABEL_CONFIG = multilabel_config(["cat", "dog"], reasons=False)


def project(pid=1):
    # The shape Label Studio 1.23 sends (trimmed): the project object with its label config.
    return {"id": pid, "title": "p", "label_config": LABEL_CONFIG, "task_number": 5}


def annotation_event(ann_id, task_id, labels=("cat",), action="ANNOTATION_CREATED", pid=1, **extra):
    return {
        "action": action,
        "annotation": {
            "id": ann_id, "task": task_id, "project": pid, "completed_by": 1,
            "result": [{"from_name": "labels", "to_name": "image", "type": "choices",
                        "value": {"choices": list(labels)}}],
            "was_cancelled": False, "ground_truth": False,
            "created_at": "2026-11-23T01:55:38.646245Z", "updated_at": "2026-11-23T01:55:38.646271Z",
            **extra,
        },
        "project": project(pid),
    }


@pytest.fixture
def settings(monkeypatch):
    from backend.settings import reload_settings

    monkeypatch.setenv("SEMLABEL_WORKER__DEBOUNCE__ANNOTATIONS", "5")
    monkeypatch.setenv("SEMLABEL_WORKER__DEBOUNCE__QUIET_S", "30")
    monkeypatch.setenv("SEMLABEL_WORKER__DEBOUNCE__MAX_WAIT_S", "120")
    yield reload_settings()
    monkeypatch.undo()
    reload_settings()


@pytest.mark.parametrize(
    "payload, reason",
    [
        ([], "not a JSON object"),
        ({}, "no 'action'"),
        ({"action": "ANNOTATION_CREATED", "annotation": {"id": 1, "task": 2}}, "without a project id"),
        ({"action": "ANNOTATION_CREATED", "project": {"id": 1}}, "without an annotation"),
        ({"action": "ANNOTATION_CREATED", "project": 1, "annotation": {"task": 2, "result": []}}, "annotation id is missing"),
        ({"action": "ANNOTATION_CREATED", "project": 1, "annotation": {"id": 1, "result": []}}, "task id is missing"),
        ({"action": "ANNOTATION_UPDATED", "project": 1, "annotation": {"id": 1, "task": 2, "result": "x"}}, "must be a list"),
        ({"action": "ANNOTATIONS_DELETED", "project": {"id": 1}}, "without annotation ids"),
        ({"action": "START_TRAINING", "project": {"id": "abc"}}, "integer id"),
        ({"action": "ANNOTATION_CREATED", "project": 1, "annotation": "nope"}, "object or a list"),
    ],
)
def test_malformed_payloads_are_refused_and_nothing_is_stored(payload, reason, redis_conn, settings):
    before = redis_conn.dbsize()
    with pytest.raises(InvalidWebhook, match=reason) as info:
        record_webhook(redis_conn, payload, settings)
    assert info.value.reason and "\n" not in str(info.value)
    assert redis_conn.dbsize() == before


def test_other_actions_are_ignored(redis_conn, settings):
    before = redis_conn.dbsize()
    result = record_webhook(redis_conn, {"action": "LABEL_LINK_CREATED", "project": {"id": 1}}, settings)
    assert result.ignored and result.training is None and redis_conn.dbsize() == before


def test_start_training_enqueues_now(redis_conn, settings):
    result = record_webhook(redis_conn, {"action": "START_TRAINING", "project": project(3)}, settings)
    info = result.training
    assert info["coalesced"] is False and info["due_in_s"] == 0
    q = queue(redis_conn, settings.worker.queues.train)
    assert q.name == "gpu" and q.job_ids == [info["job_id"]]
    job = fetch_job(redis_conn, info["job_id"])
    assert job.func_name == TRAIN_JOB and list(job.args) == ["3"] and job.kwargs == {"reason": "START_TRAINING"}
    assert job.meta["project"] == "3" and job.retries_left == len(settings.worker.retry_intervals_s)
    assert info["job_id"].startswith("train-3-")
    # A second START_TRAINING while the first still waits joins it.
    again = record_webhook(redis_conn, {"action": "START_TRAINING", "project": project(3)}, settings)
    assert again.training["job_id"] == info["job_id"] and again.training["coalesced"]
    assert q.count == 1


def test_annotations_are_persisted_and_debounced(redis_conn, settings):
    q = queue(redis_conn, "gpu")
    scheduled = ScheduledJobRegistry(queue=q)
    t0 = time.time()
    first = record_webhook(redis_conn, annotation_event(1, 10), settings)
    assert first.stored == 1 and first.training["coalesced"] is False
    assert 29 <= first.training["due_in_s"] <= 30
    job_id = first.training["job_id"]
    assert scheduled.get_job_ids() == [job_id] and q.count == 0
    # Each new event pushes the quiet period back and joins the same job.
    for i in range(2, 5):
        r = record_webhook(redis_conn, annotation_event(i, 10 + i), settings)
        assert r.training["job_id"] == job_id and r.training["coalesced"]
    score = redis_conn.zscore(scheduled.key, job_id)
    assert t0 + 29 <= score <= time.time() + 30.5
    # The fifth event reaches worker.debounce.annotations: due now.
    fifth = record_webhook(redis_conn, annotation_event(5, 15), settings)
    assert fifth.training["job_id"] == job_id and fifth.training["due_in_s"] == 0
    assert redis_conn.zscore(scheduled.key, job_id) <= time.time()
    # Later events do not postpone an urgent job.
    record_webhook(redis_conn, annotation_event(6, 16), settings)
    assert redis_conn.zscore(scheduled.key, job_id) <= time.time()
    assert len(read_events(redis_conn, 1, settings)) == 6
    state = training_state(redis_conn, 1, settings)
    assert state["pending"]["job_id"] == job_id and state["pending"]["count"] == "6" and state["events"] == 6
    assert state["jobs"] == [job_id]


def test_quiet_period_is_capped_by_max_wait(redis_conn, settings, monkeypatch):
    from backend.settings import reload_settings

    monkeypatch.setenv("SEMLABEL_WORKER__DEBOUNCE__MAX_WAIT_S", "1")
    monkeypatch.setenv("SEMLABEL_WORKER__DEBOUNCE__ANNOTATIONS", "1000")
    s = reload_settings()
    first = record_webhook(redis_conn, annotation_event(1, 10), s)
    assert first.training["due_in_s"] <= 1.0
    time.sleep(0.2)
    later = record_webhook(redis_conn, annotation_event(2, 11), s)
    assert later.training["job_id"] == first.training["job_id"] and later.training["due_in_s"] <= 0.8


def test_a_started_job_claims_its_events_and_later_ones_make_a_new_job(redis_conn, settings):
    a = record_webhook(redis_conn, annotation_event(1, 10), settings).training["job_id"]
    record_webhook(redis_conn, annotation_event(2, 11), settings)
    mine, last = claim_pending(redis_conn, "1", a, settings)
    assert mine and last == read_events(redis_conn, 1, settings)[-1]["id"]
    assert training_state(redis_conn, 1, settings)["pending"] is None
    b = record_webhook(redis_conn, annotation_event(3, 12), settings).training
    assert b["job_id"] != a and b["coalesced"] is False and b["pending_events"] == 1
    # A job that is not the pending one claims nothing but still learns where the log ends.
    mine, last2 = claim_pending(redis_conn, "1", a, settings)
    assert not mine and last2 > last


def test_a_dead_pending_job_never_swallows_events(redis_conn, settings):
    job_id = record_webhook(redis_conn, annotation_event(1, 10), settings).training["job_id"]
    job = fetch_job(redis_conn, job_id)
    job.set_status("failed")
    nxt = record_webhook(redis_conn, annotation_event(2, 11), settings).training
    assert nxt["job_id"] != job_id and nxt["coalesced"] is False
    redis_conn.delete(Job.key_for(nxt["job_id"]))  # expired / deleted job hash
    third = record_webhook(redis_conn, annotation_event(3, 12), settings).training
    assert third["job_id"] not in (job_id, nxt["job_id"])


def test_request_training_by_a_busy_job_creates_a_successor(redis_conn, settings):
    info = request_training(redis_conn, 4, settings, reason="busy", delay_s=5, exclude_job="train-4-running")
    assert 4.5 <= info["due_in_s"] <= 5 and not info["coalesced"]
    again = request_training(redis_conn, 4, settings, reason="busy", delay_s=5, exclude_job="train-4-running")
    assert again["job_id"] == info["job_id"] and again["coalesced"]
    # The job itself being pending does not count (it is running, it cannot take more events).
    third = request_training(redis_conn, 4, settings, reason="busy", delay_s=5, exclude_job=info["job_id"])
    assert third["job_id"] != info["job_id"]
    # Joining a waiting job with a longer delay never postpones it.
    later = request_training(redis_conn, 4, settings, reason="by hand", delay_s=3600)
    assert later["job_id"] == third["job_id"] and later["coalesced"] and later["due_in_s"] <= 5


def test_deletions_updates_and_task_data_reconcile(redis_conn, settings):
    record_webhook(redis_conn, {"action": "TASKS_CREATED", "project": project(),
                                "tasks": [{"id": 10, "project": 1, "data": {"image": "/a.png"}},
                                          {"id": 11, "project": 1, "data": {"image": "/b.png"}}]}, settings)
    assert task_data(redis_conn, 1, settings) == {10: {"image": "/a.png"}, 11: {"image": "/b.png"}}
    # ... and their features are computed ahead of training on the `cpu` queue.
    (features_job,) = queue(redis_conn, "cpu").jobs
    assert features_job.func_name == "worker.jobs.extract_features" and features_job.args[0] == "1"
    assert features_job.args[1] == [{"id": 10, "data": {"image": "/a.png"}}, {"id": 11, "data": {"image": "/b.png"}}]
    assert remember_tasks(redis_conn, 1, [{"id": 12, "data": {"image": "/c.png"}}, {"id": 13}], settings) == 1
    record_webhook(redis_conn, annotation_event(1, 10, ("cat",)), settings)
    record_webhook(redis_conn, annotation_event(2, 11, ("dog",)), settings)
    record_webhook(redis_conn, annotation_event(3, 12, ("cat", "dog")), settings)
    record_webhook(redis_conn, annotation_event(1, 10, ("dog",), action="ANNOTATION_UPDATED"), settings)
    record_webhook(redis_conn, {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 2}], "project": project()},
                   settings)
    record_webhook(redis_conn, {"action": "TASKS_DELETED", "tasks": [{"id": 12}], "project": project()}, settings)
    record_webhook(redis_conn, {"action": "PROJECT_UPDATED", "project": {**project(), "label_config": "<View/>"}},
                   settings)
    state = reconcile(read_events(redis_conn, 1, settings))
    assert set(state["annotations"]) == {1}
    assert state["annotations"][1]["result"][0]["value"]["choices"] == ["dog"]
    assert state["deleted_tasks"] == {12} and state["label_config"] == "<View/>"


def test_bulk_and_real_label_studio_shapes(redis_conn, settings):
    bulk = {"action": "ANNOTATIONS_CREATED", "project": 1,
            "annotation": [annotation_event(i + 1, 20 + i)["annotation"] for i in range(3)]}
    assert record_webhook(redis_conn, bulk, settings).stored == 3
    skipped = annotation_event(9, 29, ())
    skipped["annotation"].update(result=[], was_cancelled=True)
    assert record_webhook(redis_conn, skipped, settings).stored == 1
    parsed = parse_webhook({**annotation_event(5, 25), "task": {"id": 25, "data": {"image": "/x.png"}}})
    assert parsed.task_data == {"25": '{"image":"/x.png"}'}


def test_two_hundred_webhooks_are_all_stored(redis_conn, settings):
    for i in range(200):
        record_webhook(redis_conn, annotation_event(i + 1, 1000 + i, pid=7), settings)
    assert len(read_events(redis_conn, 7, settings)) == 200
    assert queue(redis_conn, "gpu").count + len(
        ScheduledJobRegistry(queue=queue(redis_conn, "gpu")).get_job_ids()) == 1
