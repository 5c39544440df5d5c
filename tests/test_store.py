"""ModelStore and ServedModels on real files, a real Redis and real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from backend.errors import CorruptVersion, ModelStoreError
from backend.store import ModelStore, ServedModels, is_version_id, new_version_id
from tests.helpers.tiny_model import TinyPredictor, load_tiny, save_tiny
from tests.helpers.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent


def _publish(store, project, biases, metric, **kw):
    with store.staging(project) as tmp:
        save_tiny(tmp, biases, {"mAP": metric} if metric is not None else None)
        return store.publish(project, tmp, labels=sorted(biases), data_summary={"tasks": 3}, **kw)


def _wait_served(served, project, version, timeout=5.0):
    wait_for(lambda: served.served_version(project) == version, timeout, step=0.05,
             what=f"{version} to be served for project {project}")


def _wait_refused(store, project, version, timeout=5.0):
    wait_for(lambda: version in store.refusals(project), timeout, step=0.05,
             what=f"{version} to be refused for project {project}")


def test_version_ids_sort_by_time_and_never_collide():
    ids = [new_version_id() for _ in range(2000)]
    assert len(set(ids)) == 2000
    assert all(is_version_id(v) for v in ids)
    assert [v.split("-")[0] for v in ids] == sorted(v.split("-")[0] for v in ids)
    assert new_version_id(1_000_000_000) < new_version_id(2_000_000_000)


def test_publish_is_atomic_and_pointer_file_and_redis_agree(tmp_path, redis_conn):
    store = ModelStore.from_settings(root=tmp_path / "models", redis=redis_conn)
    pubsub = redis_conn.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(store.channel)
    result = _publish(store, 7, {"cat": 1.0, "dog": -1.0}, 0.5)
    assert result.promoted and result.reason.startswith("first version")
    vdir = store.version_dir(7, result.version)
    manifest = json.loads((vdir / "manifest.json").read_text())
    assert set(manifest["files"]) == {"weights.json", "metrics.json"}
    assert manifest["metrics"] == {"mAP": 0.5} and manifest["labels"] == ["cat", "dog"]
    assert manifest["gate"]["promoted"] is True
    # Nothing left in staging; the pointer file and the Redis key name the same version.
    assert list((tmp_path / "models" / "7" / "staging").iterdir()) == []
    assert store.current(7) == store.redis_current(7) == result.version
    assert json.loads((tmp_path / "models" / "7" / "CURRENT").read_text())["version"] == result.version
    message = None
    for _ in range(50):
        message = pubsub.get_message(timeout=0.1)
        if message:
            break
    assert message and json.loads(message["data"]) == {"project": "7", "version": result.version}
    assert [v.version for v in store.versions(7)] == [result.version]
    assert store.verify(7, result.version)["version"] == result.version
    pubsub.close()


def test_publish_without_redis_still_moves_the_pointer(tmp_path):
    store = ModelStore.from_settings(root=tmp_path / "m")
    result = _publish(store, "p1", {"a": 0.0}, None)
    assert store.current("p1") == result.version
    assert store.redis_current("p1") is None


def test_a_killed_writer_leaves_no_visible_version(tmp_path):
    """SIGKILL a real process while it writes a model: no version appears, the pointer is
    unchanged, and the staging leftovers are pruned once stale."""
    root = tmp_path / "models"
    store = ModelStore.from_settings(root=root)
    first = _publish(store, 3, {"a": 1.0}, 0.4)
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from backend.store import ModelStore
        store = ModelStore.from_settings(root={str(root)!r})
        with store.staging(3) as tmp:
            with open(tmp / "weights.bin", "wb") as fh:
                print("writing", flush=True)
                while True:
                    fh.write(os.urandom(1 << 16)); fh.flush(); time.sleep(0.01)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"writing"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [v.version for v in store.versions(3)] == [first.version]
    assert store.current(3) == first.version
    leftovers = list((root / "3" / "staging").iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".partial")
    store.stale_staging_s = 0
    store.prune(3)
    assert list((root / "3" / "staging").iterdir()) == []


def test_metric_gate_keeps_worse_versions_unpromoted_with_a_reason(tmp_path, redis_conn):
    store = ModelStore.from_settings(root=tmp_path / "m", redis=redis_conn, gate_margin=0.02)
    v1 = _publish(store, 1, {"a": 1.0}, 0.80)
    worse = _publish(store, 1, {"a": 2.0}, 0.70)
    assert not worse.promoted
    assert "worse than current" in worse.reason and "0.7000" in worse.reason and "0.8000" in worse.reason
    assert store.current(1) == store.redis_current(1) == v1.version
    within = _publish(store, 1, {"a": 3.0}, 0.79)  # worse, but within the margin
    assert within.promoted and store.current(1) == within.version
    # The gate compares with the current version evaluated on the new held-out split when given.
    base = {"version": within.version, "metrics": {"mAP": 0.95}}
    refused = _publish(store, 1, {"a": 4.0}, 0.90, baseline=base)
    assert not refused.promoted and "0.9500" in refused.reason
    missing = _publish(store, 1, {"a": 5.0}, None)
    assert not missing.promoted and "no held-out mAP" in missing.reason
    forced = _publish(store, 1, {"a": 6.0}, 0.1, promote=True)
    assert forced.promoted and store.current(1) == forced.version
    infos = {v.version: v for v in store.versions(1)}
    assert infos[worse.version].gate["promoted"] is False
    assert infos[worse.version].gate["reason"] == worse.reason
    assert [h["action"] for h in store.history(1)].count("publish") == 6


def test_the_latest_unserved_training_is_known_until_something_is_served(tmp_path, redis_conn):
    store = ModelStore.from_settings(root=tmp_path / "m", redis=redis_conn, gate_margin=0.02)
    assert store.unserved(1) is None and store.history_stamp(1) is None
    v1 = _publish(store, 1, {"a": 1.0}, 0.80)
    assert store.unserved(1) is None
    stamp = store.history_stamp(1)
    worse = _publish(store, 1, {"a": 2.0}, 0.50)
    assert store.history_stamp(1) != stamp
    note = store.unserved(1)
    assert (note["version"], note["kind"], note["reason"]) == (worse.version, "gate", worse.reason)
    assert (note["gate"]["value"], note["gate"]["baseline_value"], note["gate"]["baseline_version"]) == (
        0.5, 0.8, v1.version)
    assert note["data_summary"] == {"tasks": 3}
    store.promote(1, worse.version)
    assert store.unserved(1) is None  # what was refused is served now
    store.record_refusal(1, worse.version, "ModelLoadError: truncated weights")
    note = store.unserved(1)
    assert (note["version"], note["kind"], note["reason"]) == (worse.version, "load", "ModelLoadError: truncated weights")
    store.rollback(1)
    assert store.unserved(1) is None


def test_promote_and_rollback(tmp_path, redis_conn):
    store = ModelStore.from_settings(root=tmp_path / "m", redis=redis_conn)
    v1 = _publish(store, 5, {"a": 1.0}, 0.5)
    v2 = _publish(store, 5, {"a": 1.0}, 0.6)
    v3 = _publish(store, 5, {"a": 1.0}, 0.3)  # not promoted
    assert not v3.promoted and store.current(5) == v2.version
    store.promote(5, v3.version)
    assert store.current(5) == store.redis_current(5) == v3.version
    assert store.find(v3.version) == "5"
    assert store.rollback(5) == v2.version
    assert store.current(5) == store.redis_current(5) == v2.version
    assert store.rollback(5) == v1.version
    with pytest.raises(ModelStoreError, match="no earlier version"):
        store.rollback(5)
    assert store.current(5) == v1.version
    with pytest.raises(ModelStoreError):
        store.promote(5, "v20990101T000000000000Z-abcdef")


def test_rollback_skips_a_corrupted_version(tmp_path):
    store = ModelStore.from_settings(root=tmp_path / "m")
    v1 = _publish(store, 2, {"a": 1.0}, 0.5)
    v2 = _publish(store, 2, {"a": 1.0}, 0.6)
    v3 = _publish(store, 2, {"a": 1.0}, 0.7)
    (store.version_dir(2, v2.version) / "weights.json").write_text("{}")
    assert store.rollback(2) == v1.version
    assert any("does not match" in s or "bytes" in s for s in store.history(2)[-1]["skipped"])
    assert v3.version in [v.version for v in store.versions(2)]


def test_corrupted_version_is_detected(tmp_path):
    store = ModelStore.from_settings(root=tmp_path / "m")
    v = _publish(store, 4, {"a": 1.0}, 0.5)
    weights = store.version_dir(4, v.version) / "weights.json"
    weights.write_text(weights.read_text()[:-1] + "9")  # same size, different bytes
    with pytest.raises(CorruptVersion, match="checksum"):
        store.verify(4, v.version)
    weights.unlink()
    with pytest.raises(CorruptVersion, match="missing"):
        store.verify(4, v.version)
    (store.version_dir(4, v.version) / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptVersion, match="not valid JSON"):
        store.verify(4, v.version)


def test_prune_keeps_current_and_rollback_targets(tmp_path):
    store = ModelStore.from_settings(root=tmp_path / "m", keep_versions=3)
    results = [_publish(store, 9, {"a": 1.0}, 0.5 + i * 0.01) for i in range(6)]
    kept = [v.version for v in store.versions(9)]
    assert len(kept) == 3 and results[-1].version in kept and results[-2].version in kept


# ------------------------------------------------------------------------------ serving
def test_served_models_fall_back_to_zero_shot_then_hot_swap_via_pubsub(tmp_path, redis_conn):
    store = ModelStore.from_settings(root=tmp_path / "m", redis=redis_conn)
    zero = TinyPredictor({}, version="zero-shot@test")
    # A long poll interval: only the Redis notification can make the swap quick.
    served = ServedModels.from_settings(store, None, load_tiny, redis_conn, poll_interval_s=60, fallback=zero)
    try:
        assert served.get(11) is zero and served.served_version(11) is None
        time.sleep(0.3)  # let the subscriber connect
        v1 = _publish(store, 11, {"cat": 2.0}, 0.5)
        _wait_served(served, 11, v1.version)
        old = served.get(11)
        assert old.version == v1.version
        v2 = _publish(store, 11, {"cat": -2.0}, 0.6)
        _wait_served(served, 11, v2.version)
        new = served.get(11)
        assert new is not old and new.version == v2.version
        assert old.biases == {"cat": 2.0}  # an in-flight request keeps a working object
    finally:
        served.close()


def _subscribed(redis_conn, channel, timeout=5.0):
    return wait_for(lambda: dict(redis_conn.pubsub_numsub(channel)).get(channel.encode(), 0) > 0, timeout,
                    step=0.05, what=f"a subscriber on {channel}")


def test_a_notification_refreshes_only_the_project_it_names(tmp_path, redis_conn):
    """Pointers moved without an announcement (a store without Redis): a message naming one
    project loads that project only; a message naming none, and a reconnection to Redis,
    check every watched project."""
    prefix = f"test-{os.getpid()}-{time.monotonic_ns()}"  # a channel of its own on a shared Redis
    quiet = ModelStore.from_settings(root=tmp_path / "m", key_prefix=prefix)  # moves pointers without announcing them
    channel = quiet.channel
    a1, b1 = _publish(quiet, 31, {"cat": 1.0}, 0.5), _publish(quiet, 32, {"cat": 1.0}, 0.5)
    served = ServedModels.from_settings(quiet, None, load_tiny, redis_conn, poll_interval_s=60,
                          fallback=TinyPredictor({}, "zero"))
    try:
        assert (served.get(31).version, served.get(32).version) == (a1.version, b1.version)
        assert _subscribed(redis_conn, channel)
        a2, b2 = _publish(quiet, 31, {"cat": 2.0}, 0.6), _publish(quiet, 32, {"cat": 2.0}, 0.6)
        redis_conn.publish(channel, json.dumps({"project": "31", "version": a2.version}))
        _wait_served(served, 31, a2.version)
        redis_conn.publish(channel, json.dumps({"project": "33", "version": a2.version}))  # not watched
        time.sleep(0.5)
        assert served.served_version(32) == b1.version and "33" not in served._known()
        assert served.loads == 3
        redis_conn.publish(channel, json.dumps({}))  # names no project: check them all
        _wait_served(served, 32, b2.version)
        # A dropped connection: the listener hears of the reconnection and checks them all.
        a3, b3 = _publish(quiet, 31, {"cat": 3.0}, 0.7), _publish(quiet, 32, {"cat": 3.0}, 0.7)
        host, port = served._pubsub.connection._sock.getsockname()[:2]
        assert redis_conn.client_kill_filter(_type="pubsub", addr=f"{host}:{port}") == 1
        both = (a3.version, b3.version)
        wait_for(lambda: (served.served_version(31), served.served_version(32)) == both, 10, step=0.05,
                 what=f"{both} to be served for projects 31 and 32")
    finally:
        served.close()


def test_served_models_poll_without_redis(tmp_path):
    store = ModelStore.from_settings(root=tmp_path / "m")
    v1 = _publish(store, 12, {"cat": 1.0}, 0.5)
    served = ServedModels.from_settings(store, None, load_tiny, None, poll_interval_s=0.1,
                          fallback=TinyPredictor({}, "zero"))
    try:
        assert served.get(12).version == v1.version
        v2 = _publish(store, 12, {"cat": 3.0}, 0.7)
        _wait_served(served, 12, v2.version)
        assert served.loads == 2
    finally:
        served.close()


def test_the_watched_projects_are_bounded_and_expire(tmp_path):
    """Any project id a request names was watched (its pointer file polled every 2 s) for ever:
    5 000 made-up ids meant 5 000 stats every poll. Now at most `max_projects`, least recently
    requested forgotten first, and idle ones forgotten after `idle_s`; a forgotten project
    still serves its current version on its next request."""
    store = ModelStore.from_settings(root=tmp_path / "m")
    v1 = _publish(store, 1, {"cat": 1.0}, 0.5)
    zero = TinyPredictor({}, "zero")
    served = ServedModels.from_settings(store, None, load_tiny, None, poll_interval_s=0.05, fallback=zero,
                          max_projects=10, idle_s=3600)
    try:
        assert served.get(1).version == v1.version
        for pid in range(1000, 6000):
            assert served.get(pid) is zero
        assert len(served._known()) == 10 and "1" not in served._known()
        assert served.get(1).version == v1.version  # loaded again on its next request
        assert len(served._known()) == 10 and "1" in served._known()
        served.idle_s = 0.01
        wait_for(lambda: served._known() == [], 5, step=0.05, what="the poller to forget idle projects")
        assert served.get(1).version == v1.version
    finally:
        served.close()


def test_a_version_that_fails_to_load_is_refused_and_the_previous_keeps_serving(tmp_path, redis_conn):
    store = ModelStore.from_settings(root=tmp_path / "m", redis=redis_conn)
    v1 = _publish(store, 13, {"cat": 1.0}, 0.5)
    served = ServedModels.from_settings(store, None, load_tiny, redis_conn, poll_interval_s=0.1,
                          fallback=TinyPredictor({}, "zero"))
    try:
        assert served.get(13).version == v1.version
        # A version whose files pass the checksum but whose loader fails...
        bad = _publish(store, 13, ["not", "a", "mapping"], 0.6)  # type: ignore[arg-type]
        assert bad.promoted
        _wait_refused(store, 13, bad.version)
        assert "not a mapping" in store.refusals(13)[bad.version]["reason"]
        assert served.get(13).version == v1.version
        # ...and a corrupted directory promoted by hand: both refused, v1 stays.
        good = _publish(store, 13, {"cat": 5.0}, 0.7)
        _wait_served(served, 13, good.version)
        corrupt = _publish(store, 13, {"cat": 6.0}, None, promote=False)
        (store.version_dir(13, corrupt.version) / "weights.json").write_text('{"cat": 7.0}')
        with pytest.raises(CorruptVersion):
            store.promote(13, corrupt.version)  # the CLI path refuses it up front
        # Force the pointer onto it as a buggy writer might: the backend still refuses it.
        store._set_current("13", corrupt.version, "test: forced")
        _wait_refused(store, 13, corrupt.version)
        assert "checksum" in store.refusals(13)[corrupt.version]["reason"]
        assert served.get(13).version == good.version
        assert served.refused == 2
    finally:
        served.close()


def test_a_fresh_backend_skips_a_broken_current_version(tmp_path):
    store = ModelStore.from_settings(root=tmp_path / "m")
    v1 = _publish(store, 14, {"cat": 1.0}, 0.5)
    v2 = _publish(store, 14, {"cat": 2.0}, 0.6)
    (store.version_dir(14, v2.version) / "weights.json").unlink()
    served = ServedModels.from_settings(store, None, load_tiny, None, poll_interval_s=5, fallback=TinyPredictor({}, "zero"))
    try:
        assert served.get(14).version == v1.version
        assert v2.version in store.refusals(14)
    finally:
        served.close()


def test_requests_never_wait_for_a_reload(tmp_path):
    """A slow loader runs in the background while get() keeps answering with the old model."""
    store = ModelStore.from_settings(root=tmp_path / "m")
    _publish(store, 15, {"cat": 1.0}, 0.5)
    gate, entered = threading.Event(), threading.Event()

    def slow_loader(path, runtime):
        if served.loads >= 1:
            entered.set()
            gate.wait(10)
        return load_tiny(path)

    zero = TinyPredictor({}, "z")
    served = ServedModels.from_settings(store, None, slow_loader, None, poll_interval_s=0.05, fallback=zero)
    try:
        first = served.get(15)
        assert served.get(16) is zero  # a project without versions
        v2 = _publish(store, 15, {"cat": 2.0}, 0.6)
        assert entered.wait(10)  # the poller is now blocked inside slow_loader
        for _ in range(100):  # a get() that waited for the load would see v2, not first
            assert served.get(15) is first
            assert served.get(16) is zero
        gate.set()
        _wait_served(served, 15, v2.version)
    finally:
        gate.set()
        served.close()


def test_a_first_version_must_not_be_worse_than_zero_shot_when_it_was_measured(tmp_path):
    store = ModelStore.from_settings(root=tmp_path / "m", gate_margin=0.02)
    zs = {"version": "zero-shot@packaged", "metrics": {"mAP": 0.9}}
    worse = _publish(store, 21, {"a": 1.0}, 0.8, baseline=zs)
    assert not worse.promoted and "zero-shot@packaged" in worse.reason and store.current(21) is None
    ok = _publish(store, 21, {"a": 1.0}, 0.89, baseline=zs)
    assert ok.promoted and ok.gate.baseline_version == "zero-shot@packaged"
    assert store.current(21) == ok.version


def test_the_store_hashes_a_real_checkpoint_once_when_it_serves_it(tmp_path, runtime, settings, monkeypatch):
    """The manifest's digest of the weights is the one compared with model.json's: the
    checkpoint does not hash them a second time, and a disagreement is still refused."""
    import types

    import backend.model.checkpoint as checkpoint
    from backend.model import SigRLPredictor, TrainedModel, save_model
    from backend.model.cooccurrence import CooccurrenceStats
    from backend.model.sigrl import SigRL

    bb = runtime.backbone
    module = SigRL(bb.dim, settings.model, bb.zero_shot_scale, bb.zero_shot_bias, bb.native_dim)
    model = TrainedModel(module, ["cat", "dog"], CooccurrenceStats.from_label_sets([["cat"], ["dog"]]),
                         bb.describe())
    store = ModelStore.from_settings(root=tmp_path / "m")
    with store.staging(41) as tmp:
        save_model(model, tmp, metrics={"mAP": 0.5})
        first = store.publish(41, tmp)
    with store.staging(41) as tmp:
        save_model(model, tmp, metrics={"mAP": 0.6})
        meta = json.loads((tmp / "model.json").read_text())
        meta["weights_sha256"] = "0" * 64  # model.json and the weights disagree; the manifest is fresh
        (tmp / "model.json").write_text(json.dumps(meta))
        second = store.publish(41, tmp, promote=False)
    hashed = []
    monkeypatch.setattr(checkpoint, "hashlib", types.SimpleNamespace(
        sha256=lambda data=b"": hashed.append(len(data)) or __import__("hashlib").sha256(data)))
    served = ServedModels.from_settings(store, runtime, redis=None, poll_interval_s=0.05, fallback=TinyPredictor({}, "zero"))
    try:
        predictor = served.get(41)
        assert isinstance(predictor, SigRLPredictor) and first.version in predictor.version
        store.promote(41, second.version)
        _wait_refused(store, 41, second.version)
        assert "checksum mismatch" in store.refusals(41)[second.version]["reason"]
        assert served.get(41) is predictor and hashed == []
    finally:
        served.close()
