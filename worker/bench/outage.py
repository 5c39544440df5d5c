"""``semlabel bench-outage``: Redis is killed during a burst of annotation webhooks.

The acceptance check of the disk spool (:mod:`backend.queue.spool`): ``n`` ``ANNOTATION_CREATED``
webhooks go to the backend's ``/webhook`` over HTTP at ``rate`` per second; after
``kill_after`` of them the Redis server is killed (SIGKILL) and started again ``outage_s``
seconds later with its data. Then a ``START_TRAINING`` webhook, and the training job's own
first steps (:func:`backend.queue.debounce.claim_pending`, :func:`worker.jobs.collect.collect`) read what the
next training trains on. The report counts the annotations that reach it, those stored twice
and those lost, the answers Label Studio got (201 stored, 202 spooled, anything else) and
their latency, and how long the replay took after Redis came back.

:func:`outage_burst` is the driver, shared with ``tests/test_attacks_redis.py`` (which runs a
short burst without timing anything).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

LABEL_CONFIG = ('<View><Image name="image" value="$image"/><Choices name="labels" toName="image" '
                'choice="multiple"><Choice value="cat"/><Choice value="dog"/></Choices></View>')


def annotation_webhook(project: int, i: int) -> dict:
    """The ``ANNOTATION_CREATED`` payload Label Studio sends (trimmed) for annotation ``i``
    (id ``i``) of task ``10000 + i``."""
    task_id = 10000 + i
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {
            "id": i, "task": task_id, "project": project, "completed_by": 1,
            "result": [{"from_name": "labels", "to_name": "image", "type": "choices",
                        "value": {"choices": ["cat"] if i % 2 else ["cat", "dog"]}}],
            "was_cancelled": False, "ground_truth": False,
            "created_at": f"2026-12-01T10:00:{i % 60:02d}.000000Z",
            "updated_at": f"2026-12-01T10:00:{i % 60:02d}.{i:06d}Z",
        },
        "task": {"id": task_id, "project": project, "data": {"image": f"/data/upload/{project}/img-{i}.jpg"}},
        "project": {"id": project, "title": "outage", "label_config": LABEL_CONFIG},
    }


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def outage_burst(post: Callable[[dict], tuple[int, dict]], *, project: int, n: int, kill_after: int,
                 kill: Callable[[], None], restart: Callable[[], None], outage_s: float,
                 rate: float | None = None, restart_after: int | None = None) -> dict:
    """Send ``n`` annotation webhooks through ``post(payload) -> (status, body)``; call
    ``kill()`` before webhook ``kill_after`` and ``restart()`` ``outage_s`` seconds later (from
    a timer), or, with ``restart_after``, right before that webhook (no clock: for tests).
    ``rate``: webhooks per second (``None``: as fast as they are answered).
    Returns the answers: ``statuses`` and per-webhook ``latency_ms`` / ``during_outage``."""
    statuses: Counter = Counter()
    latency, during = [], []
    down = threading.Event()
    timer = None
    started = time.perf_counter()
    restarted_at: list[float] = []

    def bring_back():
        restart()
        restarted_at.append(time.perf_counter())
        down.clear()

    for i in range(1, n + 1):
        if rate:
            time.sleep(max(0.0, started + (i - 1) / rate - time.perf_counter()))
        if i == kill_after + 1:
            kill()
            down.set()
            if restart_after is None:
                timer = threading.Timer(outage_s, bring_back)
                timer.start()
        if restart_after is not None and i == restart_after + 1:
            bring_back()
        outage = down.is_set()
        t0 = time.perf_counter()
        status, _ = post(annotation_webhook(project, i))
        latency.append((time.perf_counter() - t0) * 1000.0)
        during.append(outage)
        statuses[status] += 1
    if timer is not None:
        timer.join()
    return {"statuses": dict(statuses), "latency_ms": latency, "during_outage": during,
            "restarted_at": restarted_at[0] if restarted_at else None, "started_at": started}


def count_training_input(redis, project: int, n: int, post: Callable[[dict], tuple[int, dict]], settings) -> dict:
    """After the burst: START_TRAINING, then what that training job reads (its claim and its
    collect step, in this process). Counts annotations reaching it, lost and stored twice."""
    from backend.queue.debounce import claim_pending
    from backend.queue.eventlog import read_events
    from worker.jobs.collect import collect

    status, body = post({"action": "START_TRAINING", "project": {"id": project, "label_config": LABEL_CONFIG}})
    job_id = (body or {}).get("job") or ""
    claimed, upto = claim_pending(redis, str(project), job_id, settings)
    data = collect(redis, str(project), upto, settings)
    trained = sorted(int(a["id"]) for t in data.tasks for a in t["annotations"])
    stored = [int(e["annotation_id"]) for e in read_events(redis, project, settings) if e.get("action") == "annotation"]
    return {
        "start_training_status": status,
        "job_claimed": claimed,
        "reached_training": len(trained),
        "distinct_in_training": len(set(trained)),
        "lost": len(set(range(1, n + 1)) - set(trained)),
        "stored_events": len(stored),
        "stored_twice": len(stored) - len(set(stored)),
        "training_source": data.source,
    }


def _wait_until(predicate, timeout_s: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def run(out_dir: Path, *, n: int = 200, rate: float = 5.0, kill_after: int = 25, outage_s: float = 30.0,
        project: int = 1) -> dict:
    """The benchmark (see the module doc): an embedded valkey (append-only, fsync per write)
    in a temporary directory, the backend app served over HTTP on a free port, the burst."""
    import requests
    from werkzeug.serving import make_server

    from backend.ls.app import create_app
    from backend.redis.connection import EmbeddedRedis, redis_client
    from backend.settings import get_settings

    root = Path(tempfile.mkdtemp(prefix="semlabel-outage-"))
    base = get_settings()
    # Review jobs off: they are written with their webhook's events either way, and their
    # consumer (which needs a Label Studio) would only add load to what is measured.
    back = base.backend.model_copy(update={"review": base.backend.review.model_copy(update={"enabled": False})})
    settings = base.model_copy(update={"data_dir": str(root / "data"), "redis_url": None, "backend": back})
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access line per webhook
    timeouts = {"start_timeout_s": base.redis.embedded.start_timeout_s, "stop_timeout_s": base.redis.stop_timeout_s}
    emb = EmbeddedRedis(root / "redis", port=0, appendfsync="always", **timeouts).start()
    port, pid_box = emb.port, [emb]
    client = redis_client(settings, emb.url)
    app = create_app(settings, redis=client, background=True)
    service = app.extensions["semlabel"]
    service.wait_ready(300)  # the backbone loads before the burst, not during it
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/webhook"
    session = requests.Session()

    def post(payload):
        resp = session.post(url, json=payload, timeout=30)
        try:
            return resp.status_code, resp.json()
        except ValueError:
            return resp.status_code, {}

    def kill():
        os.kill(pid_box[0].pid, signal.SIGKILL)
        pid_box[0]._server = None  # killed: nothing to stop at exit

    def restart():
        pid_box[0] = EmbeddedRedis(root / "redis", port=port, appendfsync="always", **timeouts).start()
        if pid_box[0]._server.port != port:
            raise RuntimeError(f"Redis came back on port {pid_box[0]._server.port}, not {port}")

    try:
        burst = outage_burst(post, project=project, n=n, kill_after=kill_after, kill=kill, restart=restart,
                             outage_s=outage_s, rate=rate)
        spool = service.events.spool
        _wait_until(spool.empty, 120)
        replayed_at = service.events.drained_at or time.perf_counter()
        counts = count_training_input(client, project, n, post, settings)
    finally:
        server.shutdown()
        service.close()
        pid_box[0].stop()
    report = _report(burst, counts, service.events, replayed_at, n=n, rate=rate, kill_after=kill_after,
                     outage_s=outage_s)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "outage.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _report(burst: dict, counts: dict, events, replayed_at: float, *, n: int, rate: float, kill_after: int,
            outage_s: float) -> dict:
    """``outage.json``: answers, latency with Redis up and down, replay time and the counts."""
    lat = burst["latency_ms"]
    down = [x for x, d in zip(lat, burst["during_outage"]) if d]
    up = [x for x, d in zip(lat, burst["during_outage"]) if not d]

    def summary(values):
        return {"count": len(values), "median": round(statistics.median(values), 2) if values else None,
                "p95": round(_percentile(values, 0.95), 2) if values else None,
                "max": round(max(values), 2) if values else None}

    report = {
        "webhooks": n, "rate_per_s": rate, "killed_after": kill_after, "outage_s": outage_s,
        "answers": {str(k): v for k, v in sorted(burst["statuses"].items())},
        "latency_ms": {"all": summary(lat), "redis_up": summary(up), "redis_down": summary(down)},
        "replay_done_s_after_restart": round(replayed_at - burst["restarted_at"], 3)
        if burst["restarted_at"] else None,
        "spooled_total": events.spooled, "replayed_total": events.replayed,
        **counts,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "ok": counts["reached_training"] == n and counts["lost"] == 0 and counts["stored_twice"] == 0,
    }
    return report
