"""What stands between the network and the routes: a body limit enforced before anything
parses the body, bounded JSON, the URL secret, rate-limited refusal logs, log lines that
cannot be forged.

:class:`RequestGuard` is WSGI middleware, so it runs before Flask/Werkzeug touch the body:
on the pinned Werkzeug 2.0.2 ``MAX_CONTENT_LENGTH`` does not bound ``get_json`` and a chunked
body has no length to check at all. A body with a ``Content-Length`` over the limit is refused
unread; a chunked (or length-less) body is read into memory up to the limit and refused at the
first byte past it, then handed on with its exact length.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

#: environ key set by :class:`RequestGuard` when the path carried the URL secret.
URL_SECRET_OK = "semlabel.url_secret_ok"


class BadRequest(Exception):
    """A request refused before it reaches a route: ``status`` and a one-line ``reason``."""

    def __init__(self, status: int, reason: str):
        self.status = status
        self.reason = reason
        super().__init__(reason)


def _json_response(start_response, status: int, reason: str, headers=()) -> list[bytes]:
    body = json.dumps({"error": reason}).encode()
    phrase = {400: "BAD REQUEST", 401: "UNAUTHORIZED", 404: "NOT FOUND", 413: "REQUEST ENTITY TOO LARGE"}
    start_response(f"{status} {phrase.get(status, 'ERROR')}", [
        ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
        # Do not read (drain) the rest of a refused body to keep the connection alive.
        *(("Connection", "close"),) * (status == 413), *headers])
    return [body]


class RequestGuard:
    """WSGI middleware: the URL secret prefix and the body limit.

    Args:
        app: the WSGI app to guard.
        max_bytes: the largest body passed on (bytes).
        url_secret: when set, a path ``/<url_secret>/rest`` is served as ``/rest`` and marked
            authenticated (``environ[URL_SECRET_OK]``); compared in constant time.
    """

    def __init__(self, app: Callable, max_bytes: int, url_secret: str = ""):
        self.app = app
        self.max_bytes = int(max_bytes)
        self.url_secret = url_secret.strip("/")
        self.refused_bodies = 0

    def __call__(self, environ, start_response):
        environ[URL_SECRET_OK] = False
        if self.url_secret:
            path = environ.get("PATH_INFO", "")
            head, sep, rest = path.lstrip("/").partition("/")
            if hmac.compare_digest(head.encode(), self.url_secret.encode()):
                environ["PATH_INFO"] = "/" + rest if sep else "/"
                environ["SCRIPT_NAME"] = environ.get("SCRIPT_NAME", "") + "/" + head
                environ[URL_SECRET_OK] = True
        try:
            self._limit_body(environ)
        except BadRequest as exc:
            self.refused_bodies += 1
            refused.warn("body", "refused a %s body to %s: %s", environ.get("REQUEST_METHOD"),
                         safe_path(environ), exc.reason)
            return _json_response(start_response, exc.status, exc.reason)
        return self.app(environ, start_response)

    def _limit_body(self, environ) -> None:
        limit = self.max_bytes
        raw_length = environ.get("CONTENT_LENGTH") or ""
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if raw_length.strip() and not chunked:
            try:
                length = int(raw_length)
            except ValueError:
                raise BadRequest(400, "Content-Length is not a number") from None
            if length < 0:
                raise BadRequest(400, "Content-Length is negative")
            if length > limit:
                raise BadRequest(413, f"request body of {length} bytes is over the limit of {limit} bytes "
                                      "(limits.max_request_mb)")
            return
        if not (chunked or environ.get("wsgi.input_terminated")):
            return  # no length and not terminated: Werkzeug reads nothing
        stream = environ["wsgi.input"]
        buf = io.BytesIO()
        while True:
            chunk = stream.read(min(65536, limit + 1 - buf.tell()))
            if not chunk:
                break
            buf.write(chunk)
            if buf.tell() > limit:
                raise BadRequest(413, f"request body is over the limit of {limit} bytes (limits.max_request_mb)")
        environ["wsgi.input"] = io.BytesIO(buf.getvalue())
        environ["CONTENT_LENGTH"] = str(buf.tell())
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        environ["wsgi.input_terminated"] = False


def parse_json(raw: bytes, max_depth: int) -> Any:
    """``raw`` as JSON, nested at most ``max_depth`` deep; :class:`BadRequest` (400) otherwise.

    The depth is checked on the bytes before parsing (brackets outside strings), so a
    100 000-deep ``[[[...`` costs one linear scan and no recursion."""
    if not raw or not raw.strip():
        raise BadRequest(400, "empty body; expected a JSON object")
    cheap = raw.count(b"[") + raw.count(b"{") <= max_depth
    if not cheap and _max_depth(raw, max_depth) > max_depth:
        raise BadRequest(400, f"JSON nested deeper than {max_depth} levels (limits.max_json_depth)")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest(400, "body is not valid JSON; expected a JSON object") from None


def _max_depth(raw: bytes, stop_after: int) -> int:
    """Deepest bracket nesting outside JSON strings (stops counting past ``stop_after``)."""
    import re

    depth = best = 0
    in_string = False
    # Only the bytes that can change the state: quotes, backslashes, brackets.
    for m in re.finditer(rb'["\\\[\]{}]', raw):
        ch = m.group()
        if in_string:
            if ch == b'"':
                # a quote preceded by an odd number of backslashes is escaped
                start, i = m.start(), m.start() - 1
                while i >= 0 and raw[i] == 0x5C:
                    i -= 1
                if (start - 1 - i) % 2 == 0:
                    in_string = False
            continue
        if ch == b'"':
            in_string = True
        elif ch in (b"[", b"{"):
            depth += 1
            if depth > best:
                best = depth
                if best > stop_after:
                    return best
        elif ch in (b"]", b"}"):
            depth -= 1
    return best


# ---------------------------------------------------------------------------- logging
_CONTROL = {i: f"\\x{i:02x}" for i in (*range(0x20), 0x7F)}
_CONTROL.update({0x85: "\\x85", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def escape_control(text: str) -> str:
    """``text`` with control characters (newlines included) written as escapes: a value
    from a request cannot start a log line of its own."""
    return text.translate(_CONTROL)


def clip(text: Any, limit: int = 120) -> str:
    """At most ``limit`` characters of ``text`` (escaped), saying how long it was."""
    text = escape_control(str(text))
    return text if len(text) <= limit else f"{text[:limit]}…({len(text)} chars)"


def safe_path(environ) -> str:
    return clip(environ.get("PATH_INFO", ""), 80)


_factory_lock = threading.Lock()
_installed = False


def install_safe_log_records() -> None:
    """Every log record's message (its arguments substituted) has its control characters
    escaped, whoever logs it (gunicorn, the SDK, semlabel). Tracebacks are kept as they are:
    they are formatted apart from the message. Idempotent."""
    global _installed
    with _factory_lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args, **kwargs):
            record = previous(*args, **kwargs)
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a bad format string stays as it was
                return record
            safe = escape_control(message)
            if safe != message or record.args:
                record.msg, record.args = safe, None
            return record

        logging.setLogRecordFactory(factory)
        _installed = True


class RateLimitedLog:
    """At most one warning per ``interval_s`` per kind; the next one says how many were not
    logged. A flood of refused requests costs a counter increment each, not a log line."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0):
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}
        self._lock = threading.Lock()

    def warn(self, kind: str, msg: str, *args) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval_s:
                self._skipped[kind] = self._skipped.get(kind, 0) + 1
                return False
            self._last[kind] = now
            skipped = self._skipped.pop(kind, 0)
        suffix = f" ({skipped} more like it not logged in the last {self.interval_s:.0f} s)" if skipped else ""
        self.logger.warning(msg + suffix, *args)
        return True


#: The process's refusal log (interval set by the app from auth.refused_log_interval_s).
refused = RateLimitedLog(log)
