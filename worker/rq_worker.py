"""``semlabel worker``: an RQ worker (RQ's own ``Worker``) on semlabel's queues.

- Queues from ``configs: worker.queues`` — ``gpu`` (training) and optionally ``cpu``
  (feature extraction); the RQ scheduler runs inside the worker (``with_scheduler``), so the
  debounced, delayed training jobs and the retries with backoff are enqueued on time. Several
  workers may run against one Redis: RQ elects one scheduler per queue, and a Redis lock per
  project (``<prefix>:training:<project>``) makes a project train on one worker at a time.
- The device is chosen once at start and logged: ``backbone.device`` when set, else CUDA when
  present, else the CPU. Each job runs in a forked work horse (RQ's default), so a job that
  dies takes nothing else with it. On the CPU the parent loads the backbone once before
  forking, and every job shares it; CUDA must not be initialised before a fork, so with CUDA
  each job loads the backbone itself.
- Jobs are read with RQ's JSON serializer (:func:`backend.queue.contract.job_serializer`), never
  unpickled: a job planted in Redis cannot run code here.
- :func:`local_stack` is the one-machine setup behind ``semlabel serve --with-worker``: a
  Redis (``REDIS_URL``, a local one, or an embedded valkey-server with append-only
  persistence) and a worker subprocess, both stopped on exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from backend.redis.connection import EmbeddedRedis, ensure_redis, redact, redis_client
from backend.settings import Settings, get_settings, reload_settings

log = logging.getLogger(__name__)

DEVICE_ENV = "SEMLABEL_BACKBONE__DEVICE"


def choose_device(settings: Settings) -> str:
    """``backbone.device`` unless ``auto``; then ``cuda`` when a GPU is usable, else ``cpu``.

    Uses the NVML-based check so the parent process never creates a CUDA context (the work
    horses are forked from it)."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    wanted = settings.backbone.device
    if wanted and wanted != "auto":
        return wanted
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def queue_names(settings: Settings, queues: list[str] | None = None, with_features: bool = True) -> list[str]:
    if queues:
        return queues
    names = [settings.worker.queues.train]
    if with_features and settings.worker.queues.features:
        names.append(settings.worker.queues.features)
    return names


def _semlabel_worker_class():
    from rq import Worker

    class SemlabelWorker(Worker):
        """RQ's forking worker, plus a readable reason when a job's work horse is killed."""

        horse_threads: int | None = None

        def main_work_horse(self, job, queue):
            if self.horse_threads:
                import torch

                torch.set_num_threads(self.horse_threads)
            return super().main_work_horse(job, queue)

        def handle_work_horse_killed(self, job, retpid, ret_val, rusage):
            super().handle_work_horse_killed(job, retpid, ret_val, rusage)
            from worker.jobs.progress import note_failure

            how = f"signal {os.WTERMSIG(ret_val)}" if ret_val and os.WIFSIGNALED(ret_val) else f"status {ret_val}"
            peak = f", peak RSS {rusage.ru_maxrss / 1024:.0f} MB" if rusage is not None else ""
            retry = " (will be retried)" if (job.retries_left or 0) > 0 else ""
            note_failure(job, f"work horse {retpid} killed by {how}{peak} on {self.hostname}{retry}",
                         get_settings().worker.failures_kept)

    return SemlabelWorker


def run_worker(
    settings: Settings | None = None,
    queues: list[str] | None = None,
    *,
    burst: bool = False,
    name: str | None = None,
    max_jobs: int | None = None,
    with_scheduler: bool = True,
    preload: bool = True,
    logging_level: str = "INFO",
) -> bool:
    """Run an RQ worker until stopped (SIGTERM/SIGINT: warm shutdown) or, with ``burst``,
    until the queues are empty. Returns whether it did any job."""
    from backend.queue.contract import job_serializer, queue

    SemlabelWorker = _semlabel_worker_class()
    settings = settings or get_settings()
    device = choose_device(settings)
    os.environ[DEVICE_ENV] = device
    settings = reload_settings()
    connection = redis_client(settings)
    names = queue_names(settings, queues)
    import torch

    gpu = ""
    if device.startswith("cuda"):
        with contextlib.suppress(Exception):
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            gpu = " (" + pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0)) + ")"
    log.warning("semlabel worker: device %s%s, torch %s, queues %s, Redis %s", device, gpu, torch.__version__,
                ",".join(names), redact(_url_of(connection)))
    if preload and settings.worker.preload and not device.startswith("cuda"):
        from worker.jobs.runtime import preload as preload_backbone

        # The parent stays single-threaded in torch: an OpenMP thread pool created before a
        # fork deadlocks the forked work horse. Each horse gets the threads back.
        SemlabelWorker.horse_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        preload_backbone(settings)
    worker = SemlabelWorker(
        [queue(connection, n) for n in names],
        connection=connection,
        name=name,
        # Jobs are JSON (arguments, meta, results): nothing read from Redis is ever unpickled.
        serializer=job_serializer(),
        job_monitoring_interval=settings.worker.job_monitoring_interval_s,
        maintenance_interval=settings.worker.maintenance_interval_s,
        # An idle RQ worker blocks on the queues for worker_ttl − 15 s between heartbeats
        # (and maintenance runs): keep that to the maintenance interval, so health checks
        # and the retry of dead workers' jobs happen on time.
        worker_ttl=settings.worker.maintenance_interval_s + settings.worker.worker_ttl_margin_s,
    )
    return worker.work(burst=burst, with_scheduler=with_scheduler, max_jobs=max_jobs, logging_level=logging_level)


def healthy_workers(settings: Settings | None = None, hostname: str | None = None) -> list[str]:
    """Names of the RQ workers of this host on semlabel's training queue whose heartbeat is
    current (for container health checks)."""
    import socket

    from rq import Worker

    from backend.queue.contract import queue as _queue

    settings = settings or get_settings()
    connection = redis_client(settings)
    hostname = hostname or socket.gethostname()
    queue = _queue(connection, settings.worker.queues.train)
    # A busy worker beats every job_monitoring_interval_s, an idle one every
    # maintenance_interval_s (its worker_ttl − 15, see run_worker).
    limit = max(settings.worker.job_monitoring_interval_s, settings.worker.maintenance_interval_s) + settings.worker.heartbeat_grace_s
    out = []
    for w in Worker.all(queue=queue):
        beat = w.last_heartbeat
        if w.hostname == hostname and beat is not None:
            age = time.time() - beat.timestamp()
            if age < limit:
                out.append(w.name)
    return out


def _url_of(client) -> str:
    kw = client.connection_pool.connection_kwargs
    if "path" in kw:
        return f"unix://{kw['path']}"
    return f"redis://{kw.get('host')}:{kw.get('port')}/{kw.get('db', 0)}"


# ---------------------------------------------------------------------------- local stack
@dataclass
class LocalStack:
    redis_url: str
    embedded: EmbeddedRedis | None
    worker: subprocess.Popen | None


def worker_command(extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "worker.cli", "worker", *extra]


@contextlib.contextmanager
def local_stack(settings: Settings | None = None, *, with_worker: bool = True, worker_args=(),
                worker_log: Path | None = None):
    """Redis and a worker for one machine, for the life of the ``with`` block.

    Redis: ``REDIS_URL`` if set (error if it does not answer), else one answering on
    127.0.0.1:6379, else an embedded valkey-server with append-only persistence in
    ``<data_dir>/redis``. Sets ``REDIS_URL`` in this process's environment (and reloads the
    settings) so everything started after it — the backend app included — uses that server.
    Stops the worker (warm shutdown: the job in progress finishes or is retried later) and the
    embedded server on exit.
    """
    import threading

    settings = settings or get_settings()
    url, embedded = ensure_redis(settings, allow_embedded=True)
    os.environ["REDIS_URL"] = url
    settings = reload_settings()
    proc = None
    previous = None
    owner = os.getpid()
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
            signal.SIG_DFL, None):
        # `docker stop` / systemd send SIGTERM: unwind through the finally below.
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if with_worker:
            out = open(worker_log, "ab") if worker_log else None
            proc = subprocess.Popen(worker_command(list(worker_args)), env=dict(os.environ),
                                    stdout=out, stderr=subprocess.STDOUT if out else None)
            log.warning("started a semlabel worker (pid %d) on Redis %s", proc.pid, redact(url))
        yield LocalStack(url, embedded, proc)
    finally:
        # A process forked inside the block (a gunicorn worker) unwinds through here when it
        # exits: the worker and the server belong to the parent, only the parent stops them.
        if os.getpid() == owner:
            _stop_local_stack(proc, embedded, previous)


def _stop_local_stack(proc, embedded, previous_sigterm) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # RQ: a second SIGTERM is a cold shutdown
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if embedded is not None:
        # Let the worker's last writes land before the server flushes its log and exits.
        time.sleep(0.1)
        embedded.stop()
    if previous_sigterm is not None:
        signal.signal(signal.SIGTERM, previous_sigterm)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)
