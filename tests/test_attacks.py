"""What an attacker on the network tried against the backend (issue 13), each probe a case.

Loopback only and bounded: every "attacker" and every "Label Studio" is a stand-in HTTP server
on 127.0.0.1 that records what reached it; bodies are a few MB at most. The app runs through
Flask's test client, and through a real ``semlabel serve`` (gunicorn) where the HTTP framing
matters (chunked bodies, a declared length never sent). Each case names the finding it pins.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis as redis_lib

from tests.helpers.label_configs import multilabel_config
from tests.helpers.photos import copy_photos
from tests.helpers.processes import REPO, run_cli
from tests.helpers.redis_server import reset_db
from tests.test_app import CONFIG, app_settings, choices_of, make_app, predict, task


# ------------------------------------------------------------------------- stand-in servers
class StandIn:
    """A loopback HTTP server: ``routes[path] = fn(handler)``; every request is recorded as
    (method, path, Authorization header). Unknown paths: 404."""

    def __init__(self):
        self.requests: list[tuple[str, str, str]] = []
        self.routes: dict[str, object] = {}
        self.sent_bytes = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append(("GET", self.path, self.headers.get("Authorization", "")))
                fn = outer.routes.get(self.path.split("?")[0])
                if fn is None:
                    return self.reply(404, b"")
                fn(self)

            def reply(self, code, body=b"", headers=()):
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def seen_by(self, prefix: str = "") -> list:
        return [r for r in self.requests if r[1].startswith(prefix)]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def serve_file(data: bytes):
    return lambda h: h.reply(200, data, [("Content-Type", "image/jpeg")])


def redirect_to(location: str):
    return lambda h: h.reply(302, b"", [("Location", location)])


def stream_forever(owner: StandIn, total: int):
    """A chunked body of ``total`` bytes with no Content-Length; counts what it managed to send."""
    def fn(h):
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        block = b"\xff" * 65536
        try:
            for _ in range(total // len(block)):
                h.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                owner.sent_bytes += len(block)
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
    return fn


def drip(owner: StandIn, n: int, every_s: float):
    """``n`` bytes, one every ``every_s`` seconds (each read stays under any per-read timeout)."""
    def fn(h):
        h.send_response(200)
        h.send_header("Content-Length", str(n))
        h.end_headers()
        try:
            for _ in range(n):
                h.wfile.write(b"x")
                h.wfile.flush()
                owner.sent_bytes += 1
                time.sleep(every_s)
        except OSError:
            pass
    return fn


def stall(seconds: float, data: bytes):
    def fn(h):
        time.sleep(seconds)
        try:
            h.reply(200, data)
        except OSError:
            pass
    return fn


@pytest.fixture
def attacker():
    s = StandIn()
    yield s
    s.close()


@pytest.fixture
def label_studio():
    s = StandIn()
    yield s
    s.close()


# ------------------------------------------------------------------------------ the apps
@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return copy_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def jpeg(photos) -> bytes:
    return (photos / "dog.jpg").read_bytes()


def attack_settings(settings, photos, *, allowed=(), images=None, limits=None, auth=None, **top):
    """The test app's settings with no Label Studio allowed unless said (``allowed``)."""
    s = app_settings(settings, photos)
    a = s.auth.model_copy(update={"allowed_label_studio_urls": list(allowed), **(auth or {})})
    im = s.images.model_copy(update=images or {})
    lim = s.limits.model_copy(update=limits or {})
    return s.model_copy(update={"auth": a, "images": im, "limits": lim, "label_studio_url": None,
                                "label_studio_api_key": None, **top})


@pytest.fixture
def build(runtime, redis_url, tmp_path):
    """``build(settings)`` → a Flask test client over a fresh app (closed afterwards)."""
    apps = []

    def make(s, **kw):
        app = make_app(s, runtime, redis_lib.Redis.from_url(redis_url), tmp_path / f"store{len(apps)}", **kw)
        apps.append(app)
        c = app.test_client()
        c.app = app
        return c

    yield make
    for app in apps:
        app.extensions["semlabel"].close()
    reset_db(redis_lib.Redis.from_url(redis_url))


def setup(client, hostname, token="tok-attacker-0123456789", project="7.1"):
    return client.post("/setup", json={"project": project, "schema": CONFIG, "hostname": hostname,
                                       "access_token": token})


def one(client, image, project="7.1", status=(200, 422)):
    resp = client.post("/predict", json={"tasks": [{"id": 5, "data": {"image": image}}], "project": project,
                                         "label_config": CONFIG})
    assert resp.status_code in status, resp.get_data(as_text=True)[:500]
    return resp.json["results"][0]


# ===================================================== Finding 1: SSRF with the token attached
def test_f1_a_setup_from_the_network_never_chooses_where_the_token_goes(build, settings, photos, attacker):
    c = build(attack_settings(settings, photos))
    assert setup(c, attacker.url).status_code == 200  # Label Studio still gets its model version
    for image in ("/data/upload/7/x.jpg", "/data/local-files/?d=../../etc/passwd", f"{attacker.url}/anything"):
        entry = one(c, image)
        assert "result" not in entry
    assert attacker.requests == []  # nothing was fetched from the caller's host, with or without a token


def test_f1_the_operators_key_never_goes_to_a_setup_address(build, settings, photos, attacker):
    c = build(attack_settings(settings, photos, label_studio_api_key="real-operator-key"))
    setup(c, attacker.url, token=None)
    assert "no Label Studio host" in one(c, "/data/upload/7/x.jpg")["error"]
    assert attacker.requests == []


def test_f1_with_label_studio_url_set_only_that_address_gets_the_token(build, settings, photos, attacker,
                                                                       label_studio, jpeg):
    label_studio.routes["/storage-data/uploaded/"] = serve_file(jpeg)
    s = attack_settings(settings, photos, label_studio_url=label_studio.url, label_studio_api_key="real-key")
    c = build(s)
    setup(c, attacker.url)
    entry = one(c, "/data/upload/7/dog.jpg")
    assert next(iter(choices_of(entry)["meta"]["scores"])) == "dog"  # scored: most likely first
    assert label_studio.requests and all(auth == "Token real-key" for _, _, auth in label_studio.requests)
    assert attacker.requests == []


def test_f1_local_files_paths_with_dotdot_and_non_media_paths_are_refused(build, settings, photos,
                                                                          label_studio):
    s = attack_settings(settings, photos, label_studio_url=label_studio.url, label_studio_api_key="k")
    c = build(s)
    for image in ("/data/local-files/?d=../../../etc/passwd", "/data/local-files/?d=photos/%2e%2e/%2e%2e/x",
                  "/data/upload/../../api/users", f"{label_studio.url}/api/projects"):
        entry = one(c, image)
        assert "URL not allowed" in entry["error"], entry
    assert label_studio.requests == []


def test_f1_a_redirect_from_label_studio_never_takes_the_token_elsewhere(build, settings, photos, attacker,
                                                                         label_studio, jpeg):
    attacker.routes["/steal"] = serve_file(jpeg)
    label_studio.routes["/storage-data/uploaded/"] = redirect_to(f"{attacker.url}/steal")
    label_studio.routes["/data/upload/7/dog.jpg"] = redirect_to(f"{attacker.url}/steal")
    c = build(attack_settings(settings, photos, label_studio_url=label_studio.url, label_studio_api_key="k"))
    entry = one(c, "/data/upload/7/dog.jpg")
    assert "redirect to 127.0.0.1" in entry["error"] and "allowed_hosts" in entry["error"]
    assert attacker.requests == []  # same host name, other port: requests would have kept the header


def test_f1_setting_the_webhook_header_never_follows_a_redirect(attacker, label_studio):
    from backend.ls.connection import LabelStudioConnection
    from backend.ls.webhooks import WebhookAuth
    from backend.settings import get_settings

    # label-studio-sdk asks for /api/webhooks/ (its canonical path).
    attacker.routes["/api/webhooks/"] = lambda h: h.reply(200, b"[]", [("Content-Type", "application/json")])
    label_studio.routes["/api/webhooks/"] = redirect_to(f"{attacker.url}/api/webhooks/")
    with pytest.raises(RuntimeError, match="302"):
        WebhookAuth("Basic eDp5", get_settings().backend.label_studio_api).patch("7", LabelStudioConnection(label_studio.url, "ls-key"), "127.0.0.1:9090")
    assert label_studio.requests[0][2] == "Token ls-key" and attacker.requests == []


# =============================================== Finding 4: redirects, deadline, streaming cap
def test_f4_an_allowed_host_redirecting_to_a_forbidden_one_is_refused(build, settings, photos, attacker, jpeg):
    inner = StandIn()  # the "internal" service behind the redirect
    try:
        inner.routes["/admin.jpg"] = serve_file(jpeg)
        attacker.routes["/pic.jpg"] = redirect_to(f"{inner.url}/admin.jpg".replace("127.0.0.1", "127.0.0.2"))
        port = attacker.url.rsplit(":", 1)[1]
        c = build(attack_settings(settings, photos, images={"allowed_hosts": ["localhost"]}))
        entry = one(c, f"http://localhost:{port}/pic.jpg")
        assert "redirect to 127.0.0.2" in entry["error"]
        assert len(attacker.requests) == 1 and inner.requests == []
    finally:
        inner.close()


def test_f4_label_studio_downloads_have_a_total_deadline(build, settings, photos, label_studio, jpeg):
    label_studio.routes["/storage-data/uploaded/"] = stall(4.0, jpeg)
    s = attack_settings(settings, photos, label_studio_url=label_studio.url, label_studio_api_key="k",
                        images={"download_deadline_s": 1.0})
    entry = one(build(s), "/data/upload/7/dog.jpg")
    assert "could not be downloaded" in entry["error"] and "timed out" in entry["error"], entry


def test_f4_a_slow_drip_stops_at_the_deadline(build, settings, photos, attacker):
    attacker.routes["/drip.jpg"] = drip(attacker, 40, 0.1)
    s = attack_settings(settings, photos, images={"allowed_hosts": ["127.0.0.1"], "download_deadline_s": 1.0})
    entry = one(build(s), f"{attacker.url}/drip.jpg")
    assert "download_deadline_s" in entry["error"], entry
    assert attacker.sent_bytes < 40


def test_f4_the_byte_cap_applies_while_streaming_on_the_label_studio_path(build, settings, photos, label_studio):
    label_studio.routes["/storage-data/uploaded/"] = stream_forever(label_studio, 32 * 2**20)
    s = attack_settings(settings, photos, label_studio_url=label_studio.url, label_studio_api_key="k",
                        images={"max_bytes": 2**20})
    entry = one(build(s), "/data/upload/7/big.jpg")
    assert "image too large" in entry["error"]
    time.sleep(0.5)  # let the stand-in notice the closed connection
    assert label_studio.sent_bytes < 16 * 2**20  # stopped reading long before the 32 MiB end


# ========================================== Finding 2 + 9: authentication, forged webhooks
def test_f2_forged_webhooks_are_refused_and_counted_with_a_url_secret(build, settings, photos, redis_url):
    secret = "s-" + uuid.uuid4().hex
    c = build(attack_settings(settings, photos, auth={"url_secret": secret}))
    r = redis_lib.Redis.from_url(redis_url)
    forged = {"action": "ANNOTATION_CREATED", "project": {"id": 7},
              "annotation": {"id": 1, "task": 3, "result": []}, "task": {"id": 3, "data": {"image": "x"}}}
    keys = set(r.keys("*"))
    resp = c.post("/webhook", json=forged)
    assert resp.status_code == 401
    assert set(r.keys("*")) == keys  # nothing stored
    assert c.get("/metrics").status_code == 401
    metrics = c.get(f"/{secret}/metrics").get_data(as_text=True)
    assert 'semlabel_webhook_events_total{action="?",outcome="unauthorized"}' in metrics
    assert c.post(f"/{secret}/webhook", json={"action": "START_TRAINING", "project": {"id": 7}}).status_code == 201
    assert c.post(f"/{secret[:-1]}/webhook", json={"action": "START_TRAINING", "project": {"id": 7}}).status_code == 401
    assert c.get("/health").status_code == 200  # Label Studio's health check needs no secret


def test_f9_refused_requests_log_rate_limited(build, settings, photos, caplog):
    from backend.ls import guard

    c = build(attack_settings(settings, photos, basic_auth_user="u", basic_auth_pass="p"))
    guard.refused._last.clear()  # other tests' refusals within the interval
    with caplog.at_level(logging.WARNING, logger="backend.ls.guard"):
        for _ in range(50):
            assert c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}}).status_code == 401
            assert c.post("/predict", json={}).status_code == 401
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert 1 <= len(refused) <= 4, [r.getMessage() for r in refused]


def test_f9_half_set_credentials_are_an_error(settings, photos, runtime, redis_url, tmp_path):
    from backend.errors import ConfigError

    for top in ({"basic_auth_user": "u"}, {"basic_auth_pass": "p"}):
        with pytest.raises(ConfigError, match="set both"):
            make_app(attack_settings(settings, photos, **top), runtime, redis_lib.Redis.from_url(redis_url), tmp_path)


def test_f9_auth_off_is_logged_at_start(build, settings, photos, caplog):
    with caplog.at_level(logging.WARNING, logger="backend.ls.app"):
        build(attack_settings(settings, photos))
    assert any("authentication is OFF" in r.getMessage() for r in caplog.records)


def _serve(args, env_extra, timeout=60):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BASIC_AUTH_", "SEMLABEL_AUTH__"))}
    env.update(env_extra)
    return run_cli("serve", *args, env=env, timeout=timeout)


def test_f9_serve_on_all_interfaces_without_credentials_refuses_to_start():
    proc = _serve(["--host", "0.0.0.0", "--port", "1"], {})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "refusing to serve on 0.0.0.0 without credentials" in proc.stderr and "--insecure" in proc.stderr
    proc = _serve(["--host", "127.0.0.1", "--port", "1"], {"BASIC_AUTH_USER": "only-the-user"})
    assert proc.returncode == 2 and "BASIC_AUTH_PASS is not" in proc.stderr


def test_f2_compose_requires_basic_auth_credentials():
    from tests.test_docker_compose import _config, compose_bin

    if compose_bin is None:
        pytest.skip("docker-compose not installed")
    for name in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        env = {"REDIS_PASSWORD": "s3cret", "LABEL_STUDIO_API_KEY": "tok", "BASIC_AUTH_USER": "u",
               "BASIC_AUTH_PASS": "p"}
        env[name] = ""  # compose's ${VAR:?} refuses an empty value as it refuses an unset one
        proc = _config("compose.yaml", env)
        assert proc.returncode != 0 and name in proc.stderr, (proc.returncode, proc.stderr[-500:])


# ============================================= Finding 3 + 10: bodies and JSON before routes
def test_f3_a_body_over_the_limit_is_refused_before_parsing(build, settings, photos):
    c = build(attack_settings(settings, photos, limits={"max_request_mb": 1}))
    big = json.dumps({"tasks": [{"id": 1, "data": {"image": "x" * (2 * 2**20)}}], "label_config": CONFIG})
    resp = c.post("/predict", data=big, content_type="application/json")
    assert resp.status_code == 413 and "limits.max_request_mb" in resp.json["error"]
    # a chunked body (no Content-Length) over the limit, through the WSGI input stream
    resp = c.post("/predict", input_stream=io.BytesIO(big.encode()), content_type="application/json",
                  headers={"Transfer-Encoding": "chunked"}, environ_base={"wsgi.input_terminated": True})
    assert resp.status_code == 413
    small = {"tasks": [task(1, "dog", photos)], "label_config": CONFIG}
    resp = c.post("/predict", input_stream=io.BytesIO(json.dumps(small).encode()),
                  content_type="application/json", headers={"Transfer-Encoding": "chunked"},
                  environ_base={"wsgi.input_terminated": True})
    assert resp.status_code == 200 and next(iter(choices_of(resp.json["results"][0])["meta"]["scores"])) == "dog"


@pytest.mark.parametrize("route", ["/predict", "/setup", "/webhook", "/train", "/versions"])
def test_f10_deeply_nested_json_is_a_400_not_a_500(build, settings, photos, route):
    c = build(attack_settings(settings, photos))
    for body in ("[" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000):
        resp = c.post(route, data=body, content_type="application/json")
        assert resp.status_code == 400, (route, resp.status_code)
        assert "nested deeper than" in resp.json["error"]
        assert "Recursion" not in resp.get_data(as_text=True)
    # brackets inside strings are not nesting
    ok = c.post("/versions", json={"x": "[" * 1000})
    assert ok.status_code == 200


def test_f3_many_tasks_in_one_request_are_refused(build, settings, photos):
    c = build(attack_settings(settings, photos, limits={"max_tasks": 5}))
    resp = c.post("/predict", json={"tasks": [{"id": i, "data": {"image": "x"}} for i in range(6)],
                                    "label_config": CONFIG})
    assert resp.status_code == 413 and "limits.max_tasks" in resp.json["error"]


# ======================================================================== real gunicorn
@pytest.fixture(scope="module")
def served(session_data_dir, tmp_path_factory):
    from backend.ls.server import ServerProcess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("BASIC_AUTH_", "SEMLABEL_AUTH__",
                                                                    "LABEL_STUDIO_"))}
    env.update({"SEMLABEL_DATA_DIR": str(session_data_dir), "HF_HUB_OFFLINE": "1",
                "SEMLABEL_BACKBONE__KIND": "packaged", "SEMLABEL_LIMITS__MAX_REQUEST_MB": "1",
                "SEMLABEL_BACKEND__REVIEW__ENABLED": "false", "REDIS_URL": "redis://127.0.0.1:1/0",
                # Its own spool: what it keeps for the dead Redis must not replay into the
                # session's live one.
                "SEMLABEL_REDIS__SPOOL__DIR": str(tmp_path_factory.mktemp("dead-redis-spool"))})
    server = ServerProcess(env={})
    server.env = env
    server.start()
    yield server
    server.stop()


def _raw_http(url: str, head: bytes, body_chunks=(), timeout=20.0) -> bytes:
    """Send a request as raw bytes while reading the answer in another thread (a server that
    answers before the body is in, then closes, is what is being tested)."""
    host, port = url.split("//")[1].split(":")
    out = bytearray()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        def read():
            try:
                while b"\r\n\r\n" not in out:
                    data = sock.recv(65536)
                    if not data:
                        break
                    out.extend(data)
            except OSError:
                pass

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        sock.sendall(head)
        for chunk in body_chunks:
            if out:
                break
            try:
                sock.sendall(chunk)
            except OSError:  # the server answered and closed: stop sending
                break
        reader.join(timeout)
    return bytes(out)


def test_f3_real_server_refuses_a_chunked_body_over_the_limit(served):
    block = b"[" + b"1," * 32767 + b"1]"  # ~64 KiB of valid JSON
    chunks = [b"%x\r\n%s\r\n" % (len(block), block)] * 48 + [b"0\r\n\r\n"]  # 3 MiB > 1 MiB
    head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n").encode()
    answer = _raw_http(served.url, head, chunks)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_f3_real_server_refuses_a_declared_length_without_reading_it(served):
    # 100 MB announced, 64 KiB sent: the answer comes without waiting for the rest.
    head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {100 * 2**20}\r\n\r\n").encode()
    answer = _raw_http(served.url, head, [b"{" * 65536], timeout=20)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_f10_a_dead_redis_is_not_named_in_the_answer(settings, photos, runtime, tmp_path):
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    dead = redis_lib.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    own_spool = attack_settings(settings, photos)
    own_spool = own_spool.model_copy(update={"redis": own_spool.redis.model_copy(update={
        "spool": own_spool.redis.spool.model_copy(update={"dir": str(tmp_path / "spool")})})})
    app = make_app(own_spool, runtime, dead, tmp_path)
    try:
        c = app.test_client()
        # A webhook waits in the disk spool (202); a direct /train cannot be queued (503).
        webhook = c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
        train = c.post("/train", json={"project": 7})
        assert webhook.status_code == 202 and webhook.json.get("spooled")
        assert train.status_code == 503 and "Redis does not answer" in train.json["error"]
        for resp in (webhook, train):
            assert "127.0.0.1" not in resp.get_data(as_text=True) and "111" not in resp.get_data(as_text=True)
    finally:
        app.extensions["semlabel"].close()


def test_f10_real_server_hides_redis_addresses_and_tracebacks(served):
    import requests

    resp = requests.post(served.url + "/webhook", json={"action": "START_TRAINING", "project": {"id": 7}}, timeout=30)
    assert resp.status_code == 202  # spooled on disk until Redis answers
    assert "127.0.0.1" not in resp.text and ":1" not in resp.text and "Traceback" not in resp.text
    resp = requests.post(served.url + "/predict", data="[" * 100_000, timeout=30,
                         headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and "Traceback" not in resp.text


# ================================================================== Finding 5: label configs
def test_f5_label_count_and_length_limits(build, settings, photos):
    c = build(attack_settings(settings, photos, limits={"max_labels": 20, "max_label_chars": 30}))
    many = multilabel_config([f"label {i}" for i in range(21)])
    resp = c.post("/predict", json={"tasks": [task(1, "dog", photos)], "label_config": many})
    assert resp.status_code == 400 and "limits.max_labels=20" in resp.json["error"]
    long = multilabel_config(["dog", "x" * 31])
    resp = c.post("/setup", json={"project": "7.1", "schema": long})
    assert resp.status_code == 400 and "limits.max_label_chars=30" in resp.json["error"]
    entity = '<!DOCTYPE v [<!ENTITY a "aaaa">]>' + CONFIG
    assert c.post("/setup", json={"project": "7.1", "schema": entity}).status_code == 400
    assert predict(c, [task(1, "dog", photos)], cfg=multilabel_config(["dog", "cat"]))["results"][0]["result"]


def test_f5_the_text_embedding_cache_is_bounded_lru(tmp_path):
    import torch

    from backend.labels import TextEmbeddingCache

    path = tmp_path / "t.sqlite"
    cache = TextEmbeddingCache(path, max_rows=100, wait_s=30.0)
    encode = lambda texts: torch.ones(len(texts), 8)  # noqa: E731 - the bound, not the encoder, is tested
    cache.get_or_compute("enc", ["keep me"], encode)
    for start in range(0, 300, 50):
        time.sleep(0.01)
        cache.get_or_compute("enc", ["keep me"], encode)  # used again: most recent
        cache.get_or_compute("enc", [f"text {i}" for i in range(start, start + 50)], encode)
    assert cache.rows() == 100
    misses = cache.misses
    cache.get_or_compute("enc", ["keep me", "text 299"], encode)
    assert cache.misses == misses  # the recently used rows stayed
    cache.get_or_compute("enc", ["text 0"], encode)
    assert cache.misses == misses + 1  # the oldest were removed
    wal = Path(str(path) + "-wal")
    assert not wal.exists() or wal.stat().st_size < 2**20
    # An older semlabel sharing the file still writes its four columns (no schema change) ...
    import sqlite3

    with sqlite3.connect(path) as old:
        old.execute("INSERT INTO text_embedding VALUES ('enc', 'h-old', 8, ?)", (b"\0" * 32,))
    # ... and its rows, never marked as used, are the first to go.
    cache.get_or_compute("enc", ["one more"], encode)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM text_embedding WHERE text_hash='h-old'").fetchone() == (0,)
    assert cache.rows() == 100


def test_f5_new_labels_are_embedded_outside_the_compute_lock(build, settings, photos):
    """While one request embeds a large new label set, a request whose labels are known is
    answered: it never waits for the text encoder."""
    c = build(attack_settings(settings, photos))
    service = c.app.extensions["semlabel"]
    predict(c, [task(1, "dog", photos)])  # CONFIG's labels embedded, dog's features cached
    salt = uuid.uuid4().hex[:6]
    big = multilabel_config([f"thing {salt} {i}" for i in range(1500)])
    started = threading.Event()
    done = {}

    def embed():
        started.set()
        done["big"] = c.app.test_client().post("/predict", json={"tasks": [task(1, "dog", photos)],
                                                                 "label_config": big}).status_code

    t = threading.Thread(target=embed)
    t.start()
    started.wait()
    while not service.spaces.embedding.locked() and t.is_alive():
        time.sleep(0.005)
    assert service.spaces.embedding.locked(), "the large label set was not being embedded"
    out = predict(c, [task(1, "dog", photos)])
    still_embedding = service.spaces.embedding.locked()
    t.join(600)
    assert next(iter(choices_of(out["results"][0])["meta"]["scores"])) == "dog"
    assert still_embedding, "the small request waited for the large label set"
    assert done["big"] == 200


# ========================================================== Finding 7: bounded growth (HTTP)
def test_f7_metric_label_values_stay_bounded(build, settings, photos):
    c = build(attack_settings(settings, photos))
    for i in range(20):
        c.post("/webhook", json={"action": f"FORGED_{i}_" + "A" * 50_000, "project": {"id": 7}})
    c.open("/predict", method="FOOBAR" + "X" * 1000)
    text = c.get("/metrics").get_data(as_text=True)
    assert len(text) < 200_000 and "FORGED" not in text and "FOOBAR" not in text
    assert 'action="other",outcome="ignored"' in text and 'method="other"' in text


def test_f7_stale_download_directories_are_removed_at_start(build, settings, photos, session_data_dir):
    downloads = session_data_dir / "downloads"
    stale = downloads / "tmp-left-by-a-killed-process"
    stale.mkdir(parents=True, exist_ok=True)
    (stale / "x.jpg").write_bytes(b"x" * 1000)
    old = time.time() - 7200
    os.utime(stale, (old, old))
    build(attack_settings(settings, photos))
    assert not stale.exists()


# ====================================================================== Finding 10: the rest
def test_f10_a_newline_in_task_data_cannot_forge_a_log_line(build, settings, photos, caplog):
    c = build(attack_settings(settings, photos))
    with caplog.at_level(logging.INFO):
        one(c, "/etc/x.jpg\n2026-01-01 semlabel: WARNING: FORGED admin login")
    forged = [r for r in caplog.records if "FORGED" in r.getMessage()]
    assert forged and all("\n" not in r.getMessage() for r in forged)


def test_f10_a_data_uri_obeys_max_bytes(build, settings, photos, jpeg):
    c = build(attack_settings(settings, photos, images={"max_bytes": 1000}))
    uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    assert "image too large" in one(c, uri)["error"]


@pytest.mark.parametrize("project", [-5, "-5", 0, "abc", 1.5, True, "9" * 30])
def test_f10_webhook_project_ids_are_positive_integers(build, settings, photos, redis_url, project):
    c = build(attack_settings(settings, photos))
    resp = c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": project}})
    assert resp.status_code == 400 and "positive integer" in resp.json["error"]
    resp = c.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": project,
                                    "annotation": {"id": 1, "task": 2}})
    assert resp.status_code == 400


def test_f10_error_bodies_do_not_echo_inputs_at_length(build, settings, photos):
    c = build(attack_settings(settings, photos))
    long = "http://images.example.org/" + "a" * 100_000
    resp = c.post("/predict", json={"tasks": [{"id": 1, "data": {"image": long}}], "label_config": CONFIG})
    assert resp.status_code == 422 and len(resp.get_data()) < 3000
    resp = c.post("/setup", json={"project": "7.1", "schema": CONFIG, "hostname": "x" * 100_000})
    assert resp.status_code == 400 and len(resp.get_data()) < 1000


def test_f10_no_traceback_in_a_500(build, settings, photos, caplog):
    c = build(attack_settings(settings, photos))

    def boom():
        raise RuntimeError("secret internal detail at redis://10.0.0.5:6379")

    c.app.add_url_rule("/boom", "boom", boom, methods=["GET"])
    with caplog.at_level(logging.ERROR):
        resp = c.get("/boom")
    assert resp.status_code == 500
    text = resp.get_data(as_text=True)
    assert "internal error" in text and "10.0.0.5" not in text and "RuntimeError" not in text
    assert any("10.0.0.5" in (r.exc_text or str(r.exc_info)) for r in caplog.records)  # the log keeps it


def test_f10_a_huge_image_is_decoded_shrunk_before_the_compute_lock(tmp_path, settings, runtime):
    from PIL import Image

    from backend.images import ImageLoader

    path = tmp_path / "huge.jpg"
    Image.linear_gradient("L").resize((8000, 8000)).convert("RGB").save(path, quality=70)
    loader = ImageLoader(settings.images, local_roots=[tmp_path])
    blob = loader.fetch(str(path))  # in a download thread, outside the compute lock
    assert blob.decoded is not None and max(blob.decoded.size) <= settings.images.decode_max_side
    feats = runtime.features.get_or_compute([blob])[0]
    assert feats.key == blob.key and feats.global_.shape[-1] > 0


# ============================== The pinned web stack (Flask 1.1.2, Werkzeug 2.0.2, Jinja2 3.0.3,
# itsdangerous 2.0.1): what each published advisory needs, and that semlabel never provides it.
_SOURCES = [p for d in ("backend", "worker") for p in (REPO / d).rglob("*.py")]


def _code_uses(*needles: str) -> list[str]:
    hits = []
    for path in _SOURCES:
        text = path.read_text()
        hits += [f"{path.relative_to(REPO)}: {n}" for n in needles if n in text]
    return hits


def test_stack_no_form_or_multipart_parsing(build, settings, photos):
    """Werkzeug CVE-2023-25577, CVE-2023-46136, CVE-2024-49767 (multipart parser DoS / memory):
    no route reads ``request.form``/``request.files``; a multipart body is just a bad JSON body,
    and bounded by the body limit before that."""
    assert _code_uses("request.form", "request.files", "request.values", "parse_form_data") == []
    c = build(attack_settings(settings, photos))
    boundary = "b0und"
    parts = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n' for i in range(20000))
    resp = c.post("/predict", data=parts + f"--{boundary}--\r\n",
                  content_type=f"multipart/form-data; boundary={boundary}")
    assert resp.status_code == 400 and "not valid JSON" in resp.json["error"]


def test_stack_no_cookies_sessions_or_templates(build, settings, photos):
    """Werkzeug CVE-2023-23934 (nameless cookies), Flask CVE-2023-30861 (session cookie without
    Vary: Cookie), itsdangerous (signing only serves sessions), Jinja2 CVE-2024-22195 /
    CVE-2024-34064 (xmlattr), CVE-2024-56201 / CVE-2024-56326 / CVE-2025-27516 (sandbox,
    template compiler): semlabel reads no cookie, sets none, has no secret key (so no session
    can be signed) and renders no template — Flask's Jinja environment is never even created."""
    assert _code_uses("request.cookies", "set_cookie", "session[", "render_template", "jinja2",
                      "secret_key", "SECRET_KEY", "itsdangerous") == []
    c = build(attack_settings(settings, photos))
    c.set_cookie("localhost", "=__Host-x", "forged")
    responses = [c.get("/health"), c.post("/setup", json={"project": "7.1", "schema": CONFIG}),
                 c.post("/predict", json={"tasks": [task(1, "dog", photos)], "label_config": CONFIG}),
                 c.get("/versions"), c.get("/metrics"), c.get("/nope"),
                 c.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 7}})]
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 200, 404, 201]
    assert all("Set-Cookie" not in r.headers for r in responses)
    assert c.app.secret_key is None
    assert "jinja_env" not in c.app.__dict__


def test_stack_no_debugger_no_dev_server_no_safe_join(build, settings, photos):
    """Werkzeug CVE-2024-34069 (debugger), CVE-2022-29361 (dev-server request smuggling),
    CVE-2024-49766 (safe_join on Windows): serve runs gunicorn with debug off; no
    debugger, no ``run_simple``, no static file serving from a user-named path."""
    assert _code_uses("DebuggedApplication", "use_debugger", "run_simple", "app.run(", "safe_join",
                      "send_from_directory", "send_file") == []
    c = build(attack_settings(settings, photos))
    assert c.app.debug is False and c.app.static_folder is None
    assert not any(r.rule.startswith("/static") for r in c.app.url_map.iter_rules())
    assert c.get("/console").status_code == 404 and c.get("/static/x").status_code == 404
    cmd = (REPO / "backend" / "ls" / "server.py").read_text()
    assert "gunicorn.app.base" in cmd
