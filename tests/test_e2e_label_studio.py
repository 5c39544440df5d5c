"""End to end against a real Label Studio 1.23.2 and a real ``semlabel serve``.

The suite installs Label Studio into its own cached virtualenv and starts it from a cached,
migrated template (see ``tests/helpers/label_studio.py``); the backend runs as a child process
with the packaged weights, the test session's Redis database and basic auth on. Photos are
the committed darknet sample photos, served by Label Studio as local files. Nothing is mocked.

Order matters (one project, one connected backend): connect → retrieve predictions →
interactive suggestions → annotation webhook → review prediction → update → delete → new label →
training → versions → ``semlabel suggest`` with a personal access token.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis as redis_lib

from tests.helpers.photos import PHOTOS, copy_photos
from tests.helpers.label_configs import multilabel_config
from tests.helpers.processes import run_cli
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.e2e

LABELS = ["dog", "horse", "person", "giraffe", "bird", "kite", "car", "cat", "coffee cup", "rocket"]
CONFIG = multilabel_config(LABELS)
USER, PASSWORD = "label-studio", "b4ckend-s3cret"
AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url, session_data_dir):
    from backend.ls.server import ServerProcess
    from tests.helpers.label_studio import start_label_studio_for_test

    started = time.monotonic()
    work = tmp_path_factory.mktemp("e2e")
    docroot = work / "files"
    photos = copy_photos(docroot / "photos", broken=True)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_"))}
    env.update({
        "REDIS_URL": redis_url,
        "SEMLABEL_DATA_DIR": str(session_data_dir),
        "HF_HUB_OFFLINE": "1",
        "SEMLABEL_BACKBONE__KIND": "packaged",  # the photos' expected rankings are the packaged model's
        "BASIC_AUTH_USER": USER,
        "BASIC_AUTH_PASS": PASSWORD,
        "SEMLABEL_BACKEND__REVIEW__RETRY_AFTER_S": "2",
        # The test's Label Studio runs on a free loopback port; the operator allows it.
        "SEMLABEL_AUTH__ALLOWED_LABEL_STUDIO_URLS": '["http://127.0.0.1:*"]',
    })
    server = ServerProcess(log_path=work / "backend.log")
    server.env = env  # not merged with os.environ: no LABEL_STUDIO_* from the outside
    server.launch()
    try:
        ls = start_label_studio_for_test(work, docroot, "e2e")
        server.wait_ready()
        print(f"[e2e] Label Studio and backend up in {time.monotonic() - started:.1f} s", flush=True)
        yield SimpleNamespace(ls=ls, server=server, photos=photos, work=work,
                              redis=redis_lib.Redis.from_url(redis_url))
    finally:
        server.stop()
        if "ls" in locals():
            ls.stop()


@pytest.fixture(scope="module")
def project(stack):
    ls = stack.ls
    p = ls.api("POST", "/api/projects", expect=201, json={"title": "semlabel-e2e", "label_config": CONFIG})
    storage = ls.api("POST", "/api/storages/localfiles", expect=201, json={
        "project": p["id"], "path": str(stack.photos), "regex_filter": r".*\.jpg",
        "use_blob_urls": True, "title": "photos"})
    ls.api("POST", f"/api/storages/localfiles/{storage['id']}/sync", expect=200)
    tasks = ls.api("GET", f"/api/tasks?project={p['id']}&fields=all&page_size=100", expect=200)["tasks"]
    by_name = {Path(t["data"]["image"].split("?d=")[-1]).stem: t["id"] for t in tasks}
    assert sorted(by_name) == sorted([*PHOTOS, "broken"])
    return SimpleNamespace(id=p["id"], tasks=by_name, ml=None, version=None)


def predictions(ls, **query):
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return ls.api("GET", f"/api/predictions?{q}", expect=200)


def region(pred, name="labels"):
    return next(r for r in pred["result"] if r["from_name"] == name)


def test_connect_the_backend_with_basic_auth(stack, project):
    ls, server = stack.ls, stack.server
    ml = ls.api("POST", "/api/ml", expect=201, json={
        "url": server.url, "project": project.id, "title": "semlabel", "is_interactive": True,
        "auth_method": "BASIC_AUTH", "basic_auth_user": USER, "basic_auth_pass": PASSWORD})
    project.ml = ml["id"]
    health = stack.server_health = __import__("requests").get(server.url + "/health", timeout=5).json()
    info = ls.api("GET", f"/api/ml/{ml['id']}", expect=200)
    assert info["state"] == "CO", info
    assert info["model_version"] == health["model_version"] == f"zero-shot@{health['backbone']}"
    project.version = info["model_version"]
    # The backend put its credentials on the webhook Label Studio created for it.
    hooks = wait_for(lambda: [h for h in ls.api("GET", f"/api/webhooks?project={project.id}", expect=200)
                              if h["headers"].get("Authorization") == AUTH], timeout=20,
                     what="the webhook's Authorization header")
    assert hooks[0]["url"] == server.url + "/webhook"


def test_retrieve_predictions_stores_one_per_task_and_never_duplicates(stack, project):
    ls = stack.ls
    ls.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project.id}", expect=200,
           json={"selectedItems": {"all": True, "excluded": []}})
    preds = predictions(ls, project=project.id)
    by_task = {}
    for p in preds:
        by_task.setdefault(p["task"], []).append(p)
    good = {project.tasks[n] for n in PHOTOS}
    assert set(by_task) == good  # the broken image got an error entry: nothing stored for it
    assert all(len(v) == 1 for v in by_task.values())
    assert {p["model_version"] for p in preds} == {project.version}
    scores = {}
    for name in PHOTOS:
        pred = by_task[project.tasks[name]][0]
        r = region(pred)
        scores[name] = r["meta"]["scores"]
        assert set(scores[name]) == set(LABELS)
        # The fewest expected toggles with unit costs: every label with p > 1/2, most likely first.
        assert r["value"]["choices"] == [n for n in scores[name] if scores[name][n] > 0.5][:10]
        assert pred["score"] == pytest.approx(r["score"], abs=1e-4)
        reasons = region(pred, "semlabel_reasons")
        assert reasons["value"]["text"][0].startswith("scores ") and reasons["readonly"] is True
    assert list(scores["dog"])[0] == "dog"
    assert list(scores["eagle"])[:2] == ["kite", "bird"]
    assert max(PHOTOS, key=lambda n: scores[n]["giraffe"]) == "giraffe"
    # Again: every task already has a prediction of this version, so nothing new.
    ls.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project.id}", expect=200,
           json={"selectedItems": {"all": True, "excluded": []}})
    assert len(predictions(ls, project=project.id)) == len(preds)


def test_interactive_annotating_returns_suggestions_with_reasons(stack, project):
    from backend.ls.results import p_missing

    context = {"result": [{"from_name": "labels", "to_name": "image", "type": "choices",
                           "value": {"choices": ["dog", "unicorn"]}, "origin": "manual"}]}
    out = stack.ls.api("POST", f"/api/ml/{project.ml}/interactive-annotating", expect=200,
                       json={"task": project.tasks["dog"], "context": context})
    data = out["data"]
    assert data["model_version"] == project.version
    r = region(data)
    suggested = r["meta"]["suggested"]
    assert r["meta"]["chosen"] == ["dog"] and r["meta"]["ignored"] == ["labels:unicorn"]
    assert r["value"]["choices"] == ["dog"] + [s["label"] for s in suggested]
    assert len(suggested) >= 1 and all(s["reasons"]["neighbours"] for s in suggested)
    assert [s["probability"] for s in suggested] == sorted((s["probability"] for s in suggested), reverse=True)
    assert data["score"] == p_missing(s["probability"] for s in suggested)
    assert region(data, "semlabel_reasons")["value"]["text"][0].startswith("likely missing: ")


def _review_preds(ls, task_id):
    return [p for p in predictions(ls, task=task_id)
            if any((r.get("meta") or {}).get("kind") == "review" for r in p["result"])]


def test_a_submitted_annotation_reaches_the_backend_and_gets_a_review_prediction(stack, project):
    from backend.ls.results import p_missing

    ls, r = stack.ls, stack.redis
    task_id = project.tasks["dog"]
    ann = ls.api("POST", f"/api/tasks/{task_id}/annotations", expect=201, json={
        "result": [{"from_name": "labels", "to_name": "image", "type": "choices",
                    "value": {"choices": ["dog"]}}], "lead_time": 2.5})
    project.annotation = ann["id"]
    events = r.xrange(f"semlabel:events:{project.id}")
    # stored before Label Studio answered the annotation POST
    assert [f[b"annotation_id"] for _, f in events if f[b"action"] == b"annotation"] == [str(ann["id"]).encode()]
    review = wait_for(lambda: _review_preds(ls, task_id), timeout=40, what="the review prediction")
    assert len(review) == 1
    pred = review[0]
    reg = region(pred)
    assert reg["meta"]["kind"] == "review" and reg["meta"]["annotation_id"] == ann["id"]
    assert reg["meta"]["served_version"] == project.version
    assert reg["meta"]["chosen"] == ["dog"] and reg["value"]["choices"][0] == "dog"
    probs = [s["probability"] for s in reg["meta"]["suggested"]]
    assert all(p >= 0.5 for p in probs) and len(probs) <= 3
    # P(missing) over the top unchosen labels, listed or not (the listed ones are >= 1/2).
    assert p_missing(probs) - 1e-4 <= pred["score"] < 1.0
    assert pred["mislabeling"] == pytest.approx(pred["score"], abs=1e-4)
    # The project uses the backend live: the review prediction carries the project's model
    # version (the backend's title), so the Data Manager's score column shows P(missing) for
    # this task, without switching settings; the live pre-annotations have another version.
    assert pred["model_version"] == "semlabel"
    assert ls.api("GET", f"/api/projects/{project.id}", expect=200)["model_version"] == "semlabel"
    tasks = ls.api("GET", f"/api/tasks?project={project.id}&fields=all&page_size=100", expect=200)["tasks"]
    dm = {t["id"]: t["predictions_score"] for t in tasks}
    assert dm[task_id] == pytest.approx(pred["score"], abs=1e-4)
    assert all(v is None for k, v in dm.items() if k != task_id)
    # ... and the reviewer's tab: annotated tasks, most likely missing first
    views = ls.api("GET", f"/api/dm/views?project={project.id}", expect=200)
    tab = next(v for v in views if v["data"]["title"] == "Likely missing")
    assert tab["data"]["ordering"] == ["-tasks:predictions_score"]
    assert "tasks:predictions_score" not in tab["data"]["hiddenColumns"]["explore"]


def test_an_updated_annotation_replaces_its_review_and_a_deleted_one_removes_it(stack, project):
    ls = stack.ls
    task_id = project.tasks["dog"]
    ls.api("PATCH", f"/api/annotations/{project.annotation}", expect=200, json={
        "result": [{"from_name": "labels", "to_name": "image", "type": "choices",
                    "value": {"choices": ["dog", "person"]}}]})
    review = wait_for(lambda: [p for p in _review_preds(ls, task_id)
                               if region(p)["meta"]["chosen"] == ["dog", "person"]],
                      timeout=40, what="the updated review prediction")
    assert len(_review_preds(ls, task_id)) == 1
    assert region(review[0])["value"]["choices"][:2] == ["dog", "person"]
    ls.api("DELETE", f"/api/annotations/{project.annotation}", expect=204)
    wait_for(lambda: not _review_preds(ls, task_id), timeout=40, what="the review prediction to go")
    events = [(f[b"action"].decode(), f[b"source"].decode())
              for _, f in stack.redis.xrange(f"semlabel:events:{project.id}")]
    assert events == [("annotation", "ANNOTATION_CREATED"),
                      ("annotation", "ANNOTATION_UPDATED"),
                      ("annotation_deleted", "ANNOTATIONS_DELETED")]


def test_a_label_added_to_the_config_is_scored_at_once(stack, project):
    ls = stack.ls
    new_config = CONFIG.replace('    <Choice value="rocket"/>\n', '    <Choice value="rocket"/>\n    <Choice value="eagle"/>\n')
    ls.api("PATCH", f"/api/projects/{project.id}", expect=200, json={"label_config": new_config})
    context = {"result": [{"from_name": "labels", "to_name": "image", "type": "choices",
                           "value": {"choices": ["kite"]}}]}
    out = ls.api("POST", f"/api/ml/{project.ml}/interactive-annotating", expect=200,
                 json={"task": project.tasks["eagle"], "context": context})
    suggested = [s["label"] for s in region(out["data"])["meta"]["suggested"]]
    assert suggested[0] in ("bird", "eagle") and "eagle" in suggested
    assert out["data"]["model_version"] == project.version  # no retraining, no restart


def test_start_training_reaches_the_training_queue(stack, project):
    from backend.queue.contract import fetch_job

    ls, r = stack.ls, stack.redis
    ls.api("POST", f"/api/ml/{project.ml}/train", expect=200, json={})
    pending = wait_for(lambda: r.hgetall(f"semlabel:pending:{project.id}"), timeout=10, what="a training job")
    job = fetch_job(r, pending[b"job_id"].decode())
    assert job.origin == "gpu" and list(job.args) == [str(project.id)]
    # START_TRAINING makes the project's pending job urgent: queued now, not debounced.
    # (It joins the job the annotation events scheduled and moves it to now; a worker's
    # scheduler enqueues it at once.)
    assert pending[b"urgent"] == b"1" and float(pending[b"due"]) <= time.time()
    assert job.get_status() in ("queued", "scheduled")


def test_versions_route_works_through_label_studio(stack, project):
    out = stack.ls.api("GET", f"/api/ml/{project.ml}/versions", expect=200)
    assert out["versions"][-1] == project.version


@pytest.fixture(scope="module")
def pat(stack):
    """A personal access token (a JWT refresh token; Label Studio allows one per user)."""
    return stack.ls.api("POST", "/api/token/", expect=(200, 201), json={})["token"]


def test_semlabel_suggest_with_a_personal_access_token(stack, project, pat):
    ls = stack.ls
    for name, labels in (("horses", ["horse"]), ("giraffe", ["giraffe"])):
        ls.api("POST", f"/api/tasks/{project.tasks[name]}/annotations", expect=201, json={
            "result": [{"from_name": "labels", "to_name": "image", "type": "choices",
                        "value": {"choices": labels}}]})
    before = {}
    for name in ("horses", "giraffe"):  # the backend reviews them first, from the webhooks
        before[name] = wait_for(lambda: _review_preds(ls, project.tasks[name]), timeout=40,
                                what=f"the backend's review of {name}")[0]["id"]
    env = {k: v for k, v in stack.server.env.items() if not k.startswith("BASIC_AUTH_")}
    proc = run_cli("suggest", "--project", str(project.id), "--url", ls.url, "--token", pat, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["tasks"] == 2 and summary["annotations"] == 2 and summary["stored"] == 2
    assert summary["model_version"] == "semlabel" and summary["errors"] == []  # the live title
    assert "100%" in proc.stderr  # the progress bar ran to the end
    for name, labels in (("horses", ["horse"]), ("giraffe", ["giraffe"])):
        review = _review_preds(ls, project.tasks[name])  # the CLI replaced the backend's review
        assert len(review) == 1 and review[0]["id"] != before[name]
        assert region(review[0])["meta"]["chosen"] == labels


def test_task_images_download_with_a_personal_access_token_and_a_legacy_token(stack, project, pat, tmp_path):
    from backend.images import ImageLoader
    from backend.ls.connection import LabelStudioConnection
    from backend.settings import get_settings

    ls = stack.ls
    url = ls.api("GET", f"/api/tasks/{project.tasks['dog']}", expect=200)["data"]["image"]
    assert "/data/local-files/?d=photos/dog.jpg" in url
    expected = (stack.photos / "dog.jpg").read_bytes()
    for token in (pat, ls.token):
        conn = LabelStudioConnection(ls.url, token)
        loader = ImageLoader(get_settings().images, label_studio=conn, local_roots=[], cache_dir=tmp_path)
        assert loader.fetch(url, project.tasks["dog"]).data == expected
    # a PAT is a refresh token: what goes out is a short-lived access token
    assert LabelStudioConnection(ls.url, pat).auth_headers()["Authorization"].startswith("Bearer ")
    assert LabelStudioConnection(ls.url, ls.token).auth_headers()["Authorization"] == f"Token {ls.token}"


def test_an_uploaded_image_is_downloaded_once_then_served_from_the_feature_cache(stack):
    """Files uploaded to Label Studio never change: a warm /predict reads the task's cached
    features without downloading the image again (proved by deleting the upload after the
    first request: the second still predicts)."""
    import requests

    ls, server = stack.ls, stack.server
    p = ls.api("POST", "/api/projects", expect=201, json={"title": "semlabel-uploads", "label_config": CONFIG})
    with open(stack.photos / "dog.jpg", "rb") as fh:
        ls.api("POST", f"/api/projects/{p['id']}/import", expect=201, files={"dog.jpg": fh})
    task = ls.api("GET", f"/api/tasks?project={p['id']}&fields=all", expect=200)["tasks"][0]
    assert task["data"]["image"].startswith("/data/upload/")
    http = requests.Session()
    http.headers["Authorization"] = AUTH
    setup = {"project": f"{p['id']}.1", "schema": CONFIG, "hostname": ls.url, "access_token": ls.token}
    assert http.post(server.url + "/setup", json=setup, timeout=30).status_code == 200
    body = {"tasks": [{"id": task["id"], "data": task["data"], "project": p["id"]}],
            "project": f"{p['id']}.1", "label_config": CONFIG}
    first = http.post(server.url + "/predict", json=body, timeout=120).json()["results"][0]
    uploaded = list((ls.data_dir / "media" / "upload" / str(p["id"])).iterdir())
    assert len(uploaded) == 1
    uploaded[0].unlink()  # Label Studio can no longer serve it
    assert http.get(ls.url + task["data"]["image"], headers=ls.headers, timeout=30).status_code != 200
    second = http.post(server.url + "/predict", json=body, timeout=120).json()["results"][0]
    assert "error" not in second, second
    assert region(second)["meta"]["scores"] == region(first)["meta"]["scores"]
    assert list(region(first)["meta"]["scores"])[0] == "dog"
