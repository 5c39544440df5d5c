"""Running the app: gunicorn in-process (``python -m backend.ls``, ``semlabel serve``) and as a
child process (tests, the latency benchmark). Needs ``backend`` only.

One process holds one model: with ``--workers N`` every worker loads the backbone itself, so on a
CPU machine prefer one worker with several threads (requests share the model; the compute is
serialised, downloads and webhooks are not).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from gunicorn.workers.gthread import ThreadWorker

from ..errors import ConfigError
from ..net import free_port, is_loopback


def check_bind(host: str, *, insecure: bool = False) -> str | None:
    """ConfigError when serving on ``host`` would expose an unauthenticated backend (or the
    credentials are half set); with ``insecure``, the warning to print instead."""
    from ..settings import get_settings
    from .auth import auth_configured

    if auth_configured(get_settings()) or is_loopback(host):
        return None
    if not insecure:
        raise ConfigError(
            f"refusing to serve on {host} without credentials: anyone who can reach that address "
            "could send forged annotation webhooks (training data) and /setup requests. Set "
            "BASIC_AUTH_USER and BASIC_AUTH_PASS (Label Studio: the model's basic-auth fields) or "
            "SEMLABEL_AUTH__URL_SECRET (connect the model as http://host:port/<secret>), serve on "
            "127.0.0.1, or pass --insecure if the network is trusted.")
    return f"serving on {host} WITHOUT authentication (--insecure)"


def serve(*, host: str = "127.0.0.1", port: int | None = None, workers: int = 1, threads: int | None = None,
          timeout: int | None = None, access_log: bool = False, insecure: bool = False) -> None:
    """Serve the Label Studio ML backend with gunicorn (blocks); ConfigError before anything
    starts when :func:`check_bind` refuses ``host``. ``port``, ``threads`` and ``timeout`` left
    None are the settings' ``backend.server`` values."""
    from ..settings import get_settings

    cfg = get_settings().backend.server
    port = cfg.port if port is None else port
    threads = cfg.threads if threads is None else threads
    timeout = cfg.timeout_s if timeout is None else timeout
    warning = check_bind(host, insecure=insecure)
    if warning:
        print(f"semlabel: WARNING: {warning}", file=sys.stderr, flush=True)

    def factory():
        from .app import create_app

        return create_app()

    print(f"semlabel: serving on http://{host}:{port} ({workers} worker(s) x {threads} thread(s))",
          file=sys.stderr, flush=True)
    run_gunicorn(factory, host=host, port=port, workers=workers, threads=threads, timeout=timeout,
                 graceful_timeout=cfg.graceful_timeout_s, access_log=access_log)


def setup_logging(verbose: int = 0) -> None:
    """One line per record on stderr (``semlabel: LEVEL: message``); third-party libraries
    at errors only."""
    import logging

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("semlabel: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("sentence_transformers", "transformers", "huggingface_hub", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)


class QuitOnceThreadWorker(ThreadWorker):
    """gunicorn's threaded worker, quitting once however many quit signals arrive
    (``gunicorn -k backend.ls.server.QuitOnceThreadWorker``; ``semlabel serve`` uses it).

    Ctrl-C reaches the whole process group: the worker gets SIGINT itself and a SIGQUIT from
    the arbiter. gthread's quit handler shuts its thread pool down; a second signal arriving
    inside that shutdown re-enters it, blocks on the pool's own lock, and the worker hangs
    until the arbiter kills it after ``graceful_timeout``."""

    _quitting = False

    def handle_quit(self, sig, frame):
        if self._quitting:
            return
        self._quitting = True
        super().handle_quit(sig, frame)


def run_gunicorn(factory: Callable, *, host: str, port: int, workers: int, threads: int, timeout: int,
                 graceful_timeout: int, access_log: bool = False) -> None:
    """Serve ``factory()`` (called in each worker) with gunicorn's threaded workers; blocks."""
    from gunicorn.app.base import BaseApplication

    multiproc_dir = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiproc_dir = tempfile.mkdtemp(prefix="semlabel-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir

    def child_exit(server, worker):
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.pid)

    options = {
        "bind": f"{host}:{port}",
        "workers": workers,
        "threads": threads,
        "worker_class": QuitOnceThreadWorker,
        # /predict may take Label Studio's whole 100 s on a large batch of new images.
        "timeout": timeout,
        "graceful_timeout": graceful_timeout,
        "accesslog": "-" if access_log else None,
        "child_exit": child_exit,
        # gunicorn >= 27: no control socket (one fixed path per user; several servers collide).
        "control_socket_disable": True,
    }

    class _App(BaseApplication):
        def load_config(self):
            for key, value in options.items():
                if value is not None and key in self.cfg.settings:
                    self.cfg.set(key, value)

        def load(self):
            return factory()

    try:
        _App().run()
    finally:
        if multiproc_dir:
            shutil.rmtree(multiproc_dir, ignore_errors=True)


class ServerProcess:
    """The backend (``python -m backend.ls``) as a child process on a free port, ready when
    ``/health`` says so; ``args``: more of its options (``--threads 8``)."""

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None, env: dict | None = None,
                 args: tuple[str, ...] = (), log_path: str | Path | None = None, cwd: str | Path | None = None):
        self.host = host
        self.cwd = cwd
        self.port = port or free_port(host)
        self.env = {**os.environ, **(env or {})}
        self.args = tuple(args)
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="semlabel-serve-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.ready_in_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "backend.ls", "--host", self.host, "--port", str(self.port), *self.args]

    def start(self, timeout: float = 180.0) -> "ServerProcess":
        return self.launch().wait_ready(timeout)

    def launch(self) -> "ServerProcess":
        """Start the process without waiting (see :meth:`wait_ready`)."""
        self._started = time.perf_counter()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.cwd)
        log.close()
        return self

    def wait_ready(self, timeout: float = 180.0) -> "ServerProcess":
        import requests

        started = self._started
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the backend exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    self.ready_in_s = round(time.perf_counter() - started, 2)
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"the backend is not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
