"""The training machinery with real RQ worker processes on a real Redis.

These tests use a tiny but real trainer (``tests.helpers.tiny_model:train_tiny``, configured through
``worker.trainer``) so that they exercise the queue, debouncing, locking, crash recovery and
atomic publishing in seconds; tests/test_retrain.py runs the real heads end to end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from rq import Worker
from rq.job import Job

from backend.queue.contract import fetch_job, queue
from backend.queue.debounce import training_state
from backend.queue.eventlog import record_webhook
from backend.store import ModelStore
from tests.helpers.processes import Workers, run_cli
from tests.helpers.waiting import wait_for
from tests.test_events import annotation_event, project


@pytest.fixture
def stack(redis_url, redis_conn, tmp_path, monkeypatch):
    from backend.settings import reload_settings

    env_vars = {
        "REDIS_URL": redis_url,
        "SEMLABEL_DATA_DIR": str(tmp_path / "data"),
        "SEMLABEL_WORKER__TRAINER": "tests.helpers.tiny_model:train_tiny",
        "SEMLABEL_WORKER__PRELOAD": "false",
        "SEMLABEL_WORKER__PREFETCH_FEATURES": "false",
        "SEMLABEL_WORKER__MIN_HOLDOUT_TASKS": "1",
        "SEMLABEL_WORKER__JOB_MONITORING_INTERVAL_S": "1",
        "SEMLABEL_WORKER__RETRY_INTERVALS_S": "[1, 2]",
        "SEMLABEL_WORKER__BUSY_RETRY_S": "1",
        "SEMLABEL_WORKER__LOCK_TTL_S": "6",
        "SEMLABEL_WORKER__DEBOUNCE__ANNOTATIONS": "10",
        "SEMLABEL_WORKER__DEBOUNCE__QUIET_S": "1",
        "SEMLABEL_TEST_EPOCHS": "3",
        "SEMLABEL_TEST_EPOCH_S": "0",
    }
    for key, value in env_vars.items():
        monkeypatch.setenv(key, value)
    settings = reload_settings()
    workers = Workers(tmp_path / "logs")

    def seed(pid: int, n: int, start: int = 0):
        record_webhook(redis_conn, {"action": "TASKS_CREATED", "project": project(pid),
                                    "tasks": [{"id": 100 + i, "data": {"image": f"/img/{i}.png"}}
                                              for i in range(start, start + n)]}, settings)
        for i in range(start, start + n):
            record_webhook(redis_conn, annotation_event(i + 1, 100 + i, ("cat",) if i % 3 else ("cat", "dog"), pid=pid),
                           settings)

    ns = SimpleNamespace(settings=settings, redis=redis_conn, start_worker=workers.start, log_of=workers.log, seed=seed,
                         store=ModelStore.from_settings(settings, redis_conn), queue=queue(redis_conn, "gpu"))
    yield ns
    workers.stop(timeout=20)
    monkeypatch.undo()
    reload_settings()


def jobs_of(stack, pid) -> list[Job]:
    ids = training_state(stack.redis, pid, stack.settings)["jobs"]
    return [fetch_job(stack.redis, j) for j in reversed(ids)]


def test_start_training_in_a_real_worker_publishes_with_progress(stack):
    stack.seed(1, 6)
    info = record_webhook(stack.redis, {"action": "START_TRAINING", "project": project(1)}, stack.settings).training
    proc = stack.start_worker("burst-1", "--burst")
    assert proc.wait(timeout=120) == 0, stack.log_of("burst-1")
    job = fetch_job(stack.redis, info["job_id"])
    assert job.get_status() == "finished", stack.log_of("burst-1")
    result = job.return_value()
    assert result["status"] == "published" and result["promoted"] and result["tasks"] == 6
    assert stack.store.current(1) == stack.store.redis_current(1) == result["version"]
    meta = job.meta
    assert meta["stage"] == "done" and meta["epoch"] == 3 and meta["loss"] == pytest.approx(1 / 3, abs=1e-3)
    assert meta["holdout_mAP"] == result["metrics"]["mAP"] and meta["version"] == result["version"]
    summary = stack.store.versions(1)[-1].data_summary
    assert summary["annotations"] == 6 and summary["source"] == "events" and summary["holdout_tasks"] >= 1
    # The CLI shows it; `rq info` sees the queue.
    env = {**os.environ}
    out = run_cli("models", "status", "--project", "1", env=env)
    assert out.returncode == 0 and result["version"] in out.stdout and "stage done, epoch 3" in out.stdout
    rq_bin = Path(sys.executable).with_name("rq")
    info_out = subprocess.run([str(rq_bin), "info", "--url", os.environ["REDIS_URL"], "gpu"], capture_output=True,
                              text=True, timeout=60)
    assert info_out.returncode == 0 and "gpu" in info_out.stdout
    # Nothing changed since: a second, non-forced run is skipped as up to date.
    record_webhook(stack.redis, annotation_event(1, 100, ("cat", "dog"), action="ANNOTATION_UPDATED", pid=1,
                                                  updated_at="2026-11-23T02:00:00Z"),
                   stack.settings)
    stack.start_worker("burst-2", "--burst").wait(timeout=120)
    # The update had the same content: the pending job is still waiting out its quiet second.
    time.sleep(1.2)
    stack.start_worker("burst-3", "--burst").wait(timeout=120)
    last = jobs_of(stack, 1)[-1]
    assert last.return_value()["status"] == "up-to-date"
    assert len(stack.store.versions(1)) == 1


def test_twenty_webhooks_in_one_second_make_one_or_two_jobs_and_lose_nothing(stack):
    stack.start_worker("w-burst20")
    wait_for(lambda: "w-burst20" in [w.name for w in Worker.all(queue=stack.queue)], 60, what="the worker")
    record_webhook(stack.redis, {"action": "TASKS_CREATED", "project": project(2),
                                 "tasks": [{"id": 200 + i, "data": {"image": f"/i/{i}.png"}} for i in range(20)]},
                   stack.settings)
    # A quiet time well above the burst's second, so a stalled loop cannot split it.
    burst = stack.settings.model_copy(deep=True)
    burst.worker.debounce.quiet_s = 5.0
    t0 = time.time()
    results = []
    for i in range(20):
        results.append(record_webhook(stack.redis, annotation_event(i + 1, 200 + i, ("cat",), pid=2), burst))
        time.sleep(max(0.0, t0 + (i + 1) * 0.05 - time.time()))
    assert all(r.stored == 1 for r in results)

    def settled():
        state = training_state(stack.redis, 2, stack.settings)
        jobs = jobs_of(stack, 2)
        done = all(j.get_status() in ("finished", "failed") for j in jobs)
        return state["pending"] is None and state["running"] is None and jobs and done and jobs

    jobs = wait_for(settled, 60, what="the project's jobs to settle")
    assert 1 <= len(jobs) <= 2, [j.id for j in jobs]
    assert all(j.get_status() == "finished" for j in jobs), stack.log_of("w-burst20")
    versions = stack.store.versions(2)
    assert 1 <= len(versions) <= 2
    # None lost: the served version was trained on all twenty annotations.
    current = [v for v in versions if v.current][0]
    assert current.data_summary["annotations"] == 20 and current.data_summary["tasks"] == 20
    # The trainings folded the stream into the project's snapshot: nothing left unfolded.
    state = training_state(stack.redis, 2, stack.settings)
    assert state["events"] == 0 and state["folded_annotations"] == 20


def test_a_killed_work_horse_is_retried_and_publishes(stack):
    """SIGKILL the process that trains (as the OOM killer would): RQ notices at once, records
    the reason and retries with backoff; the retry takes over the project lock and publishes."""
    stack.seed(3, 5)
    env = {"SEMLABEL_TEST_EPOCHS": "6", "SEMLABEL_TEST_EPOCH_S": "0.5"}
    info = record_webhook(stack.redis, {"action": "START_TRAINING", "project": project(3)}, stack.settings).training
    stack.start_worker("w-horse", env=env)
    job = fetch_job(stack.redis, info["job_id"])

    def training():
        job.refresh()
        return job.meta.get("stage") == "training" and (job.meta.get("epoch") or 0) >= 2 and job.meta.get("pid")

    horse = wait_for(training, 60, what="training to reach epoch 2")
    os.kill(horse, signal.SIGKILL)
    assert stack.store.current(3) is None and stack.store.versions(3) == []

    def finished():
        job.refresh()
        return job.get_status() == "finished"

    wait_for(finished, 60, what="the retried job to finish")
    assert job.retries_left == 1
    failure = job.meta["failures"][0]["error"]
    assert failure.startswith(f"work horse {horse} killed by signal 9") and "will be retried" in failure
    assert job.return_value()["status"] == "published" and stack.store.current(3) == job.return_value()["version"]
    assert "took over the training lock" in stack.log_of("w-horse")


def test_a_killed_worker_leaves_the_served_version_and_no_half_written_version(stack):
    """SIGKILL the whole worker (machine lost) mid-training: the current version stays, no
    partial version is visible, and RQ's maintenance retries the abandoned job."""
    from rq.registry import StartedJobRegistry
    from rq.scheduler import RQScheduler

    stack.seed(4, 6)
    first = record_webhook(stack.redis, {"action": "START_TRAINING", "project": project(4)}, stack.settings).training
    assert stack.start_worker("w-first", "--burst").wait(timeout=120) == 0
    v1 = stack.store.current(4)
    assert v1 and fetch_job(stack.redis, first["job_id"]).get_status() == "finished"

    stack.seed(4, 4, start=6)
    info = record_webhook(stack.redis, {"action": "START_TRAINING", "project": project(4)}, stack.settings).training
    worker = stack.start_worker("w-doomed", env={"SEMLABEL_TEST_EPOCHS": "20", "SEMLABEL_TEST_EPOCH_S": "0.3"})
    job = fetch_job(stack.redis, info["job_id"])

    def training():
        job.refresh()
        return job.meta.get("stage") == "training" and (job.meta.get("epoch") or 0) >= 2 and job.meta.get("pid")

    horse = wait_for(training, 60, what="training to reach epoch 2")
    # The machine is lost: the worker, its work horse and its scheduler process all die at once.
    family = [worker.pid] + [c.pid for c in psutil.Process(worker.pid).children(recursive=True)]
    assert horse in family
    for pid in family:
        os.kill(pid, signal.SIGKILL)
    worker.wait()
    time.sleep(0.3)
    # The served version is unchanged and nothing half-written is visible.
    assert stack.store.current(4) == stack.store.redis_current(4) == v1
    assert [v.version for v in stack.store.versions(4)] == [v1]
    partial = list((stack.store.project_dir(4) / "staging").iterdir())
    assert len(partial) == 1 and partial[0].name.endswith(".partial")
    assert (partial[0] / "weights.partial").is_file()  # it really was killed mid-write
    assert job.get_status() == "started"
    # RQ's maintenance declares it abandoned once its heartbeat (monitoring interval + 60 s)
    # has expired; run that maintenance with the clock advanced past the expiry.
    registry = StartedJobRegistry(queue=stack.queue)
    registry.cleanup(timestamp=time.time() + 120)
    # Likewise the dead worker's scheduler lock (TTL 61 s) lapses, so another scheduler
    # enqueues the retry once its backoff is over.
    for name in ("gpu", "cpu"):
        stack.redis.delete(RQScheduler.get_locking_key(name))
    job.refresh()
    assert job.get_status() == "scheduled" and job.retries_left == 1  # retried with backoff
    assert job.meta["error"].startswith("abandoned: the worker running it stopped sending heartbeats")
    assert stack.start_worker("w-rescue", "--burst").wait(timeout=120) == 0
    time.sleep(1.5)  # the backoff
    assert stack.start_worker("w-rescue2", "--burst").wait(timeout=120) == 0
    job.refresh()
    assert job.get_status() == "finished", stack.log_of("w-rescue2")
    v2 = job.return_value()["version"]
    assert stack.store.current(4) == v2 != v1
    assert stack.store.versions(4)[-1].data_summary["annotations"] == 10


def test_two_workers_never_train_one_project_at_once(stack):
    env = {"SEMLABEL_TEST_EPOCHS": "6", "SEMLABEL_TEST_EPOCH_S": "0.5"}
    stack.start_worker("w-a", env=env)
    stack.start_worker("w-b", env=env)
    stack.seed(5, 6)
    first = record_webhook(stack.redis, {"action": "START_TRAINING", "project": project(5)}, stack.settings).training
    job1 = fetch_job(stack.redis, first["job_id"])

    def stage(job, name):
        job.refresh()
        return job.meta.get("stage") == name

    wait_for(lambda: stage(job1, "training"), 60, what="the first training")
    stack.seed(5, 2, start=6)
    second = record_webhook(stack.redis, {"action": "START_TRAINING", "project": project(5)},
                            stack.settings).training
    assert second["job_id"] != first["job_id"]

    def settled():
        jobs = jobs_of(stack, 5)
        state = training_state(stack.redis, 5, stack.settings)
        ok = state["pending"] is None and all(j.get_status() in ("finished", "failed") for j in jobs)
        return ok and len(stack.store.versions(5)) == 2 and jobs

    jobs = wait_for(settled, 90, what="both trainings")
    outcomes = {j.id: j.return_value() for j in jobs}
    assert outcomes[second["job_id"]]["status"] == "deferred"
    assert outcomes[second["job_id"]]["busy_with"] == first["job_id"]
    trained = [j for j in jobs if outcomes[j.id]["status"] == "published"]
    assert len(trained) == 2
    spans = sorted((j.meta["attempt_started_at"], j.meta["finished_at"]) for j in trained)
    assert spans[0][1] <= spans[1][0] + 0.5, spans  # no overlap (0.5 s: lock hand-over slack)
    assert stack.store.versions(5)[-1].data_summary["annotations"] == 8


def test_a_permanent_failure_is_not_retried_and_says_why(stack):
    # Annotations for a project whose label config no webhook ever carried.
    record_webhook(stack.redis, {"action": "TASKS_CREATED", "project": 6, "tasks": [{"id": 1, "data": {"image": "/a"}}]},
                   stack.settings)
    record_webhook(stack.redis, {"action": "ANNOTATION_CREATED", "project": 6,
                                 "annotation": {"id": 1, "task": 1, "result": [
                                     {"type": "choices", "value": {"choices": ["cat"]}}]}}, stack.settings)
    info = record_webhook(stack.redis, {"action": "START_TRAINING", "project": 6}, stack.settings).training
    assert stack.start_worker("w-perm", "--burst").wait(timeout=120) == 0
    job = fetch_job(stack.redis, info["job_id"])
    assert job.get_status() == "failed" and job.retries_left == 0
    assert "no label config known" in job.meta["error"]
    out = run_cli("models", "status", "--project", "6")
    assert "failed" in out.stdout and "no label config known" in out.stdout
    status = json.loads(run_cli("models", "status", "--json").stdout)
    assert status["6"]["jobs"][0]["status"] == "failed"
