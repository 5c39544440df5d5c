"""The WSGI app through Flask's test client: every route, bad input, real photos, real Redis/RQ.

Nothing is mocked: the packaged backbone with real weights scores the darknet sample
photos committed under tests/data/photos, webhooks go to the real Redis (a private database) and RQ, the model store is a real
directory.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import redis as redis_lib

from tests.helpers.label_configs import multilabel_config
from tests.helpers.photos import PHOTOS, copy_photos
from tests.helpers.redis_server import reset_db
from tests.helpers.waiting import wait_for

LABELS = ["dog", "horse", "person", "giraffe", "bird", "kite", "car", "cat", "coffee cup", "rocket"]


CONFIG = multilabel_config(LABELS)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    # The committed darknet photos, a truncated JPEG and a text file named .jpg.
    return copy_photos(tmp_path_factory.mktemp("photos"), broken=True, not_an_image=True)


def app_settings(settings, photos: Path, **backend):
    images = settings.images.model_copy(update={"local_roots": [str(photos)]})
    top = {k: backend.pop(k) for k in list(backend) if k in ("basic_auth_user", "basic_auth_pass")}
    b = settings.backend
    pre = b.preannotation.model_copy(update=backend.pop("preannotation", {}))
    review = b.review.model_copy(update=backend.pop("review", {}))
    back = b.model_copy(update={"preannotation": pre, "review": review, **backend})
    backbone = settings.backbone.model_copy(update={"kind": "packaged"})  # the expected rankings' model
    # The tests' /setup names a Label Studio on the loopback; the operator allows it.
    auth = settings.auth.model_copy(update={"allowed_label_studio_urls": ["http://127.0.0.1:*"]})
    return settings.model_copy(update={"images": images, "backend": back, "backbone": backbone, "auth": auth,
                                       **top})


def make_app(settings, runtime, redis_client, tmp_path, loader=None, **kw):
    from backend.ls.app import create_app
    from backend.store import ModelStore, ServedModels

    store = ModelStore.from_settings(root=tmp_path / "models", redis=redis_client)
    served = ServedModels.from_settings(store, runtime, loader=loader, redis=redis_client, poll_interval_s=0.1)
    return create_app(settings, runtime=runtime, redis=redis_client, served=served, start_threads=False, **kw)


@pytest.fixture(scope="module")
def env(settings, runtime, redis_url, photos, tmp_path_factory):
    s = app_settings(settings, photos)
    r = redis_lib.Redis.from_url(redis_url)
    app = make_app(s, runtime, r, tmp_path_factory.mktemp("store"))
    service = app.extensions["semlabel"]
    yield app, service
    service.close()


@pytest.fixture
def client(env):
    return env[0].test_client()


def task(i, name, photos):
    return {"id": i, "data": {"image": str(photos / f"{name}.jpg")}, "project": 7}


def predict(client, tasks, cfg=CONFIG, project="7.1795398852", context=None, status=200):
    body = {"tasks": tasks, "project": project, "label_config": cfg,
            "params": {"login": None, "password": None, "context": context}}
    resp = client.post("/predict", json=body)
    assert resp.status_code == status, resp.get_data(as_text=True)
    return resp.json


def choices_of(entry, name="labels"):
    return next(r for r in entry["result"] if r["from_name"] == name)


# ----------------------------------------------------------------------------- health/setup
def test_health_is_fast_and_reports_backbone_and_version(client, runtime):
    resp = client.get("/health")
    assert resp.status_code == 200
    body = resp.json
    assert body["status"] == "UP" and body["ready"] is True
    assert body["backbone"] == runtime.backbone.name
    assert body["model_version"] == f"zero-shot@{runtime.backbone.name}"


def test_setup_predict_and_health_agree_on_the_model_version(client, photos, runtime):
    resp = client.post("/setup", json={"project": "7.1795398852", "schema": CONFIG,
                                       "hostname": "http://127.0.0.1:1", "access_token": "x" * 40,
                                       "extra_params": None})
    assert resp.status_code == 200
    version = resp.json["model_version"]
    assert version == f"zero-shot@{runtime.backbone.name}"
    out = predict(client, [task(1, "dog", photos), task(2, "eagle", photos)])
    assert [e["model_version"] for e in out["results"]] == [version, version]
    assert client.get("/health?project=7").json["model_version"] == version


def test_setup_refuses_a_config_it_cannot_serve(client, photos):
    resp = client.post("/setup", json={"project": "7.1", "schema": '<View><Text name="t" value="$t"/></View>'})
    assert resp.status_code == 400
    assert "no <Choices> bound to an <Image>" in resp.json["error"]
    assert client.post("/setup", data="{nope", content_type="application/json").status_code == 400
    # A host Label Studio could not be reached at is refused, not remembered for later requests.
    resp = client.post("/setup", json={"project": "7.1", "schema": CONFIG, "hostname": "ls.example:8080"})
    assert resp.status_code == 400 and "http(s) URL" in resp.json["error"]
    assert len(predict(client, [task(1, "dog", photos)], project="7.1")["results"][0]["result"]) >= 1


# ---------------------------------------------------------------------------------- predict
def test_predictions_rank_the_right_labels_on_real_photos(client, photos):
    tasks = [task(i + 1, name, photos) for i, name in enumerate(PHOTOS)]
    out = predict(client, tasks)["results"]
    assert len(out) == len(PHOTOS)
    scores = {name: choices_of(e)["meta"]["scores"] for name, e in zip(PHOTOS, out)}
    for name, entry in zip(PHOTOS, out):
        assert list(scores[name]) == sorted(scores[name], key=lambda n: -scores[name][n])  # most likely first
        assert set(scores[name]) == set(LABELS)
        region = choices_of(entry)
        # the decision rule: fewest expected toggles = every label over 0.5 (possibly none)
        picked = region["value"]["choices"]
        assert picked == [n for n in scores[name] if scores[name][n] > 0.5][:10]
        expected = (sum(scores[name][n] for n in picked) / len(picked) if picked
                    else sum(1 - v for v in scores[name].values()) / len(scores[name]))
        assert region["score"] == pytest.approx(expected, abs=2e-4)
        assert entry["score"] == region["score"]
        # nothing in these photos is a coffee cup or a rocket
        assert "coffee cup" not in region["value"]["choices"] and "rocket" not in region["value"]["choices"]
    assert next(iter(scores["dog"])) == "dog"
    assert list(scores["eagle"])[:2] == ["kite", "bird"]  # ImageNet's "kite" is the bird of prey
    assert max(PHOTOS, key=lambda n: scores[n]["giraffe"]) == "giraffe"
    assert max(PHOTOS, key=lambda n: scores[n]["bird"]) == "eagle"
    reasons = next(r for r in out[0]["result"] if r["from_name"] == "semlabel_reasons")
    assert reasons["type"] == "textarea" and reasons["readonly"] is True
    assert reasons["value"]["text"][0].startswith(f"scores dog {100 * scores['dog']['dog']:.0f}%, ")


def test_a_task_whose_image_fails_gets_an_error_entry_and_the_others_predictions(client, photos):
    tasks = [
        task(1, "dog", photos),
        task(2, "broken", photos),
        {"id": 3, "data": {"image": "ftp://files.example.org/cat.jpg"}},
        {"id": 4, "data": {"image": "http://images.example.org/cat.jpg"}},
        {"id": 5, "data": {"picture": str(photos / "dog.jpg")}},
        {"id": 6, "data": {"image": "/etc/hostname"}},
        task(7, "notes", photos),
        {"id": 8, "data": {"image": "/data/upload/3/abc-cat.jpg"}},
        task(9, "eagle", photos),
    ]
    out = predict(client, tasks)["results"]
    assert len(out) == 9
    assert [("result" in e) for e in out] == [True, False, False, False, False, False, False, False, True]
    errors = {i + 1: e["error"] for i, e in enumerate(out) if "error" in e}
    assert "truncated or corrupt image" in errors[2]
    assert "URL not allowed" in errors[3] and "URL not allowed" in errors[4]
    assert errors[5] == "task 5: the task's data has no image under 'image'"
    assert "outside images.local_roots" in errors[6]
    assert "not an image" in errors[7]
    # project 7's /setup named a Label Studio at 127.0.0.1:1, where nothing listens
    assert "could not be downloaded" in errors[8] and "127.0.0.1" in errors[8]
    assert next(iter(choices_of(out[0])["meta"]["scores"])) == "dog"  # most likely first
    assert next(iter(choices_of(out[8])["meta"]["scores"])) == "kite"
    # every task failing: 422 with the same entries
    bad = predict(client, tasks[1:3], status=422)
    assert bad["error"].startswith("no task could be predicted: task 2:")
    assert len(bad["results"]) == 2


@pytest.mark.parametrize("body, reason", [
    ("not json", "body is not valid JSON"),
    ("", "empty body"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"label_config": "<View/>"}', "no 'tasks' in the request"),
    ('{"tasks": "x"}', "'tasks' must be a list, got str"),
    ('{"tasks": []}', "'tasks' is empty"),
    ('{"tasks": [{"id": 1, "data": {}}]}', "no label config in the request"),
    ('{"tasks": [{"id": 1, "data": {}}], "label_config": "<View><Text name=\\"t\\" value=\\"$t\\"/></View>"}',
     "no <Choices> bound to an <Image>"),
    ('{"tasks": [{"id": 1, "data": {}}], "label_config": "<View><Image"}', "not valid XML"),
])
def test_bad_predict_requests_get_400_with_the_reason(client, body, reason):
    resp = client.post("/predict", data=body, content_type="application/json")
    assert resp.status_code == 400
    assert reason in resp.json["error"]


def test_interactive_context_returns_chosen_labels_plus_ranked_suggestions_with_reasons(client, photos, settings):
    from backend.ls.results import p_missing

    context = {"result": [{"from_name": "labels", "to_name": "image", "type": "choices",
                           "value": {"choices": ["dog", "unicorn"]}, "origin": "manual"}]}
    out = predict(client, [task(1, "dog", photos)], context=context)["results"][0]
    region = choices_of(out)
    meta = region["meta"]
    suggested = meta["suggested"]
    assert meta["chosen"] == ["dog"]
    assert region["value"]["choices"] == ["dog"] + [s["label"] for s in suggested]
    assert len(suggested) == settings.suggest.top_k
    probs = [s["probability"] for s in suggested]
    assert probs == sorted(probs, reverse=True)
    assert "dog" not in [s["label"] for s in suggested]
    for s in suggested:
        assert s["reasons"]["visual"] == s["probability"]  # zero-shot: the image alone
        assert len(s["reasons"]["neighbours"]) == settings.suggest.neighbours
        assert s["text"].startswith(f"{s['label']} ")
    assert meta["ignored"] == ["labels:unicorn"]
    assert out["score"] == region["score"] == p_missing(probs)
    reasons = next(r for r in out["result"] if r["from_name"] == "semlabel_reasons")
    assert reasons["value"]["text"][0].startswith(f"likely missing: {suggested[0]['label']} ")
    assert reasons["value"]["text"][-1] == "ignored (not in the label config): labels:unicorn"


def test_choice_aliases_are_what_predictions_carry_and_what_context_maps_back(client, photos):
    cfg = ('<View><Image name="image" value="$image"/><Choices name="labels" toName="image" choice="multiple">'
           '<Choice value="dog" alias="D01"/><Choice value="bird" alias="B02" hint="a feathered animal"/>'
           '<Choice value="car" alias="C03"/></Choices></View>')
    out = predict(client, [task(1, "eagle", photos)], cfg=cfg)["results"][0]
    scores = choices_of(out)["meta"]["scores"]
    assert set(scores) == {"D01", "B02", "C03"}
    assert next(iter(scores)) == "B02"
    ctx = {"result": [{"from_name": "labels", "to_name": "image", "type": "choices",
                       "value": {"choices": ["B02", "bird"]}}]}
    inter = predict(client, [task(1, "eagle", photos)], cfg=cfg, context=ctx)["results"][0]
    meta = choices_of(inter)["meta"]
    assert meta["chosen"] == ["B02"] and meta["ignored"] == ["labels:bird"]
    from label_studio_sdk.label_interface import LabelInterface

    assert LabelInterface(cfg).validate_prediction(out, return_errors=True) == []
    assert LabelInterface(cfg).validate_prediction(inter, return_errors=True) == []


def test_labels_added_to_the_config_are_scored_at_once(client, photos, env):
    service = env[1]
    before = predict(client, [task(1, "eagle", photos)], cfg=multilabel_config(["dog", "cat"]))["results"][0]
    assert set(choices_of(before)["meta"]["scores"]) == {"dog", "cat"}
    misses = service.runtime.text_cache.misses
    after = predict(client, [task(1, "eagle", photos)], cfg=multilabel_config(["dog", "cat", "kite", "falcon"]))["results"][0]
    scores = choices_of(after)["meta"]["scores"]
    assert list(scores)[0] == "kite" and set(scores) == {"dog", "cat", "kite", "falcon"}
    assert scores["dog"] == choices_of(before)["meta"]["scores"]["dog"]  # old labels unchanged
    assert service.runtime.text_cache.misses > misses  # embedded the new texts only now


def test_several_choice_image_pairs_and_single_choice(client, photos):
    cfg = ('<View><Image name="a" value="$left"/><Image name="b" value="$right"/>'
           '<Choices name="animals" toName="a" choice="multiple"><Choice value="dog"/><Choice value="bird"/>'
           '<Choice value="giraffe"/></Choices>'
           '<Choices name="kind" toName="b"><Choice value="dog"/><Choice value="bird"/></Choices></View>')
    t = {"id": 1, "data": {"left": str(photos / "giraffe.jpg"), "right": str(photos / "eagle.jpg")}}
    out = predict(client, [t], cfg=cfg)["results"][0]
    assert [(r["from_name"], r["to_name"]) for r in out["result"]] == [("animals", "a"), ("kind", "b")]
    assert out["result"][1]["value"]["choices"] == ["bird"]  # single choice: exactly one
    assert set(out["result"][0]["meta"]["scores"]) == {"dog", "bird", "giraffe"}


def test_concurrent_requests_share_one_model_and_agree(env, photos):
    app = env[0]
    results, errors = [], []

    def work():
        try:
            c = app.test_client()
            out = predict(c, [task(1, "dog", photos), task(2, "horses", photos)])
            results.append(json.dumps([choices_of(e)["meta"]["scores"] for e in out["results"]]))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == []
    assert len(results) == 6 and len(set(results)) == 1


# ---------------------------------------------------------------------------------- webhooks
def _annotation(action, ann_id, task_id, labels, photos, pid=7, **extra):
    return {
        "action": action,
        "annotation": {"id": ann_id, "task": task_id, "project": pid, "completed_by": 1,
                       "result": [{"from_name": "labels", "to_name": "image", "type": "choices",
                                   "value": {"choices": list(labels)}}],
                       "was_cancelled": False, "ground_truth": False,
                       "created_at": "2026-11-23T01:55:38.646245Z", "updated_at": "2026-11-23T01:55:38.646271Z",
                       **extra},
        "project": {"id": pid, "title": "p", "label_config": CONFIG, "model_version": "semlabel"},
        "task": {"id": task_id, "data": {"image": str(photos / "dog.jpg")}, "project": pid},
    }


def test_annotation_webhooks_are_persisted_and_queue_review_jobs(client, redis_conn, photos):
    resp = client.post("/webhook", json=_annotation("ANNOTATION_CREATED", 11, 3, ["dog"], photos))
    assert resp.status_code == 201, resp.json
    body = resp.json
    assert body["stored"] == 1 and body["training"]["job_id"].startswith("train-7-")
    assert len(body["review_jobs"]) == 1
    events = redis_conn.xrange("semlabel:events:7")
    assert len(events) == 1 and events[0][1][b"annotation_id"] == b"11"
    jobs = redis_conn.xrange("semlabel:review")
    assert len(jobs) == 1
    job = json.loads(jobs[0][1][b"job"])
    assert job["kind"] == "review" and job["task_id"] == 3 and job["annotation"]["id"] == 11
    assert job["task_data"] == {"image": str(photos / "dog.jpg")} and job["label_config"] == CONFIG

    assert client.post("/webhook", json=_annotation("ANNOTATION_UPDATED", 11, 3, ["dog", "person"],
                                                    photos)).status_code == 201
    skipped = _annotation("ANNOTATION_CREATED", 12, 4, [], photos, was_cancelled=True)
    assert client.post("/webhook", json=skipped).status_code == 201
    deleted = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 11}, {"id": 12}],
               "project": {"id": 7, "label_config": CONFIG}}
    resp = client.post("/webhook", json=deleted)
    assert resp.status_code == 201 and resp.json["stored"] == 2
    assert redis_conn.xlen("semlabel:events:7") == 5
    kinds = [json.loads(f[b"job"])["kind"] for _, f in redis_conn.xrange("semlabel:review")]
    assert kinds == ["review", "review", "delete"]  # the skipped annotation asks for no review


def test_start_training_goes_to_the_gpu_queue(client, redis_conn):
    from backend.queue.contract import fetch_job

    resp = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7, "label_config": CONFIG}})
    assert resp.status_code == 201
    job_id = resp.json["job"]
    job = fetch_job(redis_conn, job_id)
    assert job.origin == "gpu" and job.func_name == "worker.jobs.train_project" and list(job.args) == ["7"]
    assert job.get_status() == "queued"


def test_project_and_task_events_are_recorded_and_others_ignored(client, redis_conn):
    resp = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 7, "label_config": CONFIG}})
    assert resp.status_code == 201
    assert redis_conn.hget("semlabel:project:7", "label_config").decode() == CONFIG
    resp = client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 7},
                                         "tasks": [{"id": 40, "data": {"image": "/data/upload/7/x.jpg"}}]})
    assert resp.status_code == 201
    assert json.loads(redis_conn.hget("semlabel:tasks:7", "40")) == {"image": "/data/upload/7/x.jpg"}
    keys = set(redis_conn.keys("*"))
    resp = client.post("/webhook", json={"action": "LABEL_LINK_CREATED", "project": {"id": 7}})
    assert resp.status_code == 200 and resp.json["ignored"] is True
    assert set(redis_conn.keys("*")) == keys


@pytest.mark.parametrize("body, reason", [
    ("{nope", "payload is not a JSON object"),
    ('{"project": {"id": 7}}', "no 'action'"),
    ('{"action": "ANNOTATION_CREATED", "project": {"id": 7}}', "ANNOTATION_CREATED without an annotation"),
    ('{"action": "ANNOTATION_CREATED", "project": {"id": 7}, "annotation": {"task": 3}}', "annotation id is missing"),
    ('{"action": "START_TRAINING"}', "START_TRAINING without a project id"),
])
def test_malformed_webhooks_get_400_and_store_nothing(client, redis_conn, body, reason):
    before = set(redis_conn.keys("*"))
    resp = client.post("/webhook", data=body, content_type="application/json")
    assert resp.status_code == 400
    assert reason in resp.json["error"]
    assert set(redis_conn.keys("*")) == before


def test_without_redis_webhooks_are_spooled_and_predictions_still_work(settings, runtime, photos, tmp_path):
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    dead = redis_lib.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    s = app_settings(settings, photos).model_copy(update={"data_dir": str(tmp_path / "data")})
    app = make_app(s, runtime, dead, tmp_path)
    try:
        c = app.test_client()
        # Kept on disk (fsync'd) and accepted: Label Studio never resends a refused webhook.
        resp = c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
        assert resp.status_code == 202 and resp.json["spooled"] is True, resp.json
        assert app.extensions["semlabel"].events.spool.stats()["entries"] == 1
        assert c.post("/webhook", json={"project": {"id": 7}}).status_code == 400  # malformed stays 400
        assert app.extensions["semlabel"].events.spool.stats()["entries"] == 1
        assert c.post("/train", json={"project": 7}).status_code == 503
        out = predict(c, [task(1, "dog", photos)])
        assert next(iter(choices_of(out["results"][0])["meta"]["scores"])) == "dog"
    finally:
        app.extensions["semlabel"].close()


# ---------------------------------------------------------------------------- other routes
def test_versions_answers_get_and_post(client, runtime):
    zs = f"zero-shot@{runtime.backbone.name}"
    resp = client.get("/versions")
    assert resp.status_code == 200 and resp.json["versions"] == [zs]
    resp = client.post("/versions", json={"project": 7})
    assert resp.status_code == 200 and resp.json["versions"][-1] == zs and resp.json["model_version"] == zs
    resp = client.post("/versions", json=[1])  # not an object: as if no body was sent
    assert resp.status_code == 200 and resp.json["versions"] == [zs]


def test_train_route_queues_a_training_job(client, redis_conn):
    from backend.queue.contract import fetch_job

    resp = client.post("/train", json={"project": "7.1795398852"})
    assert resp.status_code == 201
    assert fetch_job(redis_conn, resp.json["job"]).origin == "gpu"
    assert client.post("/train", json={}).status_code == 400


def test_metrics_are_prometheus_text_with_exact_counts(client, photos):
    from prometheus_client.parser import text_string_to_metric_families

    def sample(name, **labels):
        text = client.get("/metrics").get_data(as_text=True)
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    ok = sample("semlabel_predictions_total", kind="preannotation", outcome="ok")
    err = sample("semlabel_predictions_total", kind="preannotation", outcome="error")
    calls = sample("semlabel_http_requests_total", route="/predict", method="POST", status="200")
    predict(client, [task(1, "dog", photos), task(2, "broken", photos), task(3, "kite", photos)])
    assert sample("semlabel_predictions_total", kind="preannotation", outcome="ok") == ok + 2
    assert sample("semlabel_predictions_total", kind="preannotation", outcome="error") == err + 1
    assert sample("semlabel_http_requests_total", route="/predict", method="POST", status="200") == calls + 1
    ignored = sample("semlabel_webhook_events_total", action="other", outcome="ignored")
    client.post("/webhook", json={"action": "TASKS_DELETED_NOPE", "project": {"id": 7}})
    # an action Label Studio does not send is counted as "other": the label values stay bounded
    assert sample("semlabel_webhook_events_total", action="other", outcome="ignored") == ignored + 1
    assert sample("semlabel_model_info", project="7") == 1.0
    resp = client.get("/metrics")
    assert resp.content_type.startswith("text/plain")


def test_basic_auth_guards_every_route_but_health(settings, runtime, photos, redis_url, tmp_path):
    import base64

    r = redis_lib.Redis.from_url(redis_url)
    s = app_settings(settings, photos, basic_auth_user="ls", basic_auth_pass="s3cret")
    app = make_app(s, runtime, r, tmp_path)
    try:
        c = app.test_client()
        good = {"Authorization": "Basic " + base64.b64encode(b"ls:s3cret").decode()}
        bad = {"Authorization": "Basic " + base64.b64encode(b"ls:wrong").decode()}
        assert c.get("/health").status_code == 200
        assert c.post("/setup", json={"project": "7.1", "schema": CONFIG}).status_code == 401
        assert c.post("/setup", json={"project": "7.1", "schema": CONFIG}, headers=bad).status_code == 401
        assert c.post("/setup", json={"project": "7.1", "schema": CONFIG}, headers=good).status_code == 200
        resp = c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
        assert resp.status_code == 401 and resp.headers["WWW-Authenticate"].startswith("Basic")
        assert r.exists("semlabel:pending:7") == 0  # nothing stored
        resp = c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}}, headers=good)
        assert resp.status_code == 201
        assert c.get("/metrics").status_code == 401 and c.get("/metrics", headers=good).status_code == 200
    finally:
        app.extensions["semlabel"].close()
        reset_db(r)


def test_a_published_version_is_served_without_restart(settings, runtime, photos, redis_url, tmp_path):
    """A trained model knows some labels; the others (added later) still get scores."""
    from tests.helpers.tiny_model import load_tiny, save_tiny

    r = redis_lib.Redis.from_url(redis_url)
    app = make_app(app_settings(settings, photos), runtime, r, tmp_path, loader=load_tiny)
    service = app.extensions["semlabel"]
    try:
        c = app.test_client()
        zs = c.post("/setup", json={"project": "9.1", "schema": CONFIG}).json["model_version"]
        assert zs.startswith("zero-shot@")
        staged = save_tiny(tmp_path / "m1", {"dog": 3.0, "cat": -3.0})
        version = service.store.publish("9", staged, promote=True).version
        version = f"{version}@{runtime.backbone.name}"  # the served name carries the backbone
        wait_for(lambda: c.post("/setup", json={"project": "9.1", "schema": CONFIG}).json["model_version"] != zs,
                 10, step=0.05, what="the new version to be picked up")
        assert c.post("/setup", json={"project": "9.1", "schema": CONFIG}).json["model_version"] == version
        out = predict(c, [task(1, "eagle", photos)], project="9.1")["results"][0]
        assert out["model_version"] == version
        scores = choices_of(out)["meta"]["scores"]
        assert scores["dog"] == pytest.approx(0.9526, abs=1e-4) and scores["cat"] == pytest.approx(0.0474, abs=1e-4)
        assert scores["rocket"] == 0.5  # unknown to this model, still scored
        assert c.get("/health?project=9").json["model_version"] == version
        # other projects are still zero-shot
        assert predict(c, [task(1, "eagle", photos)], project="10.1")["results"][0]["model_version"] == zs
    finally:
        service.close()
        reset_db(r)


def test_semlabel_model_follows_the_label_studio_ml_contract(env, photos, redis_conn):
    import multiprocessing

    from label_studio_ml.model import LabelStudioMLBase

    from backend.ls.model import SemlabelModel

    assert multiprocessing.get_start_method() == "fork"  # label_studio_ml's "spawn" was undone
    model = SemlabelModel(env[1], project="7", label_config=CONFIG)
    assert isinstance(model, LabelStudioMLBase)
    assert model.model_version == env[1].zero_shot_version
    preds = model.predict([task(1, "dog", photos)])
    assert len(preds) == 1 and next(iter(choices_of(preds[0])["meta"]["scores"])) == "dog"
    out = model.process_event("START_TRAINING", {"project": {"id": 7}}, job_id=None)
    assert out["job"].startswith("train-7-") and redis_conn.exists("semlabel:pending:7") == 1
    out = model.process_event("ANNOTATIONS_DELETED", {"annotations": [{"id": 5}], "project": {"id": 7}})
    assert out["stored"] == 1


def test_predict_before_setup_in_a_fresh_process_waits_for_the_model(settings, photos, tmp_path):
    """/health says LOADING at first; a /predict sent before any /setup waits and succeeds."""
    from backend.ls.app import create_app

    app = create_app(app_settings(settings, photos), redis=None, background=True, start_threads=False)
    service = app.extensions["semlabel"]
    try:
        c = app.test_client()
        first = c.get("/health")
        assert first.status_code == 503 and first.json["status"] == "LOADING"
        assert c.post("/setup", json={"project": "7.1", "schema": CONFIG}).status_code in (200, 503)
        out = predict(c, [task(1, "dog", photos)])
        assert next(iter(choices_of(out["results"][0])["meta"]["scores"])) == "dog"
        assert c.get("/health").status_code == 200
    finally:
        service.close()


def test_a_trained_model_suggests_with_co_occurrence_and_scores_labels_it_never_saw(
        settings, runtime, photos, redis_url, tmp_path):
    """The real conditional model of the model issue, trained here on a few annotated photos."""
    from backend.model import save_model
    from worker.training.data import attach_feature_batch, examples_from_tasks
    from worker.training.train import train_model

    trained = {"dog": ["dog"], "eagle": ["bird"], "giraffe": ["giraffe"], "horses": ["horse", "person", "dog"],
               "person": ["person", "dog", "horse"], "kite": ["kite", "person"], "scream": ["person"]}
    seen = ["dog", "horse", "person", "giraffe", "bird", "kite"]
    tasks = [{"id": i + 1, "data": {"image": str(photos / f"{n}.jpg")},
              "annotations": [{"id": i + 1, "was_cancelled": False, "result": [
                  {"from_name": "labels", "to_name": "image", "type": "choices", "value": {"choices": labels}}]}]}
             for i, (n, labels) in enumerate(trained.items())]
    s = app_settings(settings, photos)
    # Few photos: let the known-label expert count as trained from its first sampled example
    # (the default asks for train.min_known_samples before it is applied at all).
    s = s.model_copy(update={"train": s.train.model_copy(update={"epochs": 3, "min_known_samples": 1})})
    examples, _ = examples_from_tasks(tasks[:6], seen)
    examples, batch, errors = attach_feature_batch(examples, runtime)
    assert len(examples) == 6 and not errors
    result = train_model(examples, runtime.label_space(seen), batch, s, backbone=runtime.backbone)
    save_model(result.model, tmp_path / "staged", metrics=result.metrics)
    r = redis_lib.Redis.from_url(redis_url)
    app = make_app(s, runtime, r, tmp_path)  # the store's default loader: backend.model.load_predictor
    service = app.extensions["semlabel"]
    try:
        version = service.store.publish("12", tmp_path / "staged", promote=True).version
        c = app.test_client()
        served = c.post("/setup", json={"project": "12.1", "schema": CONFIG}).json["model_version"]
        assert version in served
        ctx = {"result": [{"from_name": "labels", "to_name": "image", "type": "choices",
                           "value": {"choices": ["person"]}}]}
        out = predict(c, [task(1, "horses", photos)], project="12.1", context=ctx)["results"][0]
        assert out["model_version"] == served
        suggested = choices_of(out)["meta"]["suggested"]
        top2 = {s["label"]: s for s in suggested[:2]}
        assert set(top2) == {"horse", "dog"}
        # P(horse | person) = 2/3 and P(dog | person) = 2/3 in the training annotations
        for s_ in top2.values():
            assert s_["reasons"]["co_occurring"] == [["person", 0.6667]]
            assert s_["probability"] > s_["reasons"]["visual"]  # the chosen label raised it
        plain = predict(c, [task(1, "horses", photos)], project="12.1")["results"][0]
        scores = choices_of(plain)["meta"]["scores"]
        assert {"car", "cat", "coffee cup", "rocket"} <= set(scores)  # never seen in training, still scored
        assert all(0.0 < scores[n] < 1.0 for n in scores)
    finally:
        service.close()
        reset_db(r)


def test_a_training_the_gate_refuses_is_explained_where_label_studio_shows_versions(
        settings, runtime, photos, redis_url, tmp_path):
    """Start training → the gate keeps the old version: Label Studio learns why from /setup's
    model_version (stored on its ML backend, re-read on every "Retrieve predictions", which then
    re-predicts tasks whose predictions carry another version) and from the predictions' model
    version and reasons text."""
    from tests.helpers.tiny_model import load_tiny, save_tiny

    r = redis_lib.Redis.from_url(redis_url)
    app = make_app(app_settings(settings, photos), runtime, r, tmp_path, loader=load_tiny)
    service = app.extensions["semlabel"]
    try:
        c = app.test_client()
        setup = {"project": "14.1795398852", "schema": CONFIG, "hostname": "http://127.0.0.1:1"}
        first = service.store.publish("14", save_tiny(tmp_path / "m1", {"dog": 3.0}, {"mAP": 0.6}),
                                      data_summary={"train_tasks": 24, "holdout_tasks": 6})
        assert first.promoted
        served = f"{first.version}@{runtime.backbone.name}"
        wait_for(lambda: c.post("/setup", json=setup).json["model_version"] == served, 10, step=0.05,
                 what="the first version to be picked up")
        # 40 annotations later: trained, evaluated on the held-out tasks, refused by the gate.
        second = service.store.publish("14", save_tiny(tmp_path / "m2", {"dog": -3.0}, {"mAP": 0.3}),
                                       data_summary={"train_tasks": 32, "holdout_tasks": 8})
        assert not second.promoted and service.store.current("14") == first.version
        version = c.post("/setup", json=setup).json["model_version"]
        assert version == (f"{served} (latest training {second.version} not served: "
                           f"held-out mAP 0.300 < 0.600 - 0.02)")
        out = predict(c, [task(1, "dog", photos)], project="14.1795398852")
        entry = out["results"][0]
        assert out["model_version"] == entry["model_version"] == version
        assert choices_of(entry)["meta"]["scores"]["dog"] == pytest.approx(0.9526, abs=1e-4)  # still the first
        text = choices_of(entry, "semlabel_reasons")["value"]["text"]
        assert text[-1] == (f"Served model: {served}. The latest training on 32 tasks (8 more held out to compare), "
                            f"version {second.version}, was kept but not served: {second.reason}.")
        assert "worse than current" in second.reason
        assert c.get("/versions?project=14").json["model_version"] == version
        assert second.version in c.get("/versions?project=14").json["versions"]
        # Promoted by hand: the explanation goes, the version is the plain served name again.
        service.store.promote("14", second.version)
        plain = f"{second.version}@{runtime.backbone.name}"
        wait_for(lambda: c.post("/setup", json=setup).json["model_version"] == plain, 10, step=0.05,
                 what="the promoted version to be picked up")
        entry = predict(c, [task(1, "dog", photos)], project="14.1795398852")["results"][0]
        assert entry["model_version"] == plain
        assert not any("not served" in line for line in choices_of(entry, "semlabel_reasons")["value"]["text"])
    finally:
        service.close()
        reset_db(r)
