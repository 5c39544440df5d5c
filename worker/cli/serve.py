"""``semlabel serve`` (the backend's server, :func:`backend.ls.server.serve`) and ``semlabel suggest``."""

from __future__ import annotations

import json

import click


def register(main: click.Group) -> None:
    main.add_command(serve)
    main.add_command(suggest)


# ----------------------------------------------------------------------------------- serve
@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: all).")
@click.option("--port", type=int, default=None, help="Port (default: backend.server.port).")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Processes; each loads the model (on CPU prefer 1 with several threads).")
@click.option("--threads", type=int, default=None,
              help="Request threads per process (default: backend.server.threads).")
@click.option("--timeout", type=int, default=None,
              help="Seconds a request may take (Label Studio waits 100 s for /predict; "
                   "default: backend.server.timeout_s).")
@click.option("--with-worker", is_flag=True,
              help="Also run Redis (embedded if none answers) and a training worker on this machine.")
@click.option("--access-log", is_flag=True, help="Log every request.")
@click.option("--insecure", is_flag=True,
              help="Serve on a non-loopback address without credentials (anyone who reaches the port "
                   "can send webhooks that become training data).")
def serve(host, port, workers, threads, timeout, with_worker, access_log, insecure) -> None:
    """Serve the Label Studio ML backend (connect it in Label Studio: Settings → Model).

    The same server as ``python -m backend.ls``; ``--with-worker`` adds Redis and a worker."""
    from backend.errors import ConfigError
    from backend.ls import server

    try:
        server.check_bind(host, insecure=insecure)  # before Redis or a worker starts
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    options = dict(host=host, port=port, workers=workers, threads=threads, timeout=timeout,
                   access_log=access_log, insecure=insecure)
    if not with_worker:
        server.serve(**options)
        return
    from worker.rq_worker import local_stack

    with local_stack(with_worker=True) as stack:
        click.echo(f"semlabel: Redis {stack.redis_url.split('@')[-1]}, worker pid "
                   f"{stack.worker.pid if stack.worker else '-'}", err=True)
        server.serve(**options)


# --------------------------------------------------------------------------------- suggest
@click.command()
@click.option("--project", type=int, required=True, help="Label Studio project id.")
@click.option("--url", default=None, help="Label Studio URL (default: LABEL_STUDIO_URL).")
@click.option("--token", default=None,
              help="Legacy API token or personal access token (default: LABEL_STUDIO_API_KEY).")
@click.option("--limit", type=int, default=None, help="At most this many annotated tasks.")
@click.option("--dry-run", is_flag=True, help="Compute, print a summary, store nothing.")
def suggest(project, url, token, limit, dry_run) -> None:
    """Store missed-label review predictions for every annotated task of a project.

    The same as the backend does after each submit: the annotation's labels plus the likely
    missing ones (model_version `backend.review.model_version`, score = P(something missing)),
    replacing earlier review predictions of the same annotations."""
    from tqdm.auto import tqdm

    from backend.errors import SemlabelError
    from backend.ls.review_store import store_review_prediction
    from backend.ls.service import BackendService
    from backend.settings import get_settings

    settings = get_settings()
    url = url or settings.label_studio_url
    token = token or settings.label_studio_api_key
    if not url or not token:
        raise click.UsageError("give --url and --token (or set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)")
    settings = settings.model_copy(update={"label_studio_url": url, "label_studio_api_key": token})
    service = BackendService(settings, redis=None, background=False, start_threads=False)
    if not service.ready:
        raise click.ClickException(f"the model did not load: {service.load_error}")
    pid = str(project)
    client = service.connections.get(pid).client
    config = service.configs.get(client.projects.get(id=project).label_config)  # fails before any work
    tasks = []
    for task in client.tasks.list(project=project, fields="all"):
        anns = [a for a in (task.annotations or []) if isinstance(a, dict)
                and not a.get("was_cancelled") and a.get("result")]
        if anns:
            tasks.append((task.id, task.data, anns))
            if limit and len(tasks) >= limit:
                break
    summary = {"project": project, "tasks": len(tasks), "annotations": 0, "stored": 0, "nothing_chosen": 0,
               "errors": [], "model_version": None, "mean_p_missing": None}
    scores = []
    for task_id, data, anns in tqdm(tasks, desc=f"project {project}", unit="task"):
        for ann in anns:
            summary["annotations"] += 1
            try:
                entry = service.predictions.review(pid, config, {"id": task_id, "data": data}, ann)
            except SemlabelError as exc:
                summary["errors"].append(f"task {task_id}: {exc}")
                continue
            if entry is None:
                summary["nothing_chosen"] += 1
                continue
            scores.append(entry["score"])
            if not dry_run:
                store_review_prediction(client, int(task_id), int(ann["id"]), entry, project=project,
                                        live_ttl_s=settings.backend.review.live_version_ttl_s)
                summary["stored"] += 1
            summary["model_version"] = entry["model_version"]  # as stored (the live title, maybe)
    if scores:
        summary["mean_p_missing"] = round(sum(scores) / len(scores), 4)
    summary["served_version"] = service.predictor(pid).version
    click.echo(json.dumps(summary, indent=2))
    if summary["errors"]:
        raise SystemExit(1)
