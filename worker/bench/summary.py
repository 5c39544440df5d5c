"""What a ``semlabel bench`` run reports: the acceptance checks against the issue's goals,
the markdown table and report, and the table inserted into README.md."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

TABLE_START = "<!-- bench:table:start -->"
TABLE_END = "<!-- bench:table:end -->"
SETTING_TITLES = {"single": "single-positive labels", "partial": "partial labels (each true label kept with p = 0.5)"}

FULL = "SigRL (GMC + SVFR)"
PROBE_EM = "linear probe + EM"


PROBES = ("linear probe + AN-LS", "linear probe + EM")


def acceptance(payload: dict) -> dict:
    """The run's figures against the targets of the run's ``bench`` settings (``bench.goals``,
    ``bench.train_seconds_goal``; medians over seeds live in the rows' means)."""
    bench = payload["settings"]["bench"]
    goals = bench["goals"]
    out = {}
    for mode, res in payload["results"].items():
        rows = res["rows"]
        checks = {}
        if "zero-shot" in rows:
            value = rows["zero-shot"].get("edit_cost_vs_blank")
            goal = goals["zero_shot_edit_cost_vs_blank"]
            checks["zero_shot_edit_cost_vs_blank"] = {"value": value, "goal": goal, "met": _le(value, goal)}
        if FULL in rows:
            full = rows[FULL]
            goal = goals["edit_cost_vs_blank"][mode]
            checks["edit_cost_vs_blank"] = {"value": full.get("edit_cost_vs_blank"), "goal": goal,
                                            "met": _le(full.get("edit_cost_vs_blank"), goal)}
            checks["ECE"] = {"value": full.get("ECE"), "goal": goals["ECE"], "met": _le(full.get("ECE"), goals["ECE"])}
            probes = {n: rows[n]["mAP"] for n in PROBES if n in rows}
            if probes:
                best = max(probes, key=probes.get)
                margin = full["mAP"] - probes[best]
                goal = goals["mAP_over_best_linear_baseline"]
                checks["mAP_over_best_linear_baseline"] = {"baseline": best, "margin": round(margin, 4), "goal": goal,
                                                           "met": margin >= goal}
            if "zero-shot" in rows:
                checks["mAP_over_zero_shot"] = {"margin": round(full["mAP"] - rows["zero-shot"]["mAP"], 4)}
            k = bench["recall_k"]
            key = f"hidden_recall@{k}"
            if mode == "partial":
                cond = full.get(key, float("nan"))
                plain = rows.get(FULL + ", known labels ignored", {}).get(key, float("nan"))
                cooc = rows.get(PROBE_EM + " × co-occurrence", {}).get(key, float("nan"))
                goal = goals["hidden_recall@3_partial"]
                checks[key] = {"with_conditioning": cond, "goal": goal, "met": cond >= goal,
                               "without_conditioning": plain, "linear_probe_x_cooccurrence": cooc,
                               "better_than_both": cond > plain and cond > cooc}
        unseen = res.get("unseen_labels")
        if unseen:
            goal = goals["unseen_AP_over_zero_shot"]
            checks["unseen_AP_over_zero_shot"] = {"gain": unseen["gain_over_zero_shot"], "goal": goal,
                                                  "met": unseen["gain_over_zero_shot"] >= goal}
        out[mode] = checks
    timing = payload.get("timing_1000")
    if timing:
        goal = bench["train_seconds_goal"]
        out["train_1000_images_seconds"] = {"median": timing["median_seconds"], "goal": goal,
                                            "met": timing["median_seconds"] <= goal}
    return out


def _le(value, goal) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value)) and value <= goal


def _fmt(value, digits=3):
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def render_markdown(payload: dict) -> dict:
    """``{"table": the README table with its notes, "report": bench.md}``."""
    table = "\n".join(_table_lines(payload)) + "\n" + _footnote(payload) + "\n"
    return {"table": table, "report": _report(payload, table)}


def _table_lines(payload: dict) -> list[str]:
    """Per label setting: the method table, the unseen-label line and the probes' tuning."""
    k = payload["settings"]["bench"]["recall_k"]
    seeds = payload["settings"]["bench"]["seeds"]
    lines = []
    for mode, res in payload["results"].items():
        lines.append(f"\n**{SETTING_TITLES[mode]}** — {payload['data']['train_images']} training images, "
                     f"{payload['data']['test_images']} fully labelled {payload['data'].get('split', 'test')} images; "
                     f"mean (± sd of mAP) over training seeds {', '.join(map(str, seeds))}\n")
        lines.append(f"| method | mAP | micro-F1 | F1@3 | edit cost / task (× blank) | ECE | "
                     f"recall@{k} of hidden positives | train s |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        blank = next((r.get("blank_edit_cost") for r in res["rows"].values() if "blank_edit_cost" in r), None)
        if blank is not None:
            lines.append(f"| *blank task* | | | | {_fmt(blank, 2)} (1.00) | | | |")
        for name, row in res["rows"].items():
            if row.get("conditioning_only"):
                lines.append(f"| *{name}* | | | | | | {_fmt(row.get(f'hidden_recall@{k}'))} | |")
                continue
            std = f" ± {row['mAP_std']:.3f}" if "mAP_std" in row else ""
            cost = f"{_fmt(row.get('edit_cost'), 2)} ({_fmt(row.get('edit_cost_vs_blank'), 2)})"
            lines.append(f"| {name} | {_fmt(row['mAP'])}{std} | {_fmt(row.get('micro-F1'))} | {_fmt(row['F1@3'])} | "
                         f"{cost} | {_fmt(row.get('ECE'))} | {_fmt(row.get(f'hidden_recall@{k}'))} | "
                         f"{_fmt(row.get('train_seconds'), 1)} |")
        unseen = res.get("unseen_labels")
        if unseen:
            per = ", ".join(f"{n} {unseen['AP_per_label'][n]:.3f} vs {unseen['zero_shot_AP_per_label'].get(n, float('nan')):.3f}"
                            for n in unseen["labels"])
            with_them = unseen.get("AP_when_trained_with_them")
            lines.append(f"\nUnseen labels ({', '.join(unseen['labels'])} held out of training, SigRL on the "
                         f"other labels, {unseen['train_images']} images): AP {unseen['AP']:.3f} ± {unseen['AP_std']:.3f} "
                         f"vs zero-shot {unseen['zero_shot_AP']:.3f} ({per})"
                         + (f"; trained with them {with_them:.3f}" if with_them is not None else "")
                         + (f"; ECE of their served probabilities {unseen['ECE']:.3f} (zero-shot "
                            f"{unseen['zero_shot_ECE']:.3f})" if "ECE" in unseen else "") + ".")
        tuned = res.get("probe_tuning") or {}
        if tuned:
            lines.append("\nLinear probes tuned per seed on the validation split of the training export (lr, weight "
                         "decay chosen: " + "; ".join(
                             f"{n}: " + ", ".join(f"{t['lr']:g}/{t['weight_decay']:g}" for t in runs_)
                             for n, runs_ in tuned.items()) + ").")
    return lines


def _footnote(payload: dict) -> str:
    """How the table's figures were made: the decision rule, the bins, backbone, timings."""
    timing = payload.get("timing_1000")
    dec = payload["decision"]
    foot = (f"\nEdit cost: label toggles from the pre-selection to the truth, the pre-selection being the backend's "
            f"own rule (`{dec['rule']}`: the fewest expected toggles, wrong tick {dec['wrong_tick_cost']:g}, missed "
            f"tick {dec['missed_tick_cost']:g}) on each method's served probabilities; a blank task costs its number "
            f"of labels. micro-F1 of that pre-selection (overall F1 of the multi-label literature); ECE over all "
            f"(image, label) pairs, {payload['calibration_bins']['bins']} "
            f"{payload['calibration_bins']['strategy'].replace('_', '-')} bins. Linear probes on the "
            f"{payload['probe_features']} features.\n"
            f"\nBackbone `{payload['backbone']}` (class_temperature {payload['class_temperature']:g}), "
            f"features from the FeatureStore ({payload['features']['computed']} computed, "
            f"{payload['features']['cached']} cached). Bench wall time {payload['seconds']['wall']:.0f} s "
            f"on {payload['machine']['cpu_count']} CPU cores (features {payload['seconds']['features']:.0f} s).")
    if timing:
        foot += (f" Training the full model on {timing['images']} annotated images: median "
                 f"{timing['median_seconds']:.1f} s over {len(timing['seconds'])} runs ({', '.join(f'{s:.1f}' for s in timing['seconds'])} s)"
                 + (f", {timing['median_cpu_seconds']:.1f} CPU s" if "median_cpu_seconds" in timing else "")
                 + f", {payload['machine']['torch_threads']} torch thread(s), load average "
                 f"{timing.get('load_average_1m')}.")
    return foot


def _report(payload: dict, table: str) -> str:
    """bench.md: the table, the acceptance checks and every figure per label setting."""
    from worker.eval.report import metrics_table

    k = payload["settings"]["bench"]["recall_k"]
    acc = payload["acceptance"]
    report = (
        "# semlabel benchmark: Fashion-MNIST outfit mosaics\n\n"
        f"Command: `{payload['command']}`\n\n{table}\n"
        "## Acceptance checks\n\n```json\n" + json.dumps(acc, indent=1) + "\n```\n\n"
        "## All figures\n\n"
    )
    cols = [("method", "name"), ("mAP", "mAP"), ("micro-F1", "micro-F1"), ("macro-F1", "macro-F1"),
            ("F1@3", "F1@3"), ("F1@5", "F1@5"), ("P@3", "P@3"), ("R@3", "R@3"),
            ("edit cost", "edit_cost"), ("× blank", "edit_cost_vs_blank"), ("ticked/task", "selected_per_task"),
            ("ECE", "ECE"), ("recall@1 hidden", "hidden_recall@1"), (f"recall@{k} hidden", f"hidden_recall@{k}"),
            ("mistake severity", "mistake_severity"), ("hier. dist@3", "hier_dist@3"), ("epochs", "epochs")]
    for mode, res in payload["results"].items():
        rows = [{"name": n, **r} for n, r in res["rows"].items()]
        report += f"### {SETTING_TITLES[mode]}\n\n" + metrics_table(rows, cols) + "\n\n"
        for key, title in (("pr", "PR curves"), ("reliability", "reliability diagram"), ("graph", "learned label graph")):
            if f"{key}_{mode}" in payload["figures"]:
                report += f"![{title}, {mode}]({payload['figures'][f'{key}_{mode}']})\n\n"
        if res.get("probe_tuning"):
            report += "Probe tuning (validation split of the training export):\n\n```json\n" + \
                json.dumps(res["probe_tuning"], indent=1) + "\n```\n\n"
    return report


def readme_path() -> Path | None:
    candidate = Path(__file__).resolve().parents[2] / "README.md"
    return candidate if candidate.is_file() else None


def insert_readme_table(table: str, path: Path | None = None) -> bool:
    """Replace the text between the bench table markers of README.md (model section)."""
    path = path or readme_path()
    if path is None:
        return False
    text = path.read_text(encoding="utf-8")
    if TABLE_START not in text or TABLE_END not in text:
        log.warning("README.md has no %s … %s markers; table not inserted", TABLE_START, TABLE_END)
        return False
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    path.write_text(head + TABLE_START + "\n" + table.strip() + "\n" + TABLE_END + tail, encoding="utf-8")
    return True
