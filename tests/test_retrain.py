"""Acceptance: the whole retraining loop with real processes, the real model and real photos.

``semlabel serve`` (the WSGI app Label Studio talks to) and ``semlabel worker`` run as child
processes against the real Redis; annotations arrive as HTTP webhooks shaped like Label Studio
1.23's; the worker trains the SigRL heads on the packaged backbone's features; the backend
picks the published version up without a restart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import redis as redis_lib
import requests

from tests.helpers.label_configs import multilabel_config
from tests.helpers.photos import PHOTOS, copy_photos, skimage_photo
from tests.helpers.processes import Workers, run_cli
from tests.helpers.redis_server import reset_db
from tests.helpers.waiting import wait_for

LABELS = ["dog", "horse", "person", "giraffe", "bird", "kite", "cat", "coffee cup", "rocket"]
CONFIG = multilabel_config(LABELS, reasons=False)
# photo → the labels an annotator chose (partial: not every visible thing is chosen)
TRUTH = {
    "dog": ["dog"], "eagle": ["bird"], "giraffe": ["giraffe"], "horses": ["horse"],
    "person": ["person", "dog", "horse"], "kite": ["kite", "person"], "chelsea": ["cat"],
    "coffee": ["coffee cup"], "rocket": ["rocket"], "astronaut": ["person", "rocket"],
    "camera": ["person"],
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("retrain-photos")
    out = {}
    for name in TRUTH:
        if name in PHOTOS:
            out[name] = copy_photos(root, names=[name]) / f"{name}.jpg"
        else:
            out[name] = skimage_photo(name, root, suffix=".jpg")
    return out


class Stack:
    """A backend server process and worker processes sharing one Redis DB and one store."""

    def __init__(self, redis_url: str, data_dir: Path, store: Path, photos_dir: Path, logs: Path):
        self.redis_url = redis_url
        self.logs = logs
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "SEMLABEL_DATA_DIR": str(data_dir),
            "SEMLABEL_STORE__ROOT": str(store),
            "SEMLABEL_STORE__POLL_INTERVAL_S": "1.0",
            "SEMLABEL_IMAGES__LOCAL_ROOTS": json.dumps([str(photos_dir)]),
            "SEMLABEL_BACKBONE__KIND": "packaged",
            "SEMLABEL_BACKEND__REVIEW__ENABLED": "false",
            "SEMLABEL_WORKER__PREFETCH_FEATURES": "false",
            "SEMLABEL_WORKER__DEBOUNCE__ANNOTATIONS": str(len(TRUTH)),
            "SEMLABEL_WORKER__DEBOUNCE__QUIET_S": "2",
            "SEMLABEL_WORKER__JOB_MONITORING_INTERVAL_S": "1",
            "SEMLABEL_WORKER__RETRY_INTERVALS_S": "[1, 2]",
            "SEMLABEL_WORKER__LOCK_TTL_S": "6",
            "HF_HUB_OFFLINE": "1",
        }
        self.server = None
        self.workers = Workers(logs, env=self.env)
        self.http = requests.Session()

    @property
    def url(self) -> str:
        return self.server.url

    def start_server(self):
        from backend.ls.server import ServerProcess

        self.server = ServerProcess(env=self.env, log_path=self.logs / "server.log").start(timeout=300)
        return self

    def start_worker(self, name: str, *extra: str) -> subprocess.Popen:
        return self.workers.start(name, *extra)

    def worker_ready(self, name: str, timeout: float = 180) -> None:
        from rq import Worker

        r = redis_lib.Redis.from_url(self.redis_url)

        def listed() -> bool:
            assert self.workers[name].poll() is None, self.log(name)
            return name in [w.name for w in Worker.all(connection=r)]

        wait_for(listed, timeout, step=0.2, what=lambda: f"worker {name} to start:\n{self.log(name)}")

    def log(self, name: str) -> str:
        return self.workers.log(name, tail=4000)

    def stop(self) -> None:
        self.workers.stop(timeout=30)
        if self.server is not None:
            self.server.stop()

    # -- Label Studio's side of the conversation -------------------------------------
    def setup(self, project: int) -> str:
        resp = self.http.post(self.url + "/setup", json={"project": f"{project}.1795398852", "schema": CONFIG},
                              timeout=30)
        resp.raise_for_status()
        return resp.json()["model_version"]

    def predict(self, project: int, photos: dict[str, Path], names) -> list[dict]:
        tasks = [{"id": self.task_id(project, n), "data": {"image": str(photos[n])}, "project": project}
                 for n in names]
        resp = self.http.post(self.url + "/predict", json={
            "tasks": tasks, "project": f"{project}.1795398852", "label_config": CONFIG,
            "params": {"login": None, "password": None, "context": None}}, timeout=120)
        resp.raise_for_status()
        return resp.json()["results"]

    @staticmethod
    def task_id(project: int, name: str) -> int:
        return project * 1000 + list(TRUTH).index(name)

    def webhook(self, payload: dict) -> requests.Response:
        return self.http.post(self.url + "/webhook", json=payload, timeout=5)

    def annotate(self, project: int, name: str, labels, ann_id: int | None = None,
                 action: str = "ANNOTATION_CREATED") -> requests.Response:
        tid = self.task_id(project, name)
        payload = {
            "action": action,
            "annotation": {
                "id": ann_id or tid, "task": tid, "project": project, "completed_by": 1,
                "result": [{"from_name": "labels", "to_name": "image", "type": "choices",
                            "value": {"choices": list(labels)}}],
                "was_cancelled": False, "ground_truth": False,
                "created_at": "2026-11-23T01:55:38.646245Z", "updated_at": "2026-11-23T01:55:38.646271Z",
            },
            "project": {"id": project, "title": "retrain", "label_config": CONFIG},
        }
        return self.webhook(payload)


def scores_of(entry: dict) -> dict[str, float]:
    result = next(r for r in entry["result"] if r["from_name"] == "labels")
    return result["meta"]["scores"]


def map_of(scores: dict[str, dict[str, float]]) -> float:
    """Mean over labels of the average precision of ``scores`` against TRUTH."""
    from worker.eval.metrics import mean_average_precision
    import torch

    names = list(TRUTH)
    s = torch.tensor([[scores[n][l] for l in LABELS] for n in names])
    y = torch.tensor([[float(l in TRUTH[n]) for l in LABELS] for n in names])
    return float(mean_average_precision(s, y))


def wait_for_version(stack: Stack, project: int, old: str, timeout: float = 300) -> tuple[str, float]:
    """Poll /setup (what Label Studio asks) until it names another version; (version, when)."""
    version = wait_for(lambda: (v := stack.setup(project)) != old and v, timeout,
                       what=f"project {project} to serve another version than {old}")
    return version, time.time()


def retrain_once(stack: Stack, project: int, photos: dict[str, Path]) -> dict:
    """Label Studio's loop for one project: predictions (zero-shot), every task annotated,
    a new version served. Returns the figures of the run."""
    names = list(TRUTH)
    before_version = stack.setup(project)
    before = {n: scores_of(e) for n, e in zip(names, stack.predict(project, photos, names))}
    for name in names:
        resp = stack.annotate(project, name, TRUTH[name])
        assert resp.status_code == 201, resp.text
        last = time.time()
    served, served_at = wait_for_version(stack, project, before_version)
    version, _, backbone = served.partition("@")  # store version @ backbone name
    assert backbone.startswith("packaged:")
    after_entries = stack.predict(project, photos, names)
    after = {n: scores_of(e) for n, e in zip(names, after_entries)}
    return {
        "project": project, "before_version": before_version, "version": version, "served": served,
        "versions_in_predict": {e["model_version"] for e in after_entries},
        "latency_s": served_at - last, "before": before, "after": after,
    }


@pytest.fixture(scope="module")
def stack(redis_url, session_data_dir, photos, tmp_path_factory):
    r = redis_lib.Redis.from_url(redis_url)
    base = tmp_path_factory.mktemp("retrain")
    logs = base / "logs"
    logs.mkdir()
    s = Stack(redis_url, session_data_dir, base / "models", next(iter(photos.values())).parent, logs)
    try:
        s.start_server()
        s.start_worker("retrain-w1")
        s.worker_ready("retrain-w1")
        yield s
    finally:
        s.stop()
        reset_db(r)


def test_annotation_webhooks_retrain_and_the_backend_serves_the_new_version(stack, photos):
    server_pid = stack.server.proc.pid
    run = retrain_once(stack, 301, photos)
    assert run["before_version"].startswith("zero-shot@")
    assert run["version"].startswith("v") and run["versions_in_predict"] == {run["served"]}
    # Different scores.
    diffs = [abs(run["after"][n][l] - run["before"][n][l]) for n in TRUTH for l in LABELS]
    assert max(diffs) > 0.1
    # (Reported, not asserted: model quality is tests/test_train*'s business.)
    before_map, after_map = map_of(run["before"]), map_of(run["after"])
    print(f"\nmAP of the annotated labels on their own images: zero-shot {before_map:.3f} → trained {after_map:.3f}")
    # Same backend process all along.
    assert stack.server.proc.pid == server_pid and stack.server.proc.poll() is None
    health = stack.http.get(stack.url + "/health?project=301", timeout=5).json()
    assert health["model_version"] == run["served"]
    # The job's story is readable.
    out = run_cli("models", "status", "--project", "301", env=stack.env)
    assert run["version"] in out.stdout and "stage done" in out.stdout, out.stdout + out.stderr
    print(f"\nlast annotation → new version served: {run['latency_s']:.2f} s")


def test_a_corrupted_version_is_refused_and_the_previous_keeps_serving(stack, photos):
    from backend.store import ModelStore

    run = retrain_once(stack, 302, photos)
    good = run["version"]
    r = redis_lib.Redis.from_url(stack.redis_url)
    store = ModelStore.from_settings(root=stack.env["SEMLABEL_STORE__ROOT"], redis=r)
    src = store.version_dir(302, good)
    names = list(TRUTH)[:3]
    reference = [scores_of(e) for e in stack.predict(302, photos, names)]

    # 1. Files that pass their checksums but do not load (truncated weights, manifest rebuilt).
    with store.staging(302) as tmp:
        for f in src.iterdir():
            if f.name != "manifest.json":
                (tmp / f.name).write_bytes(f.read_bytes())
        weights = tmp / "weights.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        broken = store.publish(302, tmp, promote=True).version
    # 2. A version whose bytes changed after publishing (checksum mismatch).
    with store.staging(302) as tmp:
        for f in src.iterdir():
            if f.name != "manifest.json":
                (tmp / f.name).write_bytes(f.read_bytes())
        tampered = store.publish(302, tmp, promote=False).version
    path = store.version_dir(302, tampered) / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    store._set_current("302", tampered, "test: a pointer forced onto a tampered version")

    wait_for(lambda: {broken, tampered} <= set(store.refusals(302)), 30, step=0.2,
             what="both versions to be refused")
    refused = store.refusals(302)
    assert broken in refused and tampered in refused, refused
    assert "checksum" in refused[tampered]["reason"]
    # The version Label Studio reads says why the newest training is not the one served.
    shown = stack.setup(302)
    assert shown.startswith(run["served"] + " (") and "failed to load" in shown, shown
    entries = stack.predict(302, photos, names)
    assert {e["model_version"] for e in entries} == {shown}
    assert [scores_of(e) for e in entries] == reference
    out = run_cli("models", "status", "--project", "302", env=stack.env)
    assert f"refused {broken}" in out.stdout and f"refused {tampered}" in out.stdout
    # Rolling back the pointer skips the refused versions: the store is in line with what is served.
    assert store.rollback(302) == good and store.current(302) == good


def test_a_worker_killed_mid_training_changes_nothing_served_and_the_job_is_retried(stack, photos):
    from rq.registry import StartedJobRegistry
    from rq.scheduler import RQScheduler

    from backend.queue.contract import fetch_job, queue
    from backend.queue.debounce import training_state
    from backend.store import ModelStore

    r = redis_lib.Redis.from_url(stack.redis_url)
    store = ModelStore.from_settings(root=stack.env["SEMLABEL_STORE__ROOT"], redis=r)
    run = retrain_once(stack, 303, photos)
    v1 = run["version"]
    # Stop the shared worker; a doomed one takes the next job.
    stack.workers["retrain-w1"].send_signal(signal.SIGTERM)
    stack.workers["retrain-w1"].wait(timeout=60)
    doomed = stack.start_worker("retrain-doomed")
    for name in ("dog", "kite"):
        assert stack.annotate(303, name, TRUTH[name] + ["person"], action="ANNOTATION_UPDATED").status_code == 201
    resp = stack.webhook({"action": "START_TRAINING", "project": {"id": 303, "label_config": CONFIG}})
    assert resp.status_code == 201
    job = fetch_job(r, training_state(r, 303)["jobs"][0])

    def training() -> bool:
        job.refresh()
        return job.meta.get("stage") in ("training", "features", "evaluating") and bool(job.meta.get("pid"))

    wait_for(training, 240, step=0.05, what=lambda: f"the job to start training:\n{stack.log('retrain-doomed')}")
    family = [doomed.pid] + [c.pid for c in psutil.Process(doomed.pid).children(recursive=True)]
    assert job.meta["pid"] in family
    for pid in family:
        os.kill(pid, signal.SIGKILL)
    doomed.wait()
    time.sleep(2)
    # Nothing changed for Label Studio, and no half-written version is visible.
    assert stack.setup(303) == run["served"]
    assert [v.version for v in store.versions(303)] == [v1] and store.current(303) == v1
    assert job.get_status() == "started"
    # RQ's maintenance (run here with the clock past the dead worker's heartbeat) retries it.
    StartedJobRegistry(queue=queue(r, "gpu")).cleanup(timestamp=time.time() + 120)
    for name in ("gpu", "cpu"):
        r.delete(RQScheduler.get_locking_key(name))
    job.refresh()
    assert job.get_status() == "scheduled" and "abandoned" in job.meta["error"]
    stack.start_worker("retrain-rescue")
    v2, _ = wait_for_version(stack, 303, run["served"], timeout=300)
    v2 = v2.partition("@")[0]
    job.refresh()
    assert job.get_status() == "finished" and job.return_value()["version"] == v2
    summary = store.versions(303)[-1].data_summary
    assert summary["annotations"] == len(TRUTH) and summary["job"] == job.id
