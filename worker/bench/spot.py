"""``semlabel bench-spot``: does a point or box on an unlabelled object bring its label?

For every case of the fixture (``tests/data/spot_points.json``: real multi-object photos, their
object classes and a hand-placed point and box per object) the target's label is hidden, all
the image's other labels are chosen, and the spot is scored (:mod:`backend.model.spot`). A
*hit*: the target is among the top-2 additions. Figures: the hit rate for points, boxes and
both, per split (defaults are chosen on ``validation``; ``test`` is reported only), the sweep of
``suggest.spot.local_gain`` × ``point_sigma`` on the validation split, and the median latency of
an interactive answer for a cached image (the app's ``/predict`` with a point in the context,
through Flask's test client: JSON, config, feature cache, heads, reasons).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

HITS_AT = 2


def _photo_path(item: dict, photos: Path, tmp: Path) -> Path:
    if item["source"] == "skimage":
        from PIL import Image
        from skimage import data

        path = tmp / f"{item['photo']}.png"
        if not path.exists():
            Image.fromarray(getattr(data, item["photo"])()).convert("RGB").save(path)
        return path
    return photos / f"{item['photo']}.jpg"


def _cases(fixture: dict):
    for item in fixture["images"]:
        for obj in item["objects"]:
            for kind in ("point", "box"):
                if kind in obj:
                    yield item, obj, kind


def evaluate(runtime, fixture: dict, feats: dict, gain: float, sigma: float) -> list[dict]:
    from backend.model.spot import Spot, crop_fraction, suggest_at_spot

    space = runtime.label_space(fixture["labels"])
    predictor = runtime.zero_shot_predictor()
    fraction = crop_fraction(runtime.backbone)
    rows = []
    for item, obj, kind in _cases(fixture):
        f, (W, H) = feats[item["photo"]]
        if kind == "point":
            spot = Spot(*obj["point"], width=W, height=H)
        else:
            x, y, w, h = obj["box"]
            spot = Spot(x, y, w, h, width=W, height=H)
        chosen = [n for n in item["labels"] if n != obj["target"]]
        top = suggest_at_spot(predictor, f, space, chosen, spot, top_k=HITS_AT, min_probability=0.0,
                              sigma=sigma, gain=gain, fraction=fraction,
                              co_occurring=runtime.settings.suggest.co_occurring,
                              neighbours=runtime.settings.suggest.neighbours)
        labels = [s.label for s in top]
        rows.append({"photo": item["photo"], "split": item["split"], "kind": kind, "target": obj["target"],
                     "chosen": chosen, "top": labels, "hit": obj["target"] in labels,
                     "probabilities": [s.probability for s in top]})
    return rows


def _rate(rows, **where) -> dict:
    sel = [r for r in rows if all(r[k] == v for k, v in where.items())]
    hits = sum(r["hit"] for r in sel)
    return {"hits": hits, "cases": len(sel), "rate": round(hits / len(sel), 3) if sel else None}


def latency(runtime, settings, photo: Path, runs: int) -> dict:
    """Median ms of an interactive ``/predict`` (a point in the context) for a cached image."""
    from backend.ls.app import create_app

    labels = ["dog", "bicycle", "car", "person", "horse", "bird", "kite", "giraffe", "cat", "rocket"]
    xml = ('<View><Image name="image" value="$image"/>'
           '<KeyPoint name="point" toName="image" smart="true" smartOnly="true"/>'
           '<Choices name="labels" toName="image" choice="multiple">'
           + "".join(f'<Choice value="{n}"/>' for n in labels)
           + '</Choices><TextArea name="semlabel_reasons" toName="image" editable="false"/></View>')
    images = settings.images.model_copy(update={"local_roots": [str(photo.parent)]})
    review = settings.backend.review.model_copy(update={"enabled": False})
    s = settings.model_copy(update={"images": images,
                                    "backend": settings.backend.model_copy(update={"review": review})})
    from backend.store import ModelStore, ServedModels

    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore.from_settings(root=Path(tmp) / "models", redis=None)
        served = ServedModels.from_settings(store, runtime, redis=None, poll_interval_s=3600)
        app = create_app(s, runtime=runtime, redis=None, served=served, start_threads=False)
        client = app.test_client()
        body = {"tasks": [{"id": 1, "data": {"image": str(photo)},
                           "predictions": [{"model_version": runtime.zero_shot_predictor().version,
                                            "result": [{"from_name": "labels", "to_name": "image",
                                                        "type": "choices", "value": {"choices": ["dog"]}}]}]}],
                "project": "1.1", "label_config": xml,
                "params": {"context": {"result": [{"from_name": "point", "to_name": "image", "type": "keypoint",
                                                   "original_width": 768, "original_height": 576,
                                                   "value": {"x": 76.0, "y": 21.0, "width": 0.3}}]}}}
        first = client.post("/predict", json=body)
        assert first.status_code == 200, first.get_data(as_text=True)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            resp = client.post("/predict", json=body)
            times.append((time.perf_counter() - t0) * 1000.0)
            assert resp.status_code == 200
        app.extensions["semlabel"].close()
    return {"median_ms": round(statistics.median(times), 1), "runs": runs,
            "min_ms": round(min(times), 1), "max_ms": round(max(times), 1),
            "answer": first.get_json()["results"][0]["result"][0]["value"]["choices"]}


def run(fixture_path: Path, photos: Path, out_dir: Path, runs: int, threads: int) -> dict:
    import torch

    from backend.images import ImageBlob
    from backend.runtime import Runtime
    from backend.settings import get_settings

    torch.set_num_threads(threads)
    settings = get_settings()
    runtime = Runtime.create(settings)
    fixture = json.loads(Path(fixture_path).read_text())
    feats = {}
    with tempfile.TemporaryDirectory() as tmp:
        from PIL import Image

        for item in fixture["images"]:
            path = _photo_path(item, Path(photos), Path(tmp))
            f = runtime.features.get_or_compute([ImageBlob(str(path), path.read_bytes())])[0]
            with Image.open(path) as im:
                feats[item["photo"]] = (f, im.size)
    spot = settings.suggest.spot
    sweep = []
    for gain in (0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 1e3):
        for sigma in (0.5, 0.75, 1.0, 1.5):
            rows = evaluate(runtime, fixture, feats, gain, sigma)
            sweep.append({"local_gain": gain, "point_sigma": sigma,
                          "validation": _rate(rows, split="validation")["rate"],
                          "test": _rate(rows, split="test")["rate"]})
    rows = evaluate(runtime, fixture, feats, spot.local_gain, spot.point_sigma)
    summary = {
        "backbone": runtime.backbone.name,
        "defaults": {"local_gain": spot.local_gain, "point_sigma": spot.point_sigma},
        "hit_at": HITS_AT,
        "all": _rate(rows),
        "points": _rate(rows, kind="point"),
        "boxes": _rate(rows, kind="box"),
        "validation": _rate(rows, split="validation"),
        "test": _rate(rows, split="test"),
        "test_points": _rate(rows, split="test", kind="point"),
        "cases": rows,
        "sweep_validation": sweep,
        "latency": latency(runtime, settings, Path(photos) / "dog.jpg", runs) | {"threads": threads},
    }
    # Tiny tensors: on a loaded machine, intra-op threads wait on each other longer than they
    # compute, so the single-thread figure is measured too.
    torch.set_num_threads(1)
    summary["latency_1_thread"] = latency(runtime, settings, Path(photos) / "dog.jpg", runs) | {"threads": 1}
    torch.set_num_threads(threads)
    summary["load_average"] = [round(x, 2) for x in __import__("os").getloadavg()]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "spot.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "spot.md").write_text(_markdown(summary))
    return summary


def _markdown(s: dict) -> str:
    lines = [f"# Spot suggestions ({s['backbone']})", "",
             f"A hit: the hidden label is among the top-{s['hit_at']} additions for a point or box on its object "
             f"(all other labels chosen). Defaults: local_gain {s['defaults']['local_gain']}, "
             f"point_sigma {s['defaults']['point_sigma']}.", "",
             "| cases | hits | rate |", "|---|---|---|"]
    for key in ("all", "points", "boxes", "validation", "test"):
        r = s[key]
        lines.append(f"| {key} | {r['hits']}/{r['cases']} | {100 * r['rate']:.0f}% |")
    lines.append("")
    for lat in (s["latency"], s["latency_1_thread"]):
        lines.append(f"Interactive answer, cached image, {lat['threads']} torch thread(s): median {lat['median_ms']} ms "
                     f"({lat['runs']} runs, min {lat['min_ms']}, max {lat['max_ms']}).")
    lines += [f"Load average during the run: {s['load_average']}.", "",
              "| photo | split | kind | target | chosen | top-2 additions | hit |", "|---|---|---|---|---|---|---|"]
    for r in s["cases"]:
        lines.append(f"| {r['photo']} | {r['split']} | {r['kind']} | {r['target']} | {', '.join(r['chosen'])} | "
                     f"{', '.join(r['top'])} | {'yes' if r['hit'] else 'no'} |")
    lines += ["", "Validation sweep (hit rate):", "", "| local_gain | point_sigma | validation | test |", "|---|---|---|---|"]
    for r in s["sweep_validation"]:
        lines.append(f"| {r['local_gain']:g} | {r['point_sigma']:g} | {r['validation']} | {r['test']} |")
    return "\n".join(lines) + "\n"
