"""``semlabel bench-api`` and ``semlabel bench-attack``: the backend's latency over HTTP.

Both start the backend (``python -m backend.ls``) on a free port, send real photos as tasks and
write JSON and markdown reports to ``--out``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import uuid
from pathlib import Path

import click


def register(main: click.Group) -> None:
    main.add_command(bench_api)
    main.add_command(bench_attack)


# ------------------------------------------------------------------------------- bench-api
BENCH_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="labels" toName="image" choice="multiple">
    {choices}
  </Choices>
</View>"""
BENCH_LABELS = ["dog", "horse", "person", "giraffe", "bird", "kite", "car", "cat", "coffee cup", "rocket"]


def _base_photos() -> list:
    """Real photos: the darknet sample images when installed, plus scikit-image's."""
    from PIL import Image

    photos = []
    darknet = Path("/usr/share/darknet/data")
    for path in sorted(darknet.glob("*.jpg")) if darknet.is_dir() else []:
        photos.append(Image.open(path).convert("RGB"))
    try:
        from skimage import data

        for name in ("chelsea", "coffee", "rocket", "astronaut", "camera"):
            photos.append(Image.fromarray(getattr(data, name)()).convert("RGB"))
    except Exception:  # noqa: BLE001 - scikit-image is optional
        pass
    if not photos:
        raise click.ClickException("no photos found (install the darknet package or scikit-image)")
    return photos


def _variants(photos, n: int, out: Path, salt: str) -> list[str]:
    """``n`` distinct image files (a photo with one salted pixel changed): never cached."""
    import hashlib

    paths = []
    for i in range(n):
        img = photos[i % len(photos)].copy()
        digest = hashlib.sha256(f"{salt}:{i}".encode()).digest()
        img.putpixel((digest[0] % img.width, digest[1] % img.height), tuple(digest[2:5]))
        path = out / f"img-{salt}-{i:04d}.png"
        img.save(path)
        paths.append(str(path))
    return paths


def _images_dir(out_dir: Path) -> Path:
    """``<out>/images`` (created): the task images, under the server's local root."""
    images = (out_dir / "images").resolve()
    images.mkdir(parents=True, exist_ok=True)
    return images


def _start_server(images: Path, server_args: str, log_path: Path):
    """The backend on a free port, serving files under ``images``, without review jobs
    (without ``--project`` nothing is written to Redis either)."""
    from backend.ls.server import ServerProcess

    env = {"SEMLABEL_IMAGES__LOCAL_ROOTS": json.dumps([str(images)]), "SEMLABEL_BACKEND__REVIEW__ENABLED": "false",
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    server = ServerProcess(env=env, args=tuple(server_args.split()), log_path=log_path)
    click.echo(f"starting the backend on {server.url} ...", err=True)
    return server.start()


def _median(values) -> float:
    return round(statistics.median(values), 4)


def _write_api_report(out_dir: Path, server, health: dict, project, runs: int, batch: int,
                      timings: dict, health_times: list) -> None:
    """api-bench.json and api-bench.md from the measured timings."""
    import platform

    import torch

    med = {k: _median(v) for k, v in timings.items()}
    report = {
        "server": server.url,
        "server_ready_s": server.ready_in_s,
        "backbone": health.get("backbone"),
        "model_version": health.get("model_version"),
        "project": project,
        "labels": len(BENCH_LABELS),
        "runs": runs,
        "batch": batch,
        "median_s": med,
        "per_task_ms": {k: round(1000 * v / (1 if k.endswith("_1") else batch), 1) for k, v in med.items()},
        "ratios": {
            "cold_over_warm_1": round(med["cold_1"] / med["warm_1"], 2),
            f"cold_over_warm_{batch}": round(med[f"cold_{batch}"] / med[f"warm_{batch}"], 2),
            f"warm_{batch}_over_warm_1": round(med[f"warm_{batch}"] / med["warm_1"], 2),
            f"cold_{batch}_over_cold_1": round(med[f"cold_{batch}"] / med["cold_1"], 2),
        },
        "health_median_ms": round(1000 * statistics.median(health_times), 2),
        "all_s": {k: [round(x, 4) for x in v] for k, v in timings.items()},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                    "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
    }
    (out_dir / "api-bench.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# /predict latency (the backend, measured over HTTP)",
        "",
        f"Backbone `{report['backbone']}`, {len(BENCH_LABELS)} labels, median of {runs} runs; "
        f"cold = image bytes the feature cache has never seen, warm = the same tasks again.",
        "",
        "| request | cold (s) | warm (s) | cold / warm | per task warm (ms) |",
        "|---|---|---|---|---|",
    ]
    for n in (1, batch):
        c, w = med[f"cold_{n}"], med[f"warm_{n}"]
        lines.append(f"| {n} task{'s' if n > 1 else ''} | {c:.3f} | {w:.3f} | {c / w:.1f}× | {1000 * w / n:.1f} |")
    lines += ["", f"`GET /health`: median {report['health_median_ms']} ms. Server ready in "
              f"{report['server_ready_s']} s. Machine: {os.cpu_count()} CPU(s), CUDA "
              f"{'yes' if report['machine']['cuda'] else 'no'}, load average "
              f"{report['machine']['load_average_1m_at_end']} at the end."]
    (out_dir / "api-bench.md").write_text("\n".join(lines) + "\n")
    click.echo((out_dir / "api-bench.md").read_text())
    click.echo(f"report: {out_dir / 'api-bench.json'}", err=True)


@click.command("bench-api")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench-out"), show_default=True)
@click.option("--runs", type=int, default=5, show_default=True, help="Repetitions of each measurement.")
@click.option("--batch", type=int, default=16, show_default=True, help="Tasks in the large request.")
@click.option("--server-args", default="", help="Extra arguments for `python -m backend.ls`, e.g. '--threads 8'.")
@click.option("--project", type=int, default=None,
              help="Project id to send (its trained model is served); default: none, the zero-shot model.")
def bench_api(out_dir: Path, runs: int, batch: int, server_args: str, project: int | None) -> None:
    """Median /predict latency of a running server: 1 and BATCH tasks, cold and warm features.

    Starts the backend on a free port, sends real photos as tasks (cold: bytes the feature
    cache has never seen; warm: the same tasks again), and writes api-bench.json and
    api-bench.md to --out."""
    import requests

    images = _images_dir(out_dir)
    salt = uuid.uuid4().hex[:8]
    photos = _base_photos()
    warmup = _variants(photos, 1, images, salt + "w")
    singles = _variants(photos, runs, images, salt + "s")
    batches = [_variants(photos[r % len(photos):] + photos, batch, images, f"{salt}b{r}") for r in range(runs)]
    config = BENCH_CONFIG.format(choices="\n    ".join(f'<Choice value="{n}"/>' for n in BENCH_LABELS))

    server = _start_server(images, server_args, out_dir / "server.log")
    session = requests.Session()

    def predict(paths: list[str]) -> float:
        tasks = [{"id": i + 1, "data": {"image": p}} for i, p in enumerate(paths)]
        body = {"tasks": tasks, "label_config": config,
                "params": {"login": None, "password": None, "context": None}}
        if project is not None:
            body["project"] = f"{project}.0"
        t0 = time.perf_counter()
        resp = session.post(server.url + "/predict", json=body, timeout=300)
        elapsed = time.perf_counter() - t0
        resp.raise_for_status()
        results = resp.json()["results"]
        bad = [r for r in results if "result" not in r]
        if len(results) != len(paths) or bad:
            raise click.ClickException(f"/predict answered {len(results)} results, errors: {bad[:2]}")
        return elapsed

    try:
        health = session.get(server.url + "/health", timeout=5).json()
        predict(warmup)  # label-space text embeddings and first-call costs, not measured
        timings = {"cold_1": [], "warm_1": [], f"cold_{batch}": [], f"warm_{batch}": []}
        for r in range(runs):
            timings["cold_1"].append(predict([singles[r]]))
            timings["warm_1"].append(predict([singles[r]]))
            timings[f"cold_{batch}"].append(predict(batches[r]))
            timings[f"warm_{batch}"].append(predict(batches[r]))
            click.echo(f"run {r + 1}/{runs}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in timings.items()),
                       err=True)
        health_times = []
        for _ in range(20):
            t0 = time.perf_counter()
            session.get(server.url + "/health", timeout=5).raise_for_status()
            health_times.append(time.perf_counter() - t0)
    finally:
        server.stop()
    _write_api_report(out_dir, server, health, project, runs, batch, timings, health_times)


# ---------------------------------------------------------------------------- bench-attack
def _percentile(values, q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


def _write_attack_report(out_dir: Path, n_labels, concurrent, waves, server_args, baseline, during, during_flags,
                         large_s, large_status, large_total) -> None:
    """attack-bench.json and attack-bench.md from the measured latencies."""
    import platform

    ok = [t for t, status in during if status == 200]
    report = {
        "labels": n_labels,
        "concurrent": concurrent,
        "waves": waves,
        "server_args": server_args,
        "baseline_small_s": {"p50": _percentile([t for t, _ in baseline], 0.5),
                             "p95": _percentile([t for t, _ in baseline], 0.95),
                             "max": round(max(t for t, _ in baseline), 4)},
        "during_embedding_small_s": {"n": len(during), "ok": len(ok),
                                     "p50": _percentile([t for t, _ in during], 0.5),
                                     "p95": _percentile([t for t, _ in during], 0.95),
                                     "max": round(max(t for t, _ in during), 4)},
        "large_still_embedding_after_each_wave": during_flags,
        "large_request_s": round(large_s, 2),
        "large_request_status": large_status,
        "large_since_start_s": round(large_total, 2),
        "p95_under_1s": _percentile([t for t, _ in during], 0.95) < 1.0,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
    }
    (out_dir / "attack-bench.json").write_text(json.dumps(report, indent=2))
    d, b = report["during_embedding_small_s"], report["baseline_small_s"]
    md = [
        "# Small /predict requests while a large label config is being embedded",
        "",
        f"{concurrent} concurrent one-task requests (known 10-label config, cached features), {waves} waves "
        f"while one request with {n_labels} new labels was being embedded (it took {report['large_request_s']} s, "
        f"HTTP {large_status}); still embedding after each wave: {during_flags}.",
        "",
        "| small requests | p50 (s) | p95 (s) | max (s) |",
        "|---|---|---|---|",
        f"| before (nothing embedding) | {b['p50']} | {b['p95']} | {b['max']} |",
        f"| during the embedding ({d['n']}, {d['ok']} ok) | {d['p50']} | {d['p95']} | {d['max']} |",
        "",
        f"Machine: {os.cpu_count()} CPU(s), load average {report['machine']['load_average_1m_at_end']} at the end.",
    ]
    (out_dir / "attack-bench.md").write_text("\n".join(md) + "\n")
    click.echo("\n".join(md))


@click.command("bench-attack")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench-out"), show_default=True)
@click.option("--labels", "n_labels", type=int, default=5000, show_default=True,
              help="Choices of the large label config (new, never embedded before).")
@click.option("--concurrent", type=int, default=50, show_default=True, help="Small /predict requests at once.")
@click.option("--waves", type=int, default=3, show_default=True,
              help="Waves of concurrent small requests while the large config is being embedded.")
@click.option("--server-args", default="--threads 8", show_default=True, help="Arguments for `python -m backend.ls`.")
def bench_attack(out_dir: Path, n_labels: int, concurrent: int, waves: int, server_args: str) -> None:
    """Small /predict requests while a large new label config is being embedded.

    Starts the backend, warms a 10-label config and a few images, then sends one /predict
    with an N-label config nobody has embedded yet and, while it runs, waves of CONCURRENT
    one-task requests with the small config. Writes attack-bench.json / .md to --out with the
    small requests' latency percentiles, before and during the embedding."""
    from concurrent.futures import ThreadPoolExecutor

    import requests

    images = _images_dir(out_dir)
    salt = uuid.uuid4().hex[:8]
    small_images = _variants(_base_photos(), 4, images, salt + "a")
    small = BENCH_CONFIG.format(choices="\n    ".join(f'<Choice value="{n}"/>' for n in BENCH_LABELS))
    large = BENCH_CONFIG.format(choices="\n    ".join(f'<Choice value="item {salt} {i}"/>' for i in range(n_labels)))
    server = _start_server(images, server_args, out_dir / "attack-server.log")

    def predict(path: str, cfg: str, timeout: float = 60) -> tuple[float, int]:
        body = {"tasks": [{"id": 1, "data": {"image": path}}], "label_config": cfg}
        t0 = time.perf_counter()
        resp = requests.post(server.url + "/predict", json=body, timeout=timeout)
        return time.perf_counter() - t0, resp.status_code

    def wave(pool) -> list[tuple[float, int]]:
        jobs = [pool.submit(predict, small_images[i % len(small_images)], small) for i in range(concurrent)]
        return [j.result() for j in jobs]

    try:
        for path in small_images:
            predict(path, small)  # labels embedded, features cached: the small requests are warm
        with ThreadPoolExecutor(max_workers=concurrent + 1) as pool:
            baseline = wave(pool)
            t0 = time.perf_counter()
            large_job = pool.submit(predict, small_images[0], large, 900)
            time.sleep(1.0)  # the large request is in the server, embedding
            during, during_flags = [], []
            for _ in range(waves):
                results = wave(pool)
                during += results
                during_flags.append(not large_job.done())
            large_s, large_status = large_job.result()
            large_total = time.perf_counter() - t0
    finally:
        server.stop()
    _write_attack_report(out_dir, n_labels, concurrent, waves, server_args, baseline, during, during_flags,
                         large_s, large_status, large_total)
    if not all(during_flags):
        click.echo("note: the large config finished embedding before the last wave; raise --labels", err=True)
