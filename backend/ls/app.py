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

Basic auth (``BASIC_AUTH_USER``/``BASIC_AUTH_PASS``, both or neither) or the URL secret
(``auth.url_secret``: the model connected as ``http://host:9090/<secret>``) guards every route
but ``/health``, ``/webhook`` included (see :mod:`.webhooks` for how Label Studio's webhook gets
the header). Before any route: :class:`.guard.RequestGuard` (body limit, URL secret).
"""

from __future__ import annotations

import atexit
import base64
import hmac
import logging
import threading
import time
import uuid
from collections import OrderedDict

import redis as _redis
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from ..errors import ConfigError, InvalidWebhook, RedisUnavailable
from . import guard, metrics
from .connection import label_studio_allowed
from .service import _AUTO, BackendService, NotReady, check_config, project_key
from ..queue.spool import SpoolFull
from ..queue.webhook import parse_webhook
from .webhooks import WebhookAuth, count, handle_webhook

log = logging.getLogger(__name__)

OPEN_PATHS = {"/health", "/"}


def _error(message: str, status: int, **extra):
    body = {"error": guard.clip(message, 400), **extra}
    return jsonify(body), status


def _json_body(max_depth: int, optional: bool = False):
    """The request's JSON object, or a (response, status) for a 400. ``optional``: an empty
    or non-object body is an empty object (``/versions``, ``/train``)."""
    raw = request.get_data(cache=True)
    if optional and not raw.strip():
        return {}, None
    try:
        data = guard.parse_json(raw, max_depth)
    except guard.BadRequest as exc:
        return None, _error(exc.reason, exc.status)
    if not isinstance(data, dict):
        if optional:
            return {}, None
        return None, _error(f"expected a JSON object, got {type(data).__name__}", 400)
    return data, None


def _check_auth_settings(settings) -> None:
    """Half-set credentials are an error, not silently no authentication."""
    user, password = settings.basic_auth_user, settings.basic_auth_pass
    if bool(user) != bool(password):
        given, missing = ("BASIC_AUTH_USER", "BASIC_AUTH_PASS") if user else ("BASIC_AUTH_PASS", "BASIC_AUTH_USER")
        raise ConfigError(f"{given} is set but {missing} is not: set both (basic auth on) or neither")


def auth_configured(settings) -> bool:
    """Whether requests must authenticate (basic auth or the URL secret)."""
    _check_auth_settings(settings)
    return bool(settings.basic_auth_user and settings.basic_auth_pass) or bool(settings.auth.url_secret.strip("/"))


_METHODS = {"GET", "POST", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"}


def checked_config(service, xml):
    """The parsed label config, within ``limits`` (its size before parsing; then its number
    of labels and their length); ConfigError (a 400) otherwise."""
    limits = service.settings.limits
    if isinstance(xml, str):
        if len(xml) > limits.max_label_config_chars:
            raise ConfigError(f"label config of {len(xml)} characters, over "
                              f"limits.max_label_config_chars={limits.max_label_config_chars}")
        head = xml[:4096].upper()
        if "<!DOCTYPE" in head or "<!ENTITY" in xml.upper():
            raise ConfigError("a label config with a DTD or entities is not accepted")
    config = check_config(service, xml)
    for b in config.bindings:
        if len(b.labels) > limits.max_labels:
            raise ConfigError(f"<Choices name={guard.clip(b.control, 40)!r}> has {len(b.labels)} choices, over "
                              f"limits.max_labels={limits.max_labels}")
        for label in b.labels:
            for text in (label.name, *label.texts):
                if len(text) > limits.max_label_chars:
                    raise ConfigError(f"a choice of {len(text)} characters ({guard.clip(text, 40)}), over "
                                      f"limits.max_label_chars={limits.max_label_chars}")
    return config


class _Models:
    """SemlabelModel per (project, label config), created on first use (LRU)."""

    def __init__(self, service, size: int = 128):
        self.service = service
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, project, xml: str):
        from .model import SemlabelModel

        config = checked_config(self.service, xml)  # ConfigError before anything is built
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
    from ..settings import get_settings

    guard.install_safe_log_records()
    auth_enabled = auth_configured(settings or get_settings())  # before anything loads
    service = BackendService(settings, runtime=runtime, redis=redis, served=served, background=background,
                             start_threads=start_threads)
    settings = service.settings
    limits = settings.limits
    guard.refused.interval_s = settings.auth.refused_log_interval_s
    app = Flask("semlabel", static_folder=None)  # no static files: no file serving at all
    app.config["JSON_SORT_KEYS"] = False
    max_body = int(limits.max_request_mb * 2**20)
    app.config["MAX_CONTENT_LENGTH"] = max_body
    app.wsgi_app = guard.RequestGuard(app.wsgi_app, max_body, settings.auth.url_secret)
    app.extensions["semlabel"] = service
    models = _Models(service)
    user, password = settings.basic_auth_user, settings.basic_auth_pass
    expected = None
    webhook_auth = None
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        expected = f"Basic {token}"
        webhook_auth = WebhookAuth(expected)
        app.extensions["semlabel_webhook_auth"] = webhook_auth
    if not auth_enabled:
        log.warning("authentication is OFF: anyone who can reach this port can send prediction requests "
                    "and webhooks (training data). Set BASIC_AUTH_USER and BASIC_AUTH_PASS, or "
                    "SEMLABEL_AUTH__URL_SECRET")
    _clean_downloads(settings)
    if start_threads:
        atexit.register(service.close)

    # -- cross-cutting -----------------------------------------------------------------
    @app.before_request
    def _start():
        g.t0 = time.perf_counter()
        if not auth_enabled or request.path in OPEN_PATHS or request.environ.get(guard.URL_SECRET_OK):
            return None
        given = request.headers.get("Authorization", "")
        if expected is not None and hmac.compare_digest(given.encode(), expected.encode()):
            return None
        if request.path.rstrip("/") == "/webhook":
            count("?", "unauthorized")
            guard.refused.warn("webhook", "refused a webhook without this backend's credentials (from %s)",
                               request.remote_addr)
        else:
            guard.refused.warn("auth", "refused %s %s: missing or wrong credentials",
                               guard.clip(request.method, 10), guard.clip(request.path, 80))
        resp = jsonify({"error": "authentication required (basic auth or the URL secret)"})
        resp.status_code = 401
        resp.headers["WWW-Authenticate"] = 'Basic realm="semlabel"'
        return resp

    @app.after_request
    def _observe(response):
        rule = request.url_rule.rule if request.url_rule is not None else "other"
        method = request.method if request.method in _METHODS else "other"
        metrics.REQUESTS.labels(rule, method, str(response.status_code)).inc()
        metrics.LATENCY.labels(rule).observe(time.perf_counter() - g.get("t0", time.perf_counter()))
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc):
        return _error(exc.description or exc.name, exc.code or 500)

    @app.errorhandler(Exception)
    def _unexpected(exc):
        # The traceback goes to the log, never into the response (it names files, hosts, values).
        ref = uuid.uuid4().hex[:12]
        log.exception("%s %s failed (error %s)", request.method, guard.clip(request.path, 80), ref)
        return _error(f"internal error {ref} (details in the backend's log)", 500)

    # -- routes ------------------------------------------------------------------------
    @app.route("/", methods=["GET"])
    @app.route("/health", methods=["GET"])
    def health():
        if service.load_error:
            return jsonify({"status": "ERROR", "ready": False, "error": guard.clip(service.load_error, 300)}), 503
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
        data, bad = _json_body(limits.max_json_depth)
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
                checked_config(service, schema)
            except ConfigError as exc:
                log.warning("/setup for project %s refused: %s", project, exc)
                return _error(str(exc), 400)
        hostname = data.get("hostname")
        if hostname and not (isinstance(hostname, str) and hostname.strip().startswith(("http://", "https://"))):
            log.warning("/setup for project %s refused: hostname %s is not an http(s) URL", project,
                        guard.clip(repr(hostname), 120))
            return _error(f"'hostname' must be Label Studio's http(s) URL, got {guard.clip(repr(hostname), 80)}", 400)
        token = data.get("access_token")
        if hostname and not label_studio_allowed(settings, hostname):
            # Only the operator names the Label Studio a token may be sent to: a /setup naming
            # another address is answered (Label Studio needs the model version) but its
            # address and token are never used.
            guard.refused.warn("setup-host", "/setup for project %s: ignoring Label Studio address %s "
                               "(not LABEL_STUDIO_URL nor in auth.allowed_label_studio_urls)",
                               project, guard.clip(hostname, 120))
            hostname = token = None
        service.remember_setup(project, hostname, token)
        version = service.model_version(project)
        if webhook_auth is not None:
            webhook_auth.ensure(project, service.connection(project), request.host)
        return jsonify({"model_version": version})

    @app.route("/predict", methods=["POST"])
    def predict():
        data, bad = _json_body(limits.max_json_depth)
        if bad:
            return bad
        tasks = data.get("tasks")
        if tasks is None:
            return _error("no 'tasks' in the request", 400)
        if not isinstance(tasks, list):
            return _error(f"'tasks' must be a list, got {type(tasks).__name__}", 400)
        if not tasks:
            return _error("'tasks' is empty", 400)
        if len(tasks) > limits.max_tasks:
            return _error(f"{len(tasks)} tasks in one request, over limits.max_tasks={limits.max_tasks}", 413)
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
        try:
            payload = guard.parse_json(request.get_data(cache=True), limits.max_json_depth)
        except guard.BadRequest as exc:
            count("other", "invalid")
            guard.refused.warn("webhook-invalid", "webhook refused: %s", exc.reason)
            return _error(exc.reason if "deeper" in exc.reason else "payload is not a JSON object", exc.status)
        try:
            event = parse_webhook(payload, service.settings)
        except InvalidWebhook as exc:
            count(exc.action, "invalid")
            guard.refused.warn("webhook-invalid", "webhook %s refused: %s", exc.action, exc.reason)
            return _error(exc.reason, 400)
        action = event.metric_action
        try:
            out = handle_webhook(service, event)
        except (RedisUnavailable, _redis.RedisError, SpoolFull) as exc:
            count(action, "unavailable")
            log.error("webhook %s not stored: %s", action, exc)
            return _error("event log unavailable: Redis does not answer and the spool is full", 503)
        count(action, "ignored" if out.get("ignored") else "spooled" if out.get("spooled") else "stored")
        return jsonify(out), 200 if out.get("ignored") else 202 if out.get("spooled") else 201

    @app.route("/versions", methods=["GET", "POST"])
    def versions():
        data, bad = _json_body(limits.max_json_depth, optional=True) if request.method == "POST" else ({}, None)
        if bad:  # Label Studio sends nothing or an object
            return bad
        project = project_key(request.args.get("project") or data.get("project"))
        if not service.ready:
            return _error("the model is still loading", 503)
        return jsonify({"versions": service.versions(project),
                        "model_version": service.model_version(project) if project else
                        service.zero_shot_version})

    @app.route("/train", methods=["POST"])
    def train():
        from ..queue.debounce import request_training

        data, bad = _json_body(limits.max_json_depth, optional=True)
        if bad:
            return bad
        project = project_key(data.get("project") or request.args.get("project"))
        if project is None:
            return _error("no project id ('project' in the body or the query)", 400)
        redis = service.redis
        if redis is None:
            return _error("event log unavailable: no Redis answers", 503)
        try:
            info = request_training(redis, project, settings, reason="POST /train")
        except _redis.RedisError as exc:
            log.error("POST /train for project %s not queued: %s", project, exc)
            return _error("event log unavailable: Redis does not answer", 503)
        return jsonify({"job": info.get("job_id"), **info}), 201

    @app.route("/metrics", methods=["GET"])
    def prometheus():
        body, content_type = metrics.render()
        return Response(body, content_type=content_type)

    return app


def _clean_downloads(settings) -> None:
    """Downloads live in memory; ``<data_dir>/downloads`` only ever holds per-request temporary
    directories, and those a killed process left behind are removed at start."""
    import shutil

    root = settings.data_path / "downloads"
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if time.time() - entry.stat().st_mtime > 3600:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _remember_tasks(service, project, tasks) -> None:
    """Keep task data so a training job finds the images of annotated tasks (best effort, in
    the background: a slow or absent Redis never delays a prediction)."""
    if project is None or service.redis is None:
        return
    from ..queue.eventlog import remember_tasks

    def run():
        try:
            remember_tasks(service.redis, project, tasks, service.settings)
        except Exception as exc:  # noqa: BLE001
            log.debug("could not remember task data: %s", exc)

    try:
        service.background(run)
    except RuntimeError:  # shutting down
        pass
