"""The training job's data: the event log, reconciled with a real Label Studio's export.

Label Studio 1.23.2 runs from the suite's cached install (tests/helpers/label_studio.py). The
backend "saw" some annotation webhooks; then, while it was down, an annotation was edited and
another deleted in Label Studio. The job must train on what Label Studio holds now.
"""

from __future__ import annotations


import pytest

from backend.queue.eventlog import read_events, record_webhook
from tests.helpers.label_configs import multilabel_config
from worker.jobs.collect import collect, split_holdout

pytestmark = pytest.mark.e2e

CONFIG = multilabel_config(["cat", "dog", "bird"], reasons=False, aliases={"dog": "puppy"})


def choices(*labels):
    return [{"from_name": "labels", "to_name": "image", "type": "choices", "value": {"choices": list(labels)}}]


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    from tests.helpers.label_studio import start_label_studio_for_test

    work = tmp_path_factory.mktemp("ls-jobs")
    docroot = work / "files"
    docroot.mkdir()
    ls = start_label_studio_for_test(work, docroot, "ls")
    try:
        yield ls
    finally:
        ls.stop()


@pytest.fixture
def settings_for(monkeypatch):
    from backend.settings import reload_settings

    def make(url=None, token=None):
        for key, value in (("LABEL_STUDIO_URL", url), ("LABEL_STUDIO_API_KEY", token)):
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, value)
        return reload_settings()

    yield make
    monkeypatch.undo()
    reload_settings()


def test_label_studio_export_wins_over_missed_webhooks(label_studio, redis_conn, settings_for):
    ls = label_studio
    project = ls.api("POST", "/api/projects", expect=201, json={"title": "jobs", "label_config": CONFIG})
    pid = project["id"]
    ls.api("POST", f"/api/projects/{pid}/import", expect=201,
           json=[{"image": f"/data/local-files/?d=img{i}.jpg"} for i in range(4)])
    tasks = ls.api("GET", f"/api/tasks?project={pid}&fields=all&page_size=100", expect=200)["tasks"]
    tids = sorted(t["id"] for t in tasks)
    anns = [ls.api("POST", f"/api/tasks/{tid}/annotations", expect=201, json={"result": choices(*labels)})
            for tid, labels in zip(tids, [("cat",), ("puppy",), ("bird", "cat")])]
    offline = settings_for()
    # What the backend was told while it was up.
    record_webhook(redis_conn, {"action": "TASKS_CREATED", "project": {"id": pid, "label_config": CONFIG},
                                "tasks": [{"id": t["id"], "data": t["data"]} for t in tasks]}, offline)
    for ann in anns:
        record_webhook(redis_conn, {"action": "ANNOTATION_CREATED", "annotation": ann,
                                    "project": {"id": pid, "label_config": CONFIG}}, offline)
    # Then, while it was down: an edit and a deletion it never heard of.
    ls.api("PATCH", f"/api/annotations/{anns[0]['id']}", expect=200, json={"result": choices("cat", "puppy")})
    ls.api("DELETE", f"/api/annotations/{anns[1]['id']}", expect=204)
    upto = read_events(redis_conn, pid, offline)[-1]["id"]

    from_events = collect(redis_conn, str(pid), upto, offline)
    assert from_events.source == "events" and len(from_events.tasks) == 3

    online = settings_for(ls.url, ls.token)
    data = collect(redis_conn, str(pid), upto, online)
    assert data.source == "label-studio" and data.label_config == CONFIG
    by_task = {t["id"]: t for t in data.tasks}
    assert set(by_task) == {tids[0], tids[2]}  # the deleted annotation's task has no annotation left
    assert by_task[tids[0]]["annotations"][0]["result"][0]["value"]["choices"] == ["cat", "puppy"]
    assert by_task[tids[0]]["data"] == {"image": "/data/local-files/?d=img0.jpg"}
    assert data.fingerprint != from_events.fingerprint and data.summary()["annotations"] == 2

    # Label Studio unreachable: the event log, saying so.
    unreachable = settings_for("http://127.0.0.1:9", ls.token)
    fallback = collect(redis_conn, str(pid), upto, unreachable)
    assert fallback.source == "events" and "Label Studio API unavailable" in fallback.notes[0]
    assert len(fallback.tasks) == 3


def test_holdout_split_is_stable_as_a_project_grows():
    tasks = [{"id": i} for i in range(200)]
    train, held = split_holdout(tasks, 0.2, seed=0, min_holdout=5)
    assert 20 <= len(held) <= 60 and len(train) + len(held) == 200
    more_train, more_held = split_holdout(tasks + [{"id": i} for i in range(200, 400)], 0.2, seed=0, min_holdout=5)
    assert {t["id"] for t in held} <= {t["id"] for t in more_held}
    assert not ({t["id"] for t in train} & {t["id"] for t in more_held})
    assert split_holdout(tasks[:10], 0.2, min_holdout=5) == (tasks[:10], [])
