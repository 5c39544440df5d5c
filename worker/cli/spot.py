"""``semlabel bench-spot``: point-hit rate and interactive latency of spot suggestions."""

from __future__ import annotations

import json
from pathlib import Path

import click


def register(main: click.Group) -> None:
    main.add_command(bench_spot)


@click.command("bench-spot")
@click.option("--fixture", type=click.Path(exists=True, path_type=Path),
              default=Path("tests/data/spot_points.json"), show_default=True,
              help="Photos' labels and hand-placed points/boxes (JSON).")
@click.option("--photos", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=Path("tests/data/photos"), show_default=True, help="Folder of the darknet photos.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench-out"), show_default=True)
@click.option("--runs", type=int, default=21, show_default=True, help="Repetitions of the latency measurement.")
@click.option("--threads", type=int, default=2, show_default=True, help="CPU threads (torch).")
def bench_spot(fixture: Path, photos: Path, out_dir: Path, runs: int, threads: int) -> None:
    """Hit rate of a point/box on an unlabelled object (top-2 additions) and the interactive
    answer's median latency; writes spot.json and spot.md under --out."""
    from worker.bench.spot import run

    summary = run(fixture, photos, out_dir, runs, threads)
    click.echo(json.dumps({k: summary[k] for k in ("all", "points", "boxes", "validation", "test", "latency", "latency_1_thread")}))
