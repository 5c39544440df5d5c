"""``semlabel train | eval | bench | paper``: the SigRL heads from the command line.

Data in and out in Label Studio's own format (JSON exports). Registered on the main group
by :func:`register`.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from backend.errors import ConfigError


def _labels(labels: str | None, label_config: Path | None):
    """(labels, from_name, image field) from --labels or --label-config; the labels are
    :class:`backend.labels.Label` (a config's values and hints become prompt texts)."""
    from backend.labels import Label
    from worker.training.data import label_config_binding

    if labels and label_config:
        raise click.UsageError("give --labels or --label-config, not both")
    if label_config:
        try:
            binding = label_config_binding(Path(label_config).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{label_config}: {exc.strerror or exc}") from exc
        return list(binding.labels), binding.control, binding.data_key
    if labels:
        names = [n.strip() for n in labels.split(",") if n.strip()]
        if not names:
            raise click.BadParameter("no label names given", param_hint="--labels")
        return [Label(n) for n in names], None, None
    return None, None, None


def _taxonomy(path: Path | None):
    from backend.labels import Taxonomy

    if path is None:
        return None
    try:
        return Taxonomy.from_yaml(path)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from exc


def _echo_progress(record: dict) -> None:
    if record.get("stage") == "trained":
        click.echo(
            f"trained: {record.get('epochs_run')} epochs (best {record.get('best_epoch')}), "
            f"{record.get('train_seconds')} s, held-out mAP {record.get('val_map')}",
            err=True,
        )


_label_options = [
    click.option("--labels", default=None, help="Comma-separated label names."),
    click.option("--label-config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                 help="A Label Studio label config (XML) with a <Choices> tag."),
    click.option("--images-root", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Directory the export's image references are resolved against."),
    click.option("--taxonomy", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                 help="Label taxonomy YAML (format: configs/taxonomy.example.yaml)."),
    click.option("--backbone", type=click.Choice(["auto", "open_clip", "packaged"]), default=None,
                 help="Override backbone.kind."),
]


def _with_options(options):
    def wrap(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return wrap


@click.command("train")
@click.option("--export", "export_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Label Studio JSON export with the (partial) annotations.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Model directory to write.")
@_with_options(_label_options)
@click.option("--policy", type=click.Choice(["union", "latest"]), default="union", show_default=True,
              help="Several annotations of a task: union of their choices, or the latest one.")
@click.option("--seed", type=int, default=None, help="Seed (default: train.seed).")
def train_cmd(export_path, out_dir, labels, label_config, images_root, taxonomy, backbone, policy, seed):
    """Train the SigRL heads on a Label Studio export; write MODEL_DIR."""
    from backend.model.checkpoint import save_model
    from backend.runtime import Runtime
    from worker.training.data import attach_feature_batch, examples_from_tasks, read_export
    from worker.training.train import train_model

    label_list, from_name, image_field = _labels(labels, label_config)
    tasks = read_export(export_path)
    if label_list is None:
        raise click.UsageError("give the label set: --labels or --label-config")
    tax = _taxonomy(taxonomy)
    examples, report = examples_from_tasks(
        tasks, [label.name for label in label_list], from_name=from_name, image_field=image_field, policy=policy,
        images_root=images_root or export_path.parent,
    )
    if not examples:
        raise ConfigError(f"{export_path}: no task with a chosen label of the label set ({report.to_dict()})")
    runtime = Runtime.create(backbone_kind=backbone)
    examples, batch, errors = attach_feature_batch(examples, runtime)
    space = runtime.label_space(label_list, tax)
    result = train_model(examples, space, batch, runtime.settings, backbone=runtime.backbone, seed=seed,
                         progress=_echo_progress, taxonomy=tax)
    save_model(result.model, out_dir, metrics=result.metrics)
    click.echo(json.dumps({
        "model": str(out_dir),
        "model_id": result.model.model_id,
        "backbone": runtime.backbone.name,
        "export": report.to_dict(),
        "image_errors": [str(e) for e in errors],
        "summary": result.summary,
        "held_out": result.metrics,
    }, indent=2))


@click.command("eval")
@click.option("--export", "export_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Label Studio JSON export whose annotations are complete truth.")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@_with_options(_label_options)
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write a markdown report with PR curves and the learned label graph.")
@click.option("--hidden-seed", type=int, default=None, help="Seed of the hidden-positive split (default: bench.hidden_seed).")
def eval_cmd(export_path, model_dir, labels, label_config, images_root, taxonomy, backbone, report_dir, hidden_seed):
    """Evaluate MODEL_DIR on a fully labelled export; print one JSON object."""
    from backend.labels import Taxonomy
    from backend.model.serving import load_predictor
    from backend.runtime import Runtime
    from worker.training.data import attach_feature_batch, examples_from_tasks, read_export
    from worker.eval.evaluate import evaluate_features

    runtime = Runtime.create(backbone_kind=backbone)
    predictor = load_predictor(model_dir, runtime)
    label_list, from_name, image_field = _labels(labels, label_config)
    if label_list is None:
        from backend.labels import Label

        label_list = [Label(name) for name in predictor.labels_seen]
    names = [label.name for label in label_list]
    tax = _taxonomy(taxonomy) or (Taxonomy(dict(predictor.model.taxonomy)) if predictor.model.taxonomy else None)
    examples, report = examples_from_tasks(
        read_export(export_path), names, from_name=from_name, image_field=image_field,
        images_root=images_root or export_path.parent,
    )
    if not examples:
        raise ConfigError(f"{export_path}: no task with a chosen label of the label set")
    examples, _, errors = attach_feature_batch(examples, runtime)
    features = runtime.features.load_features([e.key for e in examples])
    space = runtime.label_space(label_list, tax)
    seed = runtime.settings.bench.hidden_seed if hidden_seed is None else hidden_seed
    result = evaluate_features(predictor, features, [e.positives for e in examples], space,
                               zero_shot=runtime.zero_shot_predictor(), taxonomy=tax, hidden_seed=seed)
    payload = {
        "model": str(model_dir),
        "version": predictor.version,
        "backbone": runtime.backbone.name,
        **result["model"],
        "zero_shot": result["zero_shot"],
        "image_errors": len(errors),
    }
    if report_dir is not None:
        from worker.eval.report import eval_report

        payload["report"] = str(eval_report(report_dir, predictor, features, examples, space, payload))
    click.echo(json.dumps(payload, indent=2))


@click.command("bench")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-out"),
              show_default=True, help="Where images, exports, models and reports go.")
@click.option("--train-images", type=int, default=None, help="Default: bench.train_images.")
@click.option("--test-images", type=int, default=None, help="Default: bench.test_images.")
@click.option("--readme/--no-readme", default=True, show_default=True,
              help="Insert the table into README.md (model section) when run from the source tree.")
@click.option("--settings", "settings_filter", default="single,partial", show_default=True,
              help="Label settings to run (single, partial).")
@click.option("--split", type=click.Choice(["test", "validation"]), default="test", show_default=True,
              help="Score on the test images, or on complete-label validation mosaics of training-file items "
                   "(where defaults are chosen; never written into README.md).")
def bench_cmd(out_dir, train_images, test_images, readme, settings_filter, split):
    """Fashion-MNIST outfit benchmark: every method, single-positive and partial labels."""
    from worker.bench.bench import run_bench

    modes = [m.strip() for m in settings_filter.split(",") if m.strip()]
    result = run_bench(out_dir, train_images=train_images, test_images=test_images, modes=modes,
                       update_readme=readme, split=split)
    click.echo(result["markdown"])
    click.echo(f"report: {out_dir / 'bench.json'}, {out_dir / 'bench.md'}", err=True)


@click.command("paper")
@click.option("--dataset", required=True, type=click.Choice(["voc", "coco", "nuswide"]))
@click.option("--root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The dataset directory in its official layout (see README).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("paper-out"),
              show_default=True)
@click.option("--method", type=click.Choice(["em", "em_pl", "an_ls"]), default="em", show_default=True)
@click.option("--max-images", type=int, default=None, help="Use at most this many training images (smoke runs).")
@click.option("--backbone", type=click.Choice(["auto", "open_clip", "packaged"]), default="open_clip",
              show_default=True)
def paper_cmd(dataset, root, out_dir, method, max_images, backbone):
    """Cole et al. single-positive protocol on VOC 2012 / COCO 2014 / NUS-WIDE."""
    from worker.bench.paper import run_paper

    result = run_paper(dataset, root, out_dir, method=method, max_images=max_images, backbone=backbone)
    click.echo(json.dumps(result, indent=2))


def register(group: click.Group) -> None:
    for command in (train_cmd, eval_cmd, bench_cmd, paper_cmd):
        group.add_command(command)


def trained_scores(runtime, model_dir: Path, features, space):
    """``semlabel predict --model``: the trained model's probabilities."""
    from backend.model.serving import load_predictor

    return load_predictor(model_dir, runtime).probabilities(features, space)
