"""What the annotator and the reviewer see, in a real browser: Debian chromium (playwright), a
real Label Studio 1.23.2 and a real ``semlabel serve`` with the README's recommended config.

The story: log in, open a task (pre-selected labels and the reasons text visible), tick one
label, point at an unlabelled object with the smart KeyPoint (its label appears ticked, the
chosen ones stay), submit; then, as a reviewer, open the Data Manager's "Likely missing"
tab and find the task there with its P(missing). Screenshots (and the page's HTML) are kept
under the test's temporary directory (``shots/``). Asserts are on what the page shows and on
what Label Studio saved (its API).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from tests.helpers.browser import browser_page, choice_box, log_in, require_browser, ticked
from tests.helpers.photos import copy_photos
from tests.helpers.label_configs import multilabel_config
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.e2e

LABELS = ["dog", "horse", "person", "giraffe", "bird", "kite", "car", "cat", "coffee cup", "rocket"]
CONFIG = multilabel_config(LABELS, smart=True)  # the README's
TITLE = "semlabel"  # the connected backend's title: the project's live model version
TAB = "Likely missing"
DOG = (0.22, 0.70)  # the dog in person.jpg, in fractions of the image


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url, session_data_dir):
    from backend.ls.server import ServerProcess
    from tests.helpers.label_studio import start_label_studio_for_test

    require_browser()  # skip before starting anything when there is no browser
    work = tmp_path_factory.mktemp("browser")
    docroot = work / "files"
    photos = copy_photos(docroot / "photos")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_"))}
    env.update({
        "REDIS_URL": redis_url,
        "SEMLABEL_DATA_DIR": str(session_data_dir),
        "HF_HUB_OFFLINE": "1",
        "SEMLABEL_BACKBONE__KIND": "packaged",
        "SEMLABEL_BACKEND__REVIEW__RETRY_AFTER_S": "2",
        "SEMLABEL_AUTH__ALLOWED_LABEL_STUDIO_URLS": '["http://127.0.0.1:*"]',  # /setup's address
    })
    server = ServerProcess(log_path=work / "backend.log")
    server.env = env
    server.launch()
    try:
        ls = start_label_studio_for_test(work, docroot, "browser")
        server.wait_ready()
        p = ls.api("POST", "/api/projects", expect=201, json={"title": "semlabel-browser", "label_config": CONFIG})
        storage = ls.api("POST", "/api/storages/localfiles", expect=201, json={
            "project": p["id"], "path": str(photos), "regex_filter": r".*\.jpg", "use_blob_urls": True,
            "title": "photos"})
        ls.api("POST", f"/api/storages/localfiles/{storage['id']}/sync", expect=200)
        tasks = ls.api("GET", f"/api/tasks?project={p['id']}&fields=all&page_size=100", expect=200)["tasks"]
        by_name = {Path(t["data"]["image"].split("?d=")[-1]).stem: t["id"] for t in tasks}
        ls.api("POST", "/api/ml", expect=201, json={"url": server.url, "project": p["id"], "title": TITLE,
                                                    "is_interactive": True})
        yield SimpleNamespace(ls=ls, server=server, project=p["id"], tasks=by_name, work=work,
                              shots=work / "shots", state={})
    finally:
        server.stop()
        if "ls" in locals():
            ls.stop()
        # Label Studio numbers projects from 1 in every instance: leave no events of this
        # project 1 to the next module's
        import redis as redis_lib

        from tests.helpers.redis_server import reset_db

        reset_db(redis_lib.Redis.from_url(redis_url))


def _choices(result, name="labels"):
    return next((r["value"]["choices"] for r in result if r.get("from_name") == name), [])


def _review_preds(ls, task_id):
    return [p for p in ls.api("GET", f"/api/predictions?task={task_id}", expect=200)
            if any((r.get("meta") or {}).get("kind") == "review" for r in p["result"])]


def _metric(server, kind):
    text = requests.get(server.url + "/metrics", timeout=10).text
    m = re.search(r'semlabel_predictions_total\{kind="%s",outcome="ok"\} ([0-9.]+)' % kind, text)
    return float(m.group(1)) if m else 0.0


def test_the_annotator_points_at_the_unlabelled_dog_and_it_is_ticked(stack):
    ls, task_id = stack.ls, stack.tasks["person"]
    with browser_page(stack.shots) as page:
        log_in(page, ls.url, "admin@example.com", "Passw0rd!semlabel")
        page.goto(f"{ls.url}/projects/{stack.project}/data?task={task_id}")
        reasons = page.get_by_text(re.compile(r"^scores dog \d+%"))
        reasons.wait_for()
        # Label Studio asked the backend live and stored its prediction: what is ticked is it.
        pre = wait_for(lambda: [p for p in ls.api("GET", f"/api/predictions?task={task_id}", expect=200)],
                       what="the live pre-annotation")[0]
        preselected = _choices(pre["result"])
        # The fewest-expected-toggles rule on the calibrated zero-shot scores: a weak model
        # ticks nothing rather than guessing (every score here is below 1/2).
        assert preselected == []
        assert ticked(page, LABELS) == preselected
        assert "(pre-selected: none)" in reasons.inner_text()
        page.shot("1-task-opened")

        # The annotator ticks "horse". Label Studio saves the draft 5 s after a change; the
        # backend reads the annotator's choices from it (the smart tool's request carries
        # only the point).
        with page.expect_response(lambda r: "/drafts" in r.url and r.request.method in ("POST", "PATCH"),
                                  timeout=20_000):
            choice_box(page, "horse").click()
        assert ticked(page, LABELS) == ["horse"]

        before = _metric(stack.server, "interactive")
        page.get_by_text("Auto-Annotation", exact=True).click()
        page.locator("button.lsf-tool_smart").first.click()  # "Auto-Detect": its first tool, KeyPoint
        box = page.locator("canvas").first.bounding_box()
        page.mouse.move(box["x"] + 5, box["y"] + 5)  # the tool's tooltip would cover the image
        page.get_by_text("Auto-Detect", exact=True).wait_for(state="hidden")
        with page.expect_response(lambda r: r.url.endswith("/interactive-annotating"), timeout=30_000) as resp:
            page.mouse.click(box["x"] + DOG[0] * box["width"], box["y"] + DOG[1] * box["height"])
        answer = resp.value.json()["data"]
        page.wait_for_function("document.querySelector(\"input.ant-checkbox-input[name='dog']\").checked")
        assert _metric(stack.server, "interactive") == before + 1
        labels = next(r for r in answer["result"] if r["from_name"] == "labels")
        assert labels["meta"]["chosen"] == ["horse"] and labels["meta"]["chosen_from"] == "draft"
        assert labels["value"]["choices"] == ["horse", "dog"]
        assert ticked(page, LABELS) == ["dog", "horse"]  # the page lists in config order
        spot_line = page.get_by_text(re.compile(r"^point \(22%, 70%\) \(ticked\): dog \d+%: here "))
        spot_line.wait_for()
        assert "vs image" in spot_line.inner_text() and "near " in spot_line.inner_text()
        assert page.get_by_text(re.compile(r"^likely missing in the image: ")).count() >= 1
        page.shot("2-pointed-at-the-dog")

        with page.expect_response(lambda r: f"/api/tasks/{task_id}/annotations" in r.url
                                  and r.request.method == "POST", timeout=30_000):
            page.get_by_role("button", name="Submit").click()
        page.shot("3-submitted")
    anns = ls.api("GET", f"/api/tasks/{task_id}/annotations", expect=200)
    assert len(anns) == 1
    assert sorted(_choices(anns[0]["result"])) == ["dog", "horse"]
    stack.state["annotation"] = anns[0]["id"]


def test_the_reviewer_finds_the_task_in_the_likely_missing_tab_in_two_clicks(stack):
    ls = stack.ls
    if "annotation" not in stack.state:
        pytest.skip("needs the annotator's submitted annotation (previous test)")
    # Two more annotated tasks (through the API), to see the queue's order.
    for name, labels in (("kite", ["kite"]), ("dog", ["dog", "person", "bird", "horse", "car", "cat"])):
        ls.api("POST", f"/api/tasks/{stack.tasks[name]}/annotations", expect=201, json={
            "result": [{"from_name": "labels", "to_name": "image", "type": "choices", "value": {"choices": labels}}]})
    reviews = {}
    for name in ("person", "kite", "dog"):
        reviews[name] = wait_for(lambda: _review_preds(ls, stack.tasks[name]), timeout=40,
                                 what=f"the review of {name}")[0]
    for pred in reviews.values():
        assert pred["model_version"] == TITLE  # the project's live model version: no switching
    ours = reviews["person"]
    region = next(r for r in ours["result"] if r["from_name"] == "labels")
    assert region["meta"]["chosen"] == ["horse", "dog"]
    # The annotators' pre-labelling is untouched: the project still pre-labels live.
    assert ls.api("GET", f"/api/projects/{stack.project}", expect=200)["model_version"] == TITLE
    order = sorted(reviews, key=lambda n: -reviews[n]["score"])

    with browser_page(stack.shots) as page:
        log_in(page, ls.url, "admin@example.com", "Passw0rd!semlabel")
        page.goto(f"{ls.url}/projects/{stack.project}/data")
        page.get_by_text(TAB, exact=True).click()  # click 1
        page.wait_for_function(
            "(n) => document.querySelectorAll('.dm-table__row-wrapper, [class*=\"table__row-wrapper\"]').length === n",
            arg=len(reviews))
        page.shot("4-reviewer-tab")
        rows = page.locator(".dm-table__row-wrapper, [class*='table__row-wrapper']")
        shown = [rows.nth(i).inner_text() for i in range(rows.count())]
        ids = [int(re.match(r"\s*(\d+)", text).group(1)) for text in shown]
        assert ids == [stack.tasks[n] for n in order], (shown, {n: r["score"] for n, r in reviews.items()})
        for text, name in zip(shown, order):  # the Prediction score column: P(missing)
            assert f"{reviews[name]['score']:.3f}" in text.split(), text
        rows.nth(order.index("person")).click()  # click 2: the task opens
        page.get_by_text(re.compile(r"^point \(22%, 70%\) \(ticked\): dog")).wait_for()
        page.shot("5-reviewer-opened-the-task")
