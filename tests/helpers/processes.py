"""Child processes in tests: the ``semlabel`` CLI run to completion, and RQ workers that run
beside a test with a log file each, stopped (SIGTERM, then SIGKILL) when it ends.

The CLI runs as ``python -m worker.cli`` from the repository with this interpreter, so the
tests exercise the checkout, not whatever ``semlabel`` is first on PATH (``test_cli`` tests
the installed entry point itself).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

#: The repository root (the child processes' working directory).
REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """``semlabel ARGS`` to completion, stdout and stderr captured as text; ``env``: the
    child's whole environment (``None``: this process's)."""
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def stop_all(procs, timeout: float = 30.0) -> None:
    """SIGTERM to every process still running, then wait up to ``timeout`` s for each and
    kill the ones that have not exited by then."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Workers:
    """``semlabel -v worker --name NAME ...`` child processes, each logging to ``logs/NAME.log``.

    ``env``: their whole environment (``None``: this process's at each start), to which a
    start's own ``env`` adds."""

    def __init__(self, logs: Path, env: dict | None = None):
        self.logs = Path(logs)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *extra: str, env: dict | None = None) -> subprocess.Popen:
        base = os.environ if self.env is None else self.env
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "-v", "worker", "--name", name, *extra],
                                    cwd=REPO, env={**base, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def __getitem__(self, name: str) -> subprocess.Popen:
        return self.procs[name]

    def log(self, name: str, tail: int | None = None) -> str:
        """What worker ``name`` wrote (its last ``tail`` characters when given)."""
        text = (self.logs / f"{name}.log").read_text(errors="replace")
        return text if tail is None else text[-tail:]

    def stop(self, timeout: float = 30.0) -> None:
        stop_all(self.procs.values(), timeout)
