"""``semlabel worker``, ``semlabel models list|status|promote|rollback|train`` and
``semlabel bench-outage``."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import click


def register(main: click.Group) -> None:
    main.add_command(worker_command)
    main.add_command(models)
    main.add_command(bench_outage)


# ---------------------------------------------------------------------------------- worker
@click.command("worker")
@click.option("--queue", "queues", multiple=True,
              help="Queue to work (repeatable; default: worker.queues.train and .features).")
@click.option("--burst", is_flag=True, help="Quit when the queues are empty.")
@click.option("--name", default=None, help="Worker name (default: RQ's, unique per process).")
@click.option("--max-jobs", type=int, default=None, help="Quit after this many jobs.")
@click.option("--no-scheduler", is_flag=True,
              help="Do not run RQ's scheduler here (debounced jobs and retries need one somewhere).")
@click.option("--healthcheck", is_flag=True,
              help="Exit 0 if a live semlabel worker of this host is registered in Redis, else 1.")
def worker_command(queues, burst, name, max_jobs, no_scheduler, healthcheck) -> None:
    """Run an RQ worker for background training (CUDA when present, else CPU).

    Start one per machine with a GPU, all pointing at the same REDIS_URL and the same model
    store (store.root); `rq info --url $REDIS_URL` shows them.
    """
    from worker.rq_worker import healthy_workers, run_worker

    if healthcheck:
        names = healthy_workers()
        if not names:
            raise click.ClickException("no live semlabel worker of this host is registered in Redis")
        click.echo(f"ok: {', '.join(names)}")
        return

    run_worker(queues=list(queues) or None, burst=burst, name=name, max_jobs=max_jobs,
               with_scheduler=not no_scheduler)


# ---------------------------------------------------------------------------------- models
@click.group()
def models() -> None:
    """Trained model versions: list, status, promote, rollback, train."""


def _redis_or_none():
    from backend.errors import RedisUnavailable
    from backend.redis.connection import redis_client

    try:
        return redis_client()
    except RedisUnavailable as exc:
        click.echo(f"semlabel: note: {exc}; showing the model store only", err=True)
        return None


def _store(redis=None):
    from backend.store import ModelStore

    return ModelStore.from_settings(redis=redis)


def _projects(store, redis, project: str | None) -> list[str]:
    if project is not None:
        return [str(project)]
    names = set(store.projects())
    if redis is not None:
        from backend.queue.eventlog import known_projects

        names |= set(known_projects(redis))
    return sorted(names, key=lambda p: (len(p), p))


def _one_project(store, project: str | None) -> str:
    if project is not None:
        return str(project)
    names = store.projects()
    if len(names) != 1:
        raise click.UsageError(f"name the project with --project (the store has {len(names)}: {', '.join(names)})")
    return names[0]


def _fmt_metric(metrics: dict, name: str) -> str:
    value = metrics.get(name)
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


@models.command("list")
@click.option("--project", default=None, help="One project (default: all).")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
def models_list(project, as_json) -> None:
    """Every stored version: current marker, held-out metric, promotion decision."""
    store = _store()
    out = {p: [v.to_dict() for v in store.versions(p)] for p in _projects(store, None, project)}
    if as_json:
        click.echo(json.dumps(out, indent=2, default=str))
        return
    metric = store.gate_metric
    for name, versions in out.items():
        click.echo(f"project {name}:")
        if not versions:
            click.echo("  (no versions)")
        for v in versions:
            mark = "*" if v["current"] else " "
            gate = v["gate"] or {}
            state = "current" if v["current"] else ("promoted" if gate.get("promoted") else "kept")
            note = f"refused: {v['refused']}" if v["refused"] else gate.get("reason", "")
            tasks = (v["data_summary"] or {}).get("tasks", "-")
            click.echo(f" {mark} {v['version']}  {metric} {_fmt_metric(v['metrics'], metric):>6}  "
                       f"tasks {tasks!s:>5}  {state:<8}  {note}")


def _job_summary(job) -> dict:
    meta = dict(job.meta or {})
    out = {
        "id": job.id,
        "status": str(job.get_status(refresh=False).value if hasattr(job.get_status(refresh=False), "value")
                      else job.get_status(refresh=False)),
        "enqueued_at": job.enqueued_at.isoformat() if job.enqueued_at else None,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "ended_at": job.ended_at.isoformat() if job.ended_at else None,
        "worker": job.worker_name,
        "retries_left": job.retries_left,
        "meta": meta,
    }
    if out["status"] == "failed":
        reason = meta.get("error")
        if not reason:
            result = job.latest_result()
            exc = (result.exc_string or "") if result is not None else ""
            lines = [ln for ln in exc.strip().splitlines() if ln.strip()]
            reason = lines[-1] if lines else "failed (no reason recorded)"
        out["reason"] = reason
    return out


@models.command("status")
@click.option("--project", default=None, help="One project (default: all known).")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
def models_status(project, as_json) -> None:
    """Current version per project (pointer file and Redis), refused versions, and the
    training jobs: pending, running (stage, epoch, loss, held-out mAP), recent, failed."""
    from backend.settings import get_settings

    settings = get_settings()
    redis = _redis_or_none()
    store = _store(redis)
    report = {name: _project_status(store, redis, name, settings) for name in _projects(store, redis, project)}
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    if not report:
        click.echo("no projects yet")
    for name, entry in report.items():
        _echo_project_status(name, entry, with_jobs=redis is not None)


def _project_status(store, redis, name: str, settings) -> dict:
    """One project's entry of ``semlabel models status``: versions, refusals and, with Redis,
    the training jobs."""
    entry = {
        "current": store.current(name),
        "current_in_redis": store.redis_current(name) if redis is not None else None,
        "pointer": store.pointer(name),
        "refused": store.refusals(name),
        "versions": len(store.versions(name)),
    }
    if redis is None:
        return entry
    from rq.exceptions import NoSuchJobError

    from backend.queue.contract import fetch_job
    from backend.queue.debounce import training_state

    state = training_state(redis, name, settings)
    jobs = []
    for job_id in state["jobs"][:10]:
        try:
            jobs.append(_job_summary(fetch_job(redis, job_id)))
        except NoSuchJobError:
            continue
    entry.update(pending=state["pending"], running=state["running"], events=state["events"],
                 folded_annotations=state["folded_annotations"], jobs=jobs)
    return entry


def _echo_project_status(name: str, e: dict, with_jobs: bool) -> None:
    agree = ""
    if with_jobs and e["current_in_redis"] != e["current"]:
        agree = f"  (Redis says {e['current_in_redis']})"
    click.echo(f"project {name}: current {e['current'] or 'none (zero-shot)'}{agree}; {e['versions']} version(s)")
    for version, info in e["refused"].items():
        click.echo(f"  refused {version}: {info.get('reason')} ({info.get('ts')})")
    if not with_jobs:
        return
    if e.get("pending"):
        p = e["pending"]
        due = float(p.get("due", 0))
        when = _dt.datetime.fromtimestamp(due).strftime("%H:%M:%S") if due else "?"
        click.echo(f"  pending {p.get('job_id')}: {p.get('count')} new event(s), due {when}")
    if e.get("running"):
        click.echo(f"  running {e['running'].get('job')} on {e['running'].get('host')}")
    for j in e.get("jobs", []):
        m = j["meta"]
        bits = [j["status"]]
        for key in ("stage", "epoch", "loss", "holdout_mAP", "version", "error"):
            if m.get(key) is not None:
                val = m[key]
                bits.append(f"{key} {val:.4f}" if isinstance(val, float) else f"{key} {val}")
        if j.get("reason") and j["reason"] != m.get("error"):
            bits.append(f"reason: {j['reason']}")
        click.echo(f"  job {j['id']}: " + ", ".join(bits))


@models.command("promote")
@click.argument("version")
@click.option("--project", default=None, help="The version's project (found when omitted).")
def models_promote(version, project) -> None:
    """Make VERSION the current version (its files are checked first; the metric gate does
    not apply). Backends pick it up within seconds."""
    store = _store(_redis_or_none())
    project = str(project) if project is not None else store.find(version)
    store.promote(project, version, reason="promoted with `semlabel models promote`")
    click.echo(f"project {project}: current version is now {version}")


@models.command("rollback")
@click.option("--project", default=None, help="The project (needed when the store has several).")
def models_rollback(project) -> None:
    """Go back to the version that was current before the current one."""
    store = _store(_redis_or_none())
    project = _one_project(store, project)
    old = store.current(project)
    new = store.rollback(project, reason="rolled back with `semlabel models rollback`")
    click.echo(f"project {project}: rolled back from {old} to {new}")


@models.command("train")
@click.option("--project", required=True, help="Label Studio project id.")
@click.option("--in", "delay", type=float, default=None, help="Seconds from now (default: now).")
def models_train(project, delay) -> None:
    """Queue a training job for a project now (like Label Studio's START_TRAINING)."""
    from backend.queue.debounce import request_training
    from backend.redis.connection import redis_client

    info = request_training(redis_client(), project, reason="semlabel models train", delay_s=delay)
    state = "joined the pending job" if info["coalesced"] else "queued"
    click.echo(f"project {project}: {state} {info['job_id']} (due in {info['due_in_s']:.0f} s)")


# ------------------------------------------------------------------------------ bench-outage
@click.command("bench-outage")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench-out"), show_default=True,
              help="Directory for outage.json.")
@click.option("--webhooks", "n", type=int, default=200, show_default=True, help="Annotation webhooks in the burst.")
@click.option("--rate", type=float, default=5.0, show_default=True, help="Webhooks per second.")
@click.option("--kill-after", type=int, default=25, show_default=True, help="Kill Redis after this many webhooks.")
@click.option("--outage", "outage_s", type=float, default=30.0, show_default=True,
              help="Seconds until Redis is started again.")
def bench_outage(out_dir, n, rate, kill_after, outage_s) -> None:
    """Kill Redis during a burst of annotation webhooks; count the annotations that reach the
    next training (and any lost or stored twice), the answers and their latency."""
    from worker.bench.outage import run

    report = run(out_dir, n=n, rate=rate, kill_after=kill_after, outage_s=outage_s)
    click.echo(json.dumps(report, indent=2))
    if not report["ok"]:
        raise click.ClickException(f"{report['lost']} annotation(s) lost, {report['stored_twice']} stored twice")
