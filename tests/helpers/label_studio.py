"""A real Label Studio for the end-to-end tests: installed, migrated and started by the suite.

- Install: ``label-studio==1.23.2`` into its own virtualenv (made by the interpreter running the
  tests), cached under ``~/.cache/semlabel-tests/label-studio-<version>-py<X.Y>/venv``
  (``SEMLABEL_TEST_CACHE`` moves the cache). ~1 GB, about a minute, once.
- Template: a data directory migrated once (~40 s) with an admin user, a known legacy token and
  legacy tokens enabled for the organization; cached beside the virtualenv. Every test run
  copies it and starts Label Studio on the copy in ~5 s.
- Start: ``127.0.0.1`` on a free port, sqlite, ``ML_BLOCK_LOCAL_IP=false
  SSRF_PROTECTION_ENABLED=false`` (backend and webhooks on localhost), local-file serving from a
  document root the test chooses, no Sentry, no version check.

Concurrent test sessions share the cache safely (a file lock around install and template).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import requests

from backend.store.files import flocked
from backend.net import free_port

LS_VERSION = os.environ.get("SEMLABEL_TEST_LS_VERSION", "1.23.2")
USERNAME = "admin@example.com"
PASSWORD = "Passw0rd!semlabel"
TOKEN = "5e1ab5e1ab5e1ab5e1ab5e1ab5e1ab5e1ab5e1ab"

# Variables Label Studio's get_env() would pick up under their bare names.
_SCRUB = ("HOST", "PORT", "USERNAME", "PASSWORD", "DEBUG", "DJANGO_DB", "DJANGO_SETTINGS_MODULE")


class LabelStudioUnavailable(RuntimeError):
    pass


def cache_home() -> Path:
    base = Path(os.environ.get("SEMLABEL_TEST_CACHE", "~/.cache/semlabel-tests")).expanduser()
    return base / f"label-studio-{LS_VERSION}-py{sys.version_info.major}.{sys.version_info.minor}"


@contextmanager
def _locked(path: Path):
    """The store's ``flocked`` on a lock file whose folder may not exist yet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with flocked(path):
        yield


def ensure_installed(log=print) -> Path:
    """The ``label-studio`` executable of the cached install (installing it when absent)."""
    home = cache_home()
    venv = home / "venv"
    exe = venv / "bin" / "label-studio"
    marker = home / "installed.ok"
    with _locked(home.parent / f"{home.name}.lock"):
        if marker.is_file() and exe.is_file():
            return exe
        if venv.exists():
            shutil.rmtree(venv)
        log(f"installing label-studio=={LS_VERSION} into {venv} (once; ~1 GB) ...")
        started = time.time()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        proc = subprocess.run([*pip, f"label-studio=={LS_VERSION}"], capture_output=True, text=True)
        if proc.returncode != 0 or not exe.is_file():
            raise LabelStudioUnavailable(
                f"pip install label-studio=={LS_VERSION} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        marker.write_text(f"label-studio {LS_VERSION} installed in {time.time() - started:.0f} s\n")
        log(f"installed in {time.time() - started:.0f} s")
        return exe


def _env(data_dir: Path, document_root: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in _SCRUB and not k.startswith(("LABEL_STUDIO_", "SEMLABEL_", "HEARTEX_", "BASIC_AUTH_"))}
    env.update({
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "PYTHONUNBUFFERED": "1",
    })
    return env


class LabelStudio:
    """One running Label Studio (``url``, ``token``, ``headers``, ``api(...)``)."""

    def __init__(self, exe: Path, data_dir: Path, document_root: Path, port: int | None = None):
        self.exe = exe
        self.data_dir = data_dir
        self.document_root = document_root
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = TOKEN
        self.headers = {"Authorization": f"Token {TOKEN}"}
        self.log_path = data_dir.parent / f"label-studio-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def launch(self) -> "LabelStudio":
        cmd = [str(self.exe), "start", "--no-browser", "--data-dir", str(self.data_dir),
               "--internal-host", "127.0.0.1", "-p", str(self.port), "--host", self.url,
               "--username", USERNAME, "--password", PASSWORD, "--user-token", TOKEN,
               "--enable-legacy-api-token", "--log-level", "WARNING"]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=_env(self.data_dir, self.document_root), stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return self

    def wait_ready(self, timeout: float = 240.0) -> "LabelStudio":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabelStudioUnavailable(f"Label Studio exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    r = requests.get(self.url + "/api/projects", headers=self.headers, timeout=10)
                    if r.status_code == 200:
                        return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise LabelStudioUnavailable(f"Label Studio not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(15)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    # -- REST ---------------------------------------------------------------------------
    def api(self, method: str, path: str, expect: int | tuple[int, ...] | None = None, **kw):
        resp = requests.request(method, self.url + path, headers={**self.headers, **kw.pop("headers", {})},
                                timeout=kw.pop("timeout", 120), **kw)
        if expect is not None:
            codes = (expect,) if isinstance(expect, int) else expect
            assert resp.status_code in codes, f"{method} {path} -> {resp.status_code}: {resp.text[:1000]}"
        try:
            return resp.json() if resp.content else None
        except ValueError:
            return resp.text


def ensure_template(exe: Path, log=print) -> Path:
    """A migrated data dir with the test user and legacy tokens enabled (built once)."""
    home = cache_home()
    template = home / "template"
    marker = template / ".semlabel-template-ok"
    with _locked(home.parent / f"{home.name}.template.lock"):
        if marker.is_file():
            return template
        log("migrating a Label Studio template data dir (once; ~40 s) ...")
        started = time.time()
        work = Path(tempfile.mkdtemp(prefix="ls-template-", dir=home))
        data = work / "data"
        data.mkdir()
        docroot = work / "files"
        docroot.mkdir()
        ls = LabelStudio(exe, data, docroot).launch()
        try:
            ls.wait_ready(timeout=600)
            settings = ls.api("GET", "/api/jwt/settings", expect=200)
            if not settings.get("legacy_api_tokens_enabled"):
                ls.api("POST", "/api/jwt/settings", expect=(200, 201),
                       json={**settings, "legacy_api_tokens_enabled": True})
        finally:
            ls.stop()
        for stray in data.glob("*.log"):
            stray.unlink()
        (data / marker.name).write_text(f"migrated in {time.time() - started:.0f} s\n")
        if template.exists():
            shutil.rmtree(template)
        os.replace(data, template)
        shutil.rmtree(work, ignore_errors=True)
        log(f"template ready in {time.time() - started:.0f} s")
        return template


def start_label_studio(workdir: Path, document_root: Path, log=print) -> LabelStudio:
    """Install (cached), copy the template (cached) and launch; call ``wait_ready()`` after."""
    exe = ensure_installed(log)
    template = ensure_template(exe, log)
    data = workdir / "ls-data"
    shutil.copytree(template, data, symlinks=True)
    return LabelStudio(exe, data, document_root).launch()


def start_label_studio_for_test(workdir: Path, document_root: Path, tag: str) -> LabelStudio:
    """:func:`start_label_studio` and wait until it answers. When it cannot be installed or
    started the test is skipped — or fails under CI (``CI`` set), where it must run."""
    import pytest

    try:
        ls = start_label_studio(workdir, document_root, log=lambda m: print(f"[{tag}] {m}", flush=True))
        ls.wait_ready()
    except (LabelStudioUnavailable, OSError, subprocess.CalledProcessError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Label Studio could not be installed or started: {exc}")
        pytest.skip(f"Label Studio could not be installed or started: {exc}")
    return ls
