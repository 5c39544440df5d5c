"""Report figures and markdown: PR curves and the learned label graph (matplotlib, Agg)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pr_curves(path: Path, curves_by_method: dict[str, dict], title: str = "") -> Path:
    """Micro-averaged PR curve per method (left) and per-label curves of the first method (right)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for method, curves in curves_by_method.items():
        p, r = curves["micro"]
        axes[0].plot(r, p, label=method)
    axes[0].set(xlabel="recall", ylabel="precision", title="micro-averaged", xlim=(0, 1), ylim=(0, 1.02))
    axes[0].legend(fontsize=7)
    first = next(iter(curves_by_method))
    for name, (p, r) in curves_by_method[first].items():
        if name != "micro":
            axes[1].plot(r, p, label=name, linewidth=1)
    axes[1].set(xlabel="recall", ylabel="precision", title=f"per label: {first}", xlim=(0, 1), ylim=(0, 1.02))
    axes[1].legend(fontsize=6, ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reliability(path: Path, calibrations: dict[str, dict], title: str = "") -> Path:
    """Reliability diagram: observed frequency against mean probability per bin, one line per
    method (``calibrations[name]`` is :func:`worker.eval.metrics.calibration`'s output), marker
    area ∝ pairs in the bin; the diagonal is perfect calibration."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    for name, cal in calibrations.items():
        bins = cal.get("bins") or []
        if not bins:
            continue
        total = sum(b["count"] for b in bins)
        xs, ys = [b["mean_p"] for b in bins], [b["frequency"] for b in bins]
        line = ax.plot(xs, ys, marker="", linewidth=1.2, label=f"{name} (ECE {cal['ECE']:.3f})")[0]
        ax.scatter(xs, ys, s=[8 + 400 * b["count"] / total for b in bins], color=line.get_color(), alpha=0.6)
    strategy = next((c.get("strategy") for c in calibrations.values()), "")
    ax.set(xlabel="mean predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1),
           title=(title + "\n" if title else "") + f"reliability ({strategy.replace('_', '-')} bins)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def gmc_attention(module, embeddings: torch.Tensor, graph) -> torch.Tensor:
    """``[C, C]`` attention of the first GATv2 layer (mean over heads), ``A[i, j]`` = how
    much label i gathers from label j; the blended edge weights when there is no GMC."""
    C = embeddings.shape[0]
    if module.gmc is None:
        return graph.weights.clone()
    module.eval()
    _, (edge_index, alpha) = module.gmc.conv1(embeddings, graph.edge_index, graph.edge_attr,
                                              return_attention_weights=True)
    A = torch.zeros(C, C)
    A[edge_index[1], edge_index[0]] = alpha.mean(-1).float().cpu()
    return A


def plot_label_graph(path: Path, names: Sequence[str], A: torch.Tensor, cond: torch.Tensor | None = None,
                     top: int = 2) -> Path:
    """Labels on a circle; for each label its ``top`` strongest learned in-edges (width ∝
    attention), coloured by the observed P(j | i) when given."""
    plt = _plt()
    C = len(names)
    angles = [2 * math.pi * i / C for i in range(C)]
    xy = [(math.cos(a), math.sin(a)) for a in angles]
    fig, ax = plt.subplots(figsize=(7, 7))
    off = A.clone()
    off.fill_diagonal_(0)
    cmap = plt.get_cmap("viridis")
    for i in range(C):
        for j in off[i].topk(min(top, C - 1)).indices.tolist():
            w = float(off[i, j])
            if w <= 0:
                continue
            colour = cmap(float(cond[i, j])) if cond is not None else "grey"
            ax.annotate("", xy=xy[i], xytext=xy[j],
                        arrowprops=dict(arrowstyle="->", color=colour, lw=0.5 + 6 * w, alpha=0.7,
                                        shrinkA=12, shrinkB=12, connectionstyle="arc3,rad=0.08"))
    for (x, y), name in zip(xy, names):
        ax.scatter([x], [y], s=60, color="black", zorder=3)
        ax.text(1.13 * x, 1.13 * y, name, ha="center", va="center", fontsize=9)
    ax.set_xlim(-1.45, 1.45)
    ax.set_ylim(-1.45, 1.45)
    ax.axis("off")
    ax.set_title("learned label graph: strongest GATv2 attention per label\n(colour: observed P(target | source))",
                 fontsize=10)
    if cond is not None:
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
        fig.colorbar(sm, ax=ax, shrink=0.6, label="P(j | i)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metrics_table(rows: list[dict], columns: Sequence[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for title, _ in columns) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    lines = [head, sep]
    for row in rows:
        cells = []
        for _, key in columns:
            value = row.get(key, "")
            if isinstance(value, float):
                value = "—" if math.isnan(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
            cells.append(str(value) if value is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def eval_report(out_dir, predictor, features, examples, space, payload: dict) -> Path:
    """``semlabel eval --report``: report.md, pr_curves.png, label_graph.png, eval.json."""
    from .metrics import pr_curves
    from worker.training.data import targets

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    y = targets([e.positives for e in examples], space.names)
    visual, _ = predictor.logits(features, space)
    zs = predictor.zero_shot.probabilities(features, space) if predictor.zero_shot is not None else None
    curves = {"SigRL": pr_curves(visual, y, space.names)}
    if zs is not None:
        curves["zero-shot"] = pr_curves(zs, y, space.names)
    plot_pr_curves(out / "pr_curves.png", curves, title=predictor.version)
    cals = {"SigRL": payload.get("calibration"), "zero-shot": payload.get("zero_shot", {}).get("calibration")}
    cals = {name: cal for name, cal in cals.items() if cal}
    if cals:
        plot_reliability(out / "reliability.png", cals, title=predictor.version)
    graph, H, _ = predictor.prepare(space)
    A = gmc_attention(predictor.module, space.embeddings.to(predictor.device), graph)
    plot_label_graph(out / "label_graph.png", space.names, A, graph.cond.cpu())
    (out / "eval.json").write_text(json.dumps(payload, indent=2))
    keys = [k for k in ("mAP", "micro-F1", "F1@3", "F1@5", "P@3", "R@3", "edit_cost", "blank_edit_cost",
                        "edit_cost_vs_blank", "ECE", "hidden_recall@3", "mistake_severity", "hier_dist@3")
            if k in payload]
    rows = [{"name": "SigRL", **payload}, {"name": "zero-shot", **payload.get("zero_shot", {})}]
    table = metrics_table(rows, [("", "name")] + [(k, k) for k in keys])
    per_label = "\n".join(f"| {n} | {v:.3f} |" for n, v in payload.get("AP_per_label", {}).items())
    text = (
        f"# Evaluation of {predictor.version}\n\n"
        f"Model directory: `{payload['model']}` — {payload.get('images')} test images, "
        f"{payload.get('labels')} labels, backbone `{payload['backbone']}`.\n\n{table}\n\n"
        f"recall@k of hidden positives: for each test image with ≥ 2 labels a random subset of its "
        f"labels is hidden, the rest given as known; the model ranks the other labels.\n\n"
        f"Edit cost: label toggles from the backend's pre-selection (the fewest expected toggles given "
        f"the served probabilities) to the truth; a blank task costs its number of labels. ECE: expected "
        f"calibration error over all (image, label) pairs.\n\n"
        f"## Precision–recall curves\n\n![PR curves](pr_curves.png)\n\n"
        + ("## Reliability\n\n![reliability diagram](reliability.png)\n\n" if cals else "")
        + f"## Learned label graph\n\n![label graph](label_graph.png)\n\n"
        f"## AP per label\n\n| label | AP |\n|---|---:|\n{per_label}\n"
    )
    (out / "report.md").write_text(text)
    return out / "report.md"
