"""The ``semlabel`` command.

Every command prints one clear line per problem on stderr (``semlabel: error: ...``) and
exits non-zero; tracebacks only with ``--debug`` (or ``SEMLABEL_DEBUG=1``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from backend.errors import SemlabelError

log = logging.getLogger("semlabel")

EXIT_INPUT_ERROR = 1


def error_line(message: str) -> None:
    click.echo(f"semlabel: error: {message}", err=True)


class _Group(click.Group):
    """Turns every expected failure into one line on stderr and a non-zero exit."""

    def invoke(self, ctx):
        debug = os.environ.get("SEMLABEL_DEBUG") == "1" or "--debug" in sys.argv
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except SemlabelError as exc:
            if debug:
                raise
            error_line(str(exc))
            ctx.exit(EXIT_INPUT_ERROR)
        except KeyboardInterrupt:
            error_line("interrupted")
            ctx.exit(130)
        except Exception as exc:  # noqa: BLE001 - the last line of defence of a CLI
            if debug:
                raise
            error_line(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)")
            ctx.exit(EXIT_INPUT_ERROR)


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="semlabel")
def main(verbose: int, debug: bool) -> None:
    """semlabel: a Label Studio ML backend that proposes the labels annotators missed."""
    from backend.ls.server import setup_logging

    setup_logging(verbose)


# --------------------------------------------------------------------------- doctor
@main.command()
def doctor() -> None:
    """Show the backbone in use and why, the torch device, Redis and the data locations."""
    import torch

    from backend.runtime import Runtime
    from backend.settings import get_settings

    settings = get_settings()
    report: dict = {"config_dir": None, "data_dir": str(settings.data_path)}
    from backend.settings import config_dir

    report["config_dir"] = str(config_dir())
    report["torch"] = {
        "version": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    report["redis"] = _redis_status(settings)
    runtime = Runtime.create(settings)
    report["backbone"] = runtime.backbone.describe()
    report["feature_store"] = {
        "path": str(runtime.features.dir),
        "size_bytes": runtime.features.size_bytes(),
        "max_size_gb": settings.features.max_size_gb,
    }
    report["label_studio_url"] = settings.label_studio_url or None
    for key, value in report.items():
        click.echo(f"{key:>14}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    if not report["redis"]["reachable"]:
        click.echo(
            "    note: no Redis answers; `semlabel serve --with-worker` starts an embedded one", err=True
        )


def _redis_status(settings) -> dict:
    """The Redis semlabel would use (REDIS_URL, a running embedded one, or localhost)."""
    from backend.errors import RedisUnavailable
    from backend.redis.connection import redact, redis_client, resolve_redis_url

    url = resolve_redis_url(settings)
    try:
        redis_client(settings, url).close()
        return {"url": redact(url), "reachable": True}
    except RedisUnavailable as exc:
        return {"url": redact(url), "reachable": False, "error": str(exc)[:200]}


# -------------------------------------------------------------------------- predict
@main.command()
@click.option("--labels", required=True, help="Comma-separated label names, e.g. cat,dog,car.")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="A trained model directory (default: zero-shot scores).")
@click.option("--table", "as_table", is_flag=True, help="A readable table instead of JSON.")
@click.option("--backbone", type=click.Choice(["auto", "open_clip", "packaged"]), default=None,
              help="Override backbone.kind.")
@click.argument("images", nargs=-1, required=True)
def predict(labels: str, model_dir: Path | None, as_table: bool, backbone: str | None,
            images: tuple[str, ...]) -> None:
    """Score every label for every IMAGE (path or URL); JSON unless --table."""
    from backend.runtime import Runtime

    names = [n.strip() for n in labels.split(",") if n.strip()]
    if not names:
        raise click.BadParameter("no label names given", param_hint="--labels")
    runtime = Runtime.create(backbone_kind=backbone)
    space = runtime.label_space(names)
    feats = runtime.features_for(list(images))
    good = [(src, f) for src, f in zip(images, feats) if not isinstance(f, SemlabelError)]
    bad = [f for f in feats if isinstance(f, SemlabelError)]
    results = []
    if good:
        if model_dir is not None:
            probs = _trained_scores(runtime, model_dir, [f for _, f in good], space)
        else:
            probs = runtime.zero_shot([f for _, f in good], space)
        for (source, _), row in zip(good, probs.tolist()):
            results.append({"image": source, "scores": {n: round(p, 4) for n, p in zip(names, row)}})
    for err in bad:
        error_line(str(err))
    payload = {
        "backbone": runtime.backbone.name,
        "model": str(model_dir) if model_dir else "zero-shot",
        "labels": names,
        "results": results,
        "errors": [{"image": e.source, "error": str(e)} for e in bad],
        "features": {"computed": runtime.features.computed, "cached": runtime.features.hits},
    }
    if as_table:
        _print_table(results, names)
    else:
        click.echo(json.dumps(payload, indent=2))
    if bad:
        sys.exit(EXIT_INPUT_ERROR)


def _trained_scores(runtime, model_dir: Path, features, space):
    from worker.cli.model import trained_scores

    return trained_scores(runtime, model_dir, features, space)


def _print_table(results: list[dict], names: list[str]) -> None:
    width = max([len(n) for n in names] + [5])
    for result in results:
        click.echo(result["image"])
        ranked = sorted(result["scores"].items(), key=lambda kv: -kv[1])
        for name, score in ranked:
            bar = "#" * int(round(score * 20))
            click.echo(f"  {name:<{width}}  {score:6.3f}  {bar}")


@main.command("bench-predict")
@click.option("--labels", default="cat,dog,person,horse,bird,car,coffee cup,rocket", show_default=True)
@click.option("--runs", type=int, default=3, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench-out"), show_default=True)
@click.argument("images", nargs=-1, required=True)
def bench_predict(labels: str, runs: int, out_dir: Path, images: tuple[str, ...]) -> None:
    """Time `semlabel predict` on IMAGES, cold and warm features; JSON + markdown report."""
    from worker.bench.predict import run

    run([str(Path(i).resolve()) for i in images], labels, runs, out_dir)
    click.echo((out_dir / "predict-bench.md").read_text())
    click.echo(f"report: {out_dir / 'predict-bench.json'}", err=True)


# ------------------------------------------------------------------------- features
@main.group()
def features() -> None:
    """The on-disk feature cache."""


@features.command("gc")
@click.option("--max-gb", type=float, default=None, help="Size bound (default: features.max_size_gb).")
@click.option("--max-age-days", type=float, default=None, help="Also drop entries unused this long.")
def features_gc(max_gb: float | None, max_age_days: float | None) -> None:
    """Delete least-recently-used cached features until the cache fits its bound."""
    from backend.features import FeatureStore
    from backend.settings import get_settings

    settings = get_settings()
    limit = max_gb if max_gb is not None else settings.features.max_size_gb

    class _AnyBackbone:  # gc spans all backbones; no model needs loading
        fingerprint = "-"

    store = FeatureStore(settings.features_path, _AnyBackbone())
    result = store.gc(
        max_bytes=int(limit * 2**30),
        max_age_s=max_age_days * 86400 if max_age_days is not None else None,
    )
    click.echo(json.dumps(result))


# The other commands, one module per area (each imports its heavy parts only when run).
from worker.cli import model as _model_commands  # noqa: E402  train, eval, bench, paper
from worker.bench import latency as _latency_commands  # noqa: E402  bench-api, bench-attack
from worker.cli import serve as _serve_commands  # noqa: E402  serve, suggest
from worker.cli import spot as _spot_commands  # noqa: E402  bench-spot
from worker.cli import worker as _worker_commands  # noqa: E402  worker, models

for _commands in (_worker_commands, _serve_commands, _latency_commands, _model_commands, _spot_commands):
    _commands.register(main)


