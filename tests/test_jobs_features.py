"""The `cpu` queue: newly imported tasks' features are computed ahead of training by a real
worker with the real (packaged) backbone, into the feature cache the trainer reads."""

from __future__ import annotations

import json
import os

from backend.queue.contract import fetch_job, queue
from backend.queue.eventlog import record_webhook
from tests.helpers.processes import REPO, run_cli


def test_tasks_created_prefetches_features_on_the_cpu_queue(redis_url, redis_conn, session_data_dir, sample_images,
                                                            runtime, monkeypatch):
    from backend.settings import reload_settings

    roots = json.dumps([str(next(iter(sample_images.values())).parent)])
    env = {**os.environ, "REDIS_URL": redis_url, "SEMLABEL_DATA_DIR": str(session_data_dir),
           "SEMLABEL_BACKBONE__KIND": "packaged", "SEMLABEL_IMAGES__LOCAL_ROOTS": roots,
           "SEMLABEL_WORKER__PRELOAD": "false", "HF_HUB_OFFLINE": "1"}
    monkeypatch.setenv("SEMLABEL_WORKER__PREFETCH_FEATURES", "true")
    settings = reload_settings()
    tasks = [{"id": i + 1, "data": {"image": str(p)}} for i, p in enumerate(sample_images.values())]
    tasks.append({"id": 99, "data": {"image": str(REPO / "no-such-image.png")}})
    result = record_webhook(redis_conn, {"action": "TASKS_CREATED", "project": {"id": 5}, "tasks": tasks}, settings)
    assert result.stored == 0 and not result.ignored
    # A project whose label config binds the image to `photo`: its other keys are not images
    # (`url` would be the guess without the config).
    xml = ('<View><Image name="img" value="$photo"/><Choices name="label" toName="img" choice="multiple">'
           '<Choice value="a"/><Choice value="b"/></Choices></View>')
    first = next(iter(sample_images.values()))
    bound = [{"id": 1, "data": {"photo": str(first), "url": "https://example.org/page", "note": "text"}}]
    record_webhook(redis_conn, {"action": "TASKS_CREATED", "project": {"id": 6, "label_config": xml},
                                "tasks": bound}, settings)
    job, bound_job = queue(redis_conn, "cpu").jobs
    proc = run_cli("worker", "--burst", "--queue", "cpu", env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = fetch_job(redis_conn, job.id)
    assert job.get_status() == "finished", proc.stderr[-3000:]
    out = job.return_value()
    assert out["images"] == len(tasks) and out["errors"] == 1
    assert out["computed"] + out["cached"] == len(sample_images)
    assert len(job.meta["errors"]) == 1 and "no-such-image.png" in job.meta["errors"][0]
    assert out["image_field"] is None  # project 5's webhooks sent no label config: the usual keys
    bound_out = fetch_job(redis_conn, bound_job.id).return_value()
    assert bound_out["image_field"] == "photo" and bound_out["images"] == 1 and bound_out["errors"] == 0
    # The trainer's runtime (same cache) now finds every image's features without encoding.
    hits = runtime.features.hits
    feats = runtime.features_for([str(p) for p in sample_images.values()])
    assert all(not isinstance(f, Exception) for f in feats)
    assert runtime.features.hits - hits == len(sample_images)
    monkeypatch.undo()
    reload_settings()
