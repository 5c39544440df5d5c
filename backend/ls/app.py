"""The WSGI app Label Studio 1.23 talks to (Settings → Model → Connect model).

Run it with ``semlabel serve`` or any WSGI server, e.g.
``gunicorn -w 1 --threads 4 -b 0.0.0.0:9090 --timeout 120 'backend.ls.app:create_app()'``.

Routes (JSON unless said otherwise):

``GET /health``   200 with the backbone, the zero-shot version and the version each project is
                  served with (``?project=N``: that one as ``model_version``); 503 while the model
                  loads. Constant time; never loads anything.
``POST /setup``   ``{"model_version": ...}`` — the version ``/predict`` tags its predictions with,
                  so "Retrieve predictions" never duplicates them. 400 for a label config without
                  a ``<Choices>`` bound to an ``<Image>``.
``POST /predict`` ``{"results": [one entry per task, in order]}``; works before any ``/setup``.
``POST /webhook`` the event is persisted in Redis before the answer (201 stored, 200 ignored,
                  400 malformed — nothing stored, 503 Redis down).
``GET|POST /versions``  ``{"versions": [...]}``.
``POST /train``   ``{"project": N}`` → a training job on the RQ ``gpu`` queue (201 ``{"job": id}``).
``GET /metrics``  Prometheus text.

Basic auth (``BASIC_AUTH_USER``/``BASIC_AUTH_PASS``) guards every route but ``/health``,
``/webhook`` included (see :mod:`.webhooks` for how Label Studio's webhook gets the header).
"""

from __future__ import annotations

import atexit
import base64
import hmac
import logging
import threading
import time
from collections import OrderedDict

import redis as _redis
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from ..errors import ConfigError, InvalidWebhook, RedisUnavailable
from . import metrics
from .service import _AUTO, BackendService, NotReady, check_config, project_key
from .webhooks import WebhookAuth, count, handle_webhook

log = logging.getLogger(__name__)

OPEN_PATHS = {"/health", "/"}


def _error(message: str, status: int, **extra):
    body = {"error": message, **extra}
    return jsonify(body), status


def _json_body():
    """The request's JSON object, or a (response, status) for a 400."""
    data = request.get_json(silent=True, force=True)
    if data is None:
        raw = request.get_data(cache=True)
        reason = "empty body" if not raw else "body is not valid JSON"
        return None, _error(f"{reason}; expected a JSON object", 400)
    if not isinstance(data, dict):
        return None, _error(f"expected a JSON object, got {type(data).__name__}", 400)
    return data, None


class _Models:
    """SemlabelModel per (project, label config), created on first use (LRU)."""

    def __init__(self, service, size: int = 128):
        self.service = service
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, project, xml: str):
        from .model import SemlabelModel

        config = check_config(self.service, xml)  # ConfigError before anything is built
        key = (project, config.digest)
        with self._lock:
            model = self._items.get(key)
            if model is not None:
                self._items.move_to_end(key)
                return model
        model = SemlabelModel(self.service, project=project, label_config=xml)
        with self._lock:
            self._items[key] = model
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return model


def create_app(settings=None, *, runtime=None, redis=_AUTO, served=None, background: bool = True,
               start_threads: bool = True) -> Flask:
    """The Flask app with its :class:`~.service.BackendService` (``app.extensions["semlabel"]``).

    With no ``runtime``/``served`` given, the backbone loads in a background thread (``/health``
    says 503 until it is ready); pass ``background=False`` to load before returning."""
    service = BackendService(settings, runtime=runtime, redis=redis, served=served, background=background,
                             start_threads=start_threads)
    settings = service.settings
    app = Flask("semlabel")
    app.config["JSON_SORT_KEYS"] = False
    app.config["MAX_CONTENT_LENGTH"] = int(settings.backend.max_request_mb * 2**20)
    app.extensions["semlabel"] = service
    models = _Models(service)
    user, password = settings.basic_auth_user, settings.basic_auth_pass
    auth_enabled = bool(user) and bool(password)
    expected = None
    webhook_auth = None
    if auth_enabled:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        expected = f"Basic {token}"
        webhook_auth = WebhookAuth(expected)
        app.extensions["semlabel_webhook_auth"] = webhook_auth
    if start_threads:
        atexit.register(service.close)

    # -- cross-cutting -----------------------------------------------------------------
    @app.before_request
    def _start():
        g.t0 = time.perf_counter()
        if not auth_enabled or request.path in OPEN_PATHS:
            return None
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), expected.encode()):
            return None
        if request.path.rstrip("/") == "/webhook":
            count("?", "unauthorized")
            log.warning("refused a webhook without this backend's basic-auth credentials (from %s)",
                        request.remote_addr)
        else:
            log.warning("refused %s %s: missing or wrong basic-auth credentials", request.method, request.path)
        resp = jsonify({"error": "authentication required (basic auth)"})
        resp.status_code = 401
        resp.headers["WWW-Authenticate"] = 'Basic realm="semlabel"'
        return resp

    @app.after_request
    def _observe(response):
        rule = request.url_rule.rule if request.url_rule is not None else "other"
        metrics.REQUESTS.labels(rule, request.method, str(response.status_code)).inc()
        metrics.LATENCY.labels(rule).observe(time.perf_counter() - g.get("t0", time.perf_counter()))
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc):
        return _error(exc.description or exc.name, exc.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(exc):
        log.exception("%s %s failed", request.method, request.path)
        return _error(f"{type(exc).__name__}: {str(exc)[:300]}", 500)

    # -- routes ------------------------------------------------------------------------
    @app.route("/", methods=["GET"])
    @app.route("/health", methods=["GET"])
    def health():
        if service.load_error:
            return jsonify({"status": "ERROR", "ready": False, "error": service.load_error}), 503
        if not service.ready:
            return jsonify({
                "status": "LOADING", "ready": False, "model_class": "SemlabelModel",
                "loading_for_s": round(time.time() - service.started_at, 1),
            }), 503
        versions = service.served_versions()
        body = {
            "status": "UP",
            "ready": True,
            "model_class": "SemlabelModel",
            "backbone": service.backbone_name,
            "model_version": service.zero_shot_version,
            "projects": versions,
        }
        project = project_key(request.args.get("project"))
        if project is not None:
            body["project"] = project
            body["model_version"] = versions.get(project, service.zero_shot_version)
        return jsonify(body)

    @app.route("/setup", methods=["POST"])
    def setup():
        data, bad = _json_body()
        if bad:
            return bad
        project = project_key(data.get("project"))
        schema = data.get("schema") or data.get("label_config")
        try:
            service.require_ready(settings.backend.setup_wait_s)
        except NotReady as exc:
            return _error(str(exc), 503)
        if schema:
            try:
                service.project_config(schema)
            except ConfigError as exc:
                log.warning("/setup for project %s refused: %s", project, exc)
                return _error(str(exc), 400)
        hostname = data.get("hostname")
        if hostname and not (isinstance(hostname, str) and hostname.strip().startswith(("http://", "https://"))):
            log.warning("/setup for project %s refused: hostname %r is not an http(s) URL", project, hostname)
            return _error(f"'hostname' must be Label Studio's http(s) URL, got {hostname!r}", 400)
        service.remember_setup(project, hostname, data.get("access_token"))
        version = service.model_version(project)
        if webhook_auth is not None:
            webhook_auth.ensure(project, service.connection(project), request.host)
        return jsonify({"model_version": version})

    @app.route("/predict", methods=["POST"])
    def predict():
        data, bad = _json_body()
        if bad:
            return bad
        tasks = data.get("tasks")
        if tasks is None:
            return _error("no 'tasks' in the request", 400)
        if not isinstance(tasks, list):
            return _error(f"'tasks' must be a list, got {type(tasks).__name__}", 400)
        if not tasks:
            return _error("'tasks' is empty", 400)
        project = project_key(data.get("project"))
        xml = data.get("label_config") or data.get("schema")
        params = data.get("params") if isinstance(data.get("params"), dict) else {}
        context = params.get("context", data.get("context"))
        try:
            service.require_ready(settings.backend.predict_wait_s)
        except NotReady as exc:
            return _error(str(exc), 503)
        try:
            model = models.get(project, xml)
        except ConfigError as exc:
            log.warning("/predict for project %s refused: %s", project, exc)
            return _error(str(exc), 400)
        entries = model.predict(tasks, context=context)
        version = entries[0]["model_version"] if entries else service.zero_shot_version
        _remember_tasks(service, project, tasks)
        failed = [e for e in entries if "result" not in e]
        if len(failed) == len(entries):
            return _error(f"no task could be predicted: {failed[0]['error']}", 422,
                          results=entries, model_version=version)
        return jsonify({"results": entries, "model_version": version})

    @app.route("/webhook", methods=["POST"])
    def webhook():
        payload = request.get_json(silent=True, force=True)
        action = str(payload.get("action") or "?").upper() if isinstance(payload, dict) else "?"
        try:
            out = handle_webhook(service, payload)
        except InvalidWebhook as exc:
            count(action, "invalid")
            log.warning("webhook %s refused: %s", action, exc.reason)
            return _error(exc.reason, 400)
        except (RedisUnavailable, _redis.RedisError) as exc:
            count(action, "unavailable")
            log.error("webhook %s not stored: %s", action, exc)
            return _error(f"event log unavailable: {exc}", 503)
        count(action, "ignored" if out.get("ignored") else "stored")
        return jsonify(out), 200 if out.get("ignored") else 201

    @app.route("/versions", methods=["GET", "POST"])
    def versions():
        data = request.get_json(silent=True, force=True) if request.method == "POST" else None
        data = data if isinstance(data, dict) else {}  # Label Studio sends nothing or an object
        project = project_key(request.args.get("project") or data.get("project"))
        if not service.ready:
            return _error("the model is still loading", 503)
        return jsonify({"versions": service.versions(project),
                        "model_version": service.model_version(project) if project else
                        service.zero_shot_version})

    @app.route("/train", methods=["POST"])
    def train():
        from ..events import request_training

        data = request.get_json(silent=True, force=True) or {}
        if not isinstance(data, dict):
            return _error("expected a JSON object", 400)
        project = project_key(data.get("project") or request.args.get("project"))
        if project is None:
            return _error("no project id ('project' in the body or the query)", 400)
        redis = service.redis
        if redis is None:
            return _error("event log unavailable: no Redis answers", 503)
        try:
            info = request_training(redis, project, settings, reason="POST /train")
        except _redis.RedisError as exc:
            return _error(f"event log unavailable: {exc}", 503)
        return jsonify({"job": info.get("job_id"), **info}), 201

    @app.route("/metrics", methods=["GET"])
    def prometheus():
        body, content_type = metrics.render()
        return Response(body, content_type=content_type)

    return app


def _remember_tasks(service, project, tasks) -> None:
    """Keep task data so a training job finds the images of annotated tasks (best effort, in
    the background: a slow or absent Redis never delays a prediction)."""
    if project is None or service.redis is None:
        return
    from ..events import remember_tasks

    def run():
        try:
            remember_tasks(service.redis, project, tasks, service.settings)
        except Exception as exc:  # noqa: BLE001
            log.debug("could not remember task data: %s", exc)

    try:
        service.background(run)
    except RuntimeError:  # shutting down
        pass
