"""The WSGI app Label Studio 1.23 talks to (Settings → Model → Connect model).

Run it with ``python -m backend.ls`` (``semlabel serve``) or any WSGI server, e.g.
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

Basic auth or the URL secret (the model connected as ``http://host:9090/<secret>``) guards
every route but ``/health`` (:mod:`.auth`). Before any route: :class:`.guard.RequestGuard`
(body limit, URL secret). Request bodies are parsed once, here, into :mod:`.schemas` models;
the work is :class:`~.service.BackendService`'s.
"""

from __future__ import annotations

import atexit
import logging
import time
import uuid

import redis as _redis
from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from ..errors import ConfigError, InvalidWebhook, RedisUnavailable
from ..queue.spool import SpoolFull
from ..queue.webhook import parse_webhook
from . import guard, metrics
from .auth import Auth
from .connection import label_studio_allowed
from .fetch import clean_downloads
from .schemas import PredictRequest, SetupRequest, json_object, parse, project_key
from .service import _AUTO, BackendService, NotReady
from .webhooks import count, handle_webhook

log = logging.getLogger(__name__)

_METHODS = {"GET", "POST", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"}

routes = Blueprint("semlabel", __name__)


def _error(message: str, status: int, **extra):
    body = {"error": guard.clip(message, 400), **extra}
    return jsonify(body), status


def _service() -> BackendService:
    return current_app.extensions["semlabel"]


def _body(optional: bool = False) -> dict:
    return json_object(request.get_data(cache=True), _service().settings.limits.max_json_depth, optional=optional)


def _ready_config(route: str, project: str | None, xml: str | None, wait_s: float):
    """(the parsed label config or None, None) once the model is ready; (None, the 503/400
    response) when it is not or the config cannot be served."""
    service = _service()
    try:
        service.require_ready(wait_s)
    except NotReady as exc:
        return None, _error(str(exc), 503)
    if xml is None:
        return None, None
    try:
        return service.configs.get(xml), None  # the one lookup of this request
    except ConfigError as exc:
        log.warning("%s for project %s refused: %s", route, project, exc)
        return None, _error(str(exc), 400)


def create_app(settings=None, *, runtime=None, redis=_AUTO, served=None, background: bool = True,
               start_threads: bool = True) -> Flask:
    """The Flask app with its :class:`~.service.BackendService` (``app.extensions["semlabel"]``).

    With no ``runtime``/``served`` given, the backbone loads in a background thread (``/health``
    says 503 until it is ready); pass ``background=False`` to load before returning."""
    from ..settings import get_settings

    guard.install_safe_log_records()
    auth = Auth(settings or get_settings())  # half-set credentials fail before anything loads
    service = BackendService(settings, runtime=runtime, redis=redis, served=served, background=background,
                             start_threads=start_threads)
    settings = service.settings
    guard.refused.interval_s = settings.auth.refused_log_interval_s
    app = Flask("semlabel", static_folder=None)  # no static files: no file serving at all
    app.config["JSON_SORT_KEYS"] = False
    max_body = int(settings.limits.max_request_mb * 2**20)
    app.config["MAX_CONTENT_LENGTH"] = max_body
    app.wsgi_app = guard.RequestGuard(app.wsgi_app, max_body, settings.auth.url_secret)
    app.extensions["semlabel"] = service
    app.extensions["semlabel_auth"] = auth
    if not auth.enabled:
        log.warning("authentication is OFF: anyone who can reach this port can send prediction requests "
                    "and webhooks (training data). Set BASIC_AUTH_USER and BASIC_AUTH_PASS, or "
                    "SEMLABEL_AUTH__URL_SECRET")
    clean_downloads(settings)
    if start_threads:
        atexit.register(service.close)
    app.before_request(_start)
    app.after_request(_observe)
    app.register_error_handler(guard.BadRequest, _bad_request)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
    app.register_blueprint(routes)
    return app


# -- cross-cutting ---------------------------------------------------------------------
def _start():
    g.t0 = time.perf_counter()
    return current_app.extensions["semlabel_auth"].refusal()


def _observe(response):
    rule = request.url_rule.rule if request.url_rule is not None else "other"
    method = request.method if request.method in _METHODS else "other"
    metrics.REQUESTS.labels(rule, method, str(response.status_code)).inc()
    metrics.LATENCY.labels(rule).observe(time.perf_counter() - g.get("t0", time.perf_counter()))
    return response


def _bad_request(exc: guard.BadRequest):
    guard.refused.warn("request", "%s %s refused: %s", guard.clip(request.method, 10),
                       guard.clip(request.path, 80), exc.reason)
    return _error(exc.reason, exc.status)


def _http_error(exc):
    return _error(exc.description or exc.name, exc.code or 500)


def _unexpected(exc):
    # The traceback goes to the log, never into the response (it names files, hosts, values).
    ref = uuid.uuid4().hex[:12]
    log.exception("%s %s failed (error %s)", request.method, guard.clip(request.path, 80), ref)
    return _error(f"internal error {ref} (details in the backend's log)", 500)


# -- routes ----------------------------------------------------------------------------
@routes.route("/", methods=["GET"])
@routes.route("/health", methods=["GET"])
def health():
    service = _service()
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


@routes.route("/setup", methods=["POST"])
def setup():
    service = _service()
    settings = service.settings
    req = parse(SetupRequest, request.get_data(cache=True), settings.limits)
    _, refused = _ready_config("/setup", req.project, req.label_config or None, settings.backend.setup_wait_s)
    if refused:
        return refused
    hostname, token = req.hostname, req.access_token
    if hostname and not label_studio_allowed(settings, hostname):
        # Only the operator names the Label Studio a token may be sent to: a /setup naming
        # another address is answered (Label Studio needs the model version) but its
        # address and token are never used.
        guard.refused.warn("setup-host", "/setup for project %s: ignoring Label Studio address %s "
                           "(not LABEL_STUDIO_URL nor in auth.allowed_label_studio_urls)",
                           req.project, guard.clip(hostname, 120))
        hostname = token = None
    service.connections.remember_setup(req.project, hostname, token)
    version = service.model_version(req.project)
    webhook_auth = current_app.extensions["semlabel_auth"].webhook
    if webhook_auth is not None:
        webhook_auth.ensure(req.project, service.connections.get(req.project), request.host)
    return jsonify({"model_version": version})


@routes.route("/predict", methods=["POST"])
def predict():
    service = _service()
    settings = service.settings
    req = parse(PredictRequest, request.get_data(cache=True), settings.limits)
    config, refused = _ready_config("/predict", req.project, req.label_config, settings.backend.predict_wait_s)
    if refused:
        return refused
    entries, version = service.predictions.predict(req.project, config, req.tasks, req.context)
    service.remember_tasks(req.project, req.tasks)
    failed = [e for e in entries if "result" not in e]
    if len(failed) == len(entries):
        return _error(f"no task could be predicted: {failed[0]['error']}", 422,
                      results=entries, model_version=version)
    return jsonify({"results": entries, "model_version": version})


@routes.route("/webhook", methods=["POST"])
def webhook():
    service = _service()
    try:
        payload = guard.parse_json(request.get_data(cache=True), service.settings.limits.max_json_depth)
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


@routes.route("/versions", methods=["GET", "POST"])
def versions():
    service = _service()
    data = _body(optional=True) if request.method == "POST" else {}  # Label Studio sends nothing or an object
    project = project_key(request.args.get("project") or data.get("project"))
    if not service.ready:
        return _error("the model is still loading", 503)
    return jsonify({"versions": service.versions(project),
                    "model_version": service.model_version(project) if project else service.zero_shot_version})


@routes.route("/train", methods=["POST"])
def train():
    from ..queue.debounce import request_training

    service = _service()
    project = project_key(_body(optional=True).get("project") or request.args.get("project"))
    if project is None:
        return _error("no project id ('project' in the body or the query)", 400)
    if service.redis is None:
        return _error("event log unavailable: no Redis answers", 503)
    try:
        info = request_training(service.redis, project, service.settings, reason="POST /train")
    except _redis.RedisError as exc:
        log.error("POST /train for project %s not queued: %s", project, exc)
        return _error("event log unavailable: Redis does not answer", 503)
    return jsonify({"job": info.get("job_id"), **info}), 201


@routes.route("/metrics", methods=["GET"])
def prometheus():
    body, content_type = metrics.render()
    return Response(body, content_type=content_type)
