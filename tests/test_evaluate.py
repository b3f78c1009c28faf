from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torchvision.io import write_png

import detgraft
from conftest import TINY_BUILDER
from detgraft.cli import main
from detgraft.data.dataset import Dataset
from detgraft.evaluation.metrics import compare, confusions, drift, evaluate
from tiny_model import build, images

NAMES = ["__background__", "person", "bird", "N/A", "cup", "laptop"]


def tiny_with_names(new: list[str] = ()):
    model = build()
    model.detgraft_card = detgraft.ModelCard(classes=list(NAMES))
    if new:
        detgraft.expand_predictor(model, list(new))
    return model


def dataset(tmp_path, annotations, categories, n_images=2) -> Dataset:
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for i, image in enumerate(images(n_images), start=1):
        write_png((image * 255).byte(), str(folder / f"{i}.png"))
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in range(1, n_images + 1)],
        "annotations": [
            {"id": k, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for k, (im, c, b) in enumerate(annotations, start=1)
        ],
        "categories": [{"id": i, "name": n} for i, n in categories],
    }
    (tmp_path / "data.json").write_text(json.dumps(coco))
    return Dataset(coco, folder)


def as_detections(rows):
    """{image_id: detections} from (image_id, label, [x, y, w, h], score) rows."""
    out = {}
    for image_id, label, (x, y, w, h), score in rows:
        d = out.setdefault(image_id, {"boxes": [], "labels": [], "scores": []})
        d["boxes"].append([x, y, x + w, y + h]), d["labels"].append(label), d["scores"].append(score)
    return {
        k: {"boxes": torch.tensor(v["boxes"]), "labels": torch.tensor(v["labels"]), "scores": torch.tensor(v["scores"])}
        for k, v in out.items()
    }


GT = [(1, 1, [5, 5, 20, 20]), (1, 2, [30, 30, 20, 25]), (2, 1, [10, 30, 15, 15]), (2, 4, [40, 2, 20, 10])]
CATEGORIES = [(1, "person"), (2, "bird"), (4, "cup"), (7, "giraffe")]


def test_perfect_detections_score_one(tmp_path):
    data = dataset(tmp_path, GT, CATEGORIES)
    result = evaluate(tiny_with_names(), data, detections=as_detections([(i, c, b, 1.0) for i, c, b in GT]))
    assert [(c.name, c.num_boxes) for c in result.classes] == [("person", 2), ("bird", 1), ("cup", 1)]
    # (COCOeval divides by tp + fp + machine epsilon: "1" is 1 - 2e-16)
    one = pytest.approx(1.0, abs=1e-12)
    assert all((c.ap, c.ap50, c.ap75, c.ar) == (one, one, one, one) for c in result.classes)
    assert result.groups["old"]["ap"] == one and "new" not in result.groups
    # laptop is a model class the data does not label: listed, not scored as 0
    assert result.not_evaluated == ["laptop"]


def test_hand_computed_average_precision(tmp_path):
    data = dataset(tmp_path, [(1, 1, [5, 5, 20, 20]), (2, 1, [10, 30, 15, 15])], [(1, "person")])
    rows = [(1, 1, [5, 5, 20, 20], 0.9), (1, 1, [40, 40, 10, 10], 0.8), (2, 1, [10, 30, 15, 15], 0.7)]
    result = evaluate(tiny_with_names(), data, detections=as_detections(rows))
    # ranks TP, FP, TP: interpolated precision 1 up to recall 0.5 (51 of COCO's 101 recall points)
    # and 2/3 above it (50 points): (51 + 50 * 2/3) / 101 at every IoU threshold
    expected = (51 + 50 * 2 / 3) / 101
    assert result.classes[0].ap == pytest.approx(expected, abs=1e-9)
    assert result.classes[0].ar == 1.0


def test_pycocotools_and_faster_coco_eval_agree(tmp_path):
    data = dataset(tmp_path, GT, CATEGORIES)
    g = torch.Generator().manual_seed(0)
    rows = []
    for image_id, label, (x, y, w, h) in GT * 3:  # jittered duplicates and misses
        jitter = (torch.rand(4, generator=g) * 8 - 4).tolist()
        rows.append(
            (
                image_id,
                label,
                [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]],
                torch.rand(1, generator=g).item(),
            )
        )
    rows.append((2, 2, [0, 0, 30, 30], 0.95))
    detections = as_detections(rows)
    a = evaluate(tiny_with_names(), data, detections=detections, evaluator="pycocotools")
    b = evaluate(tiny_with_names(), data, detections=detections, evaluator="faster-coco-eval")
    assert 0 < a.groups["all"]["ap"] < 1
    for x, y in zip(a.classes, b.classes):
        for metric in ("ap", "ap50", "ap75", "ar"):
            assert getattr(x, metric) == pytest.approx(getattr(y, metric), abs=1e-6), (x.name, metric)


def test_confusions_count_old_classes_on_new_objects(tmp_path):
    model = tiny_with_names(["frog"])  # label 6
    data = dataset(tmp_path, [(1, 9, [10, 10, 20, 20]), (2, 9, [5, 5, 10, 10])], [(9, "frog")])
    detections = as_detections(
        [
            (1, 2, [11, 10, 20, 20], 0.9),  # bird on the first frog
            (1, 4, [10, 10, 20, 20], 0.3),  # cup, below the score
            (2, 6, [5, 5, 10, 10], 0.9),
        ]
    )  # the second frog found as frog
    rows = confusions(model, data, detections)
    assert [(c.new_class, c.old_class, c.count, c.total) for c in rows] == [("frog", "bird", 1, 2)]
    assert rows[0].share == 0.5


def test_compare_reports_forgetting(tmp_path):
    data = dataset(tmp_path, GT, CATEGORIES)
    perfect = as_detections([(i, c, b, 1.0) for i, c, b in GT])
    worse = as_detections([(i, c, b, 1.0) for i, c, b in GT if c != 2])
    before = evaluate(tiny_with_names(), data, detections=perfect)
    after = evaluate(tiny_with_names(), data, detections=worse)
    result = compare(after, before)
    assert result["old_ap_before"] == pytest.approx(1.0) and result["kept"] == pytest.approx(2 / 3)
    assert {r["name"]: r["change"] for r in result["old_classes"]}["bird"] == pytest.approx(-1.0)


def test_drift_of_a_model_against_itself_is_perfect(tmp_path):
    model = tiny_with_names()
    data = dataset(tmp_path, [], [], n_images=3)
    result = drift(model, model, Dataset.from_folder(data.images), score=0.2)
    assert result.reference > 0
    assert (result.ap, result.ap50, result.kept) == (pytest.approx(1.0), pytest.approx(1.0), 1.0)
    other = tiny_with_names()
    with torch.no_grad():
        other.roi_heads.box_predictor.cls_score.weight.mul_(-1)
    moved = drift(other, model, Dataset.from_folder(data.images), score=0.2)
    assert moved.ap < 1.0 and moved.kept < 1.0


def test_drift_kept_needs_same_class_overlap_and_score(tmp_path):
    base = tiny_with_names()
    data = Dataset.from_folder(dataset(tmp_path, [], [], n_images=1).images)
    a, b, c, d, e = [0.0, 0, 10, 10], [20.0, 0, 30, 10], [40.0, 0, 50, 10], [0.0, 30, 10, 40], [40.0, 30, 50, 40]
    reference = {1: {"boxes": torch.tensor([a, b, c, d, e]), "labels": torch.tensor([1, 1, 1, 1, 1]),
                     "scores": torch.tensor([0.9, 0.9, 0.9, 0.9, 0.6])}}  # fmt: skip
    model = {  # a kept; b too weak; c another class; d shifted off (IoU < 0.5); e not a reference (0.6)
        1: {
            "boxes": torch.tensor([a, b, c, [6.0, 36, 16, 46], e]),
            "labels": torch.tensor([1, 1, 2, 1, 1]),
            "scores": torch.tensor([0.9, 0.5, 0.9, 0.9, 0.9]),
        }
    }
    result = drift(base, base, data, score=0.7, detections=model, base_detections=reference)
    assert result.reference == 4
    assert result.kept == pytest.approx(1 / 4)


def test_eval_command_writes_json_and_a_report_a_browser_renders(tmp_path):
    weights = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(build().state_dict(), str(weights))
    classes = tmp_path / "names.json"
    classes.write_text(json.dumps(NAMES))
    extended = detgraft.load_model(TINY_BUILDER, weights, classes)
    detgraft.expand_predictor(extended, ["frog"])
    detgraft.save_checkpoint(extended, tmp_path / "ckpt")
    dataset(tmp_path, GT + [(2, 9, [30, 30, 20, 20])], CATEGORIES + [(9, "frog")])
    out = tmp_path / "eval"
    args = [
        "eval",
        str(tmp_path / "ckpt"),
        "--data",
        str(tmp_path / "data.json"),
        "--images",
        str(tmp_path / "images"),
        "--compare",
        TINY_BUILDER,
        "--compare-weights",
        str(weights),
        "--compare-classes",
        str(classes),
        "--out",
        str(out),
        "--score",
        "0.1",
    ]
    assert main(args) == 0
    report = json.loads((out / "eval.json").read_text())
    assert set(report["groups"]) == {"old", "new", "all"} and report["comparison"]["old_classes"]
    assert report["not_evaluated"] == ["laptop"]

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium (.ci/run installs it) to render the report")
        pytest.skip("chromium is not installed")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
    page = f"file://{out / 'report.html'}"
    dom = subprocess.run([browser, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    for marker in ('id="headline"', 'id="ap-bars"', 'id="pr-curves"', 'class="confusions"'):
        assert marker in dom, marker
    assert dom.count("data:image/png;base64,") >= 2 + 2 * 2  # bars, curves, base/model per picture
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", "--window-size=1200,2000", page], capture_output=True, timeout=120
    )
    assert shot.stat().st_size > 20_000  # a page with figures, not a blank one


def _eval_json(tmp_path, data: str, model_args: list[str], name: str, *extra: str) -> dict:
    out = tmp_path / name
    assert main(["eval", *model_args, "--data", data, "--out", str(out), "--score", "0.1", *extra]) == 0
    return json.loads((out / "eval.json").read_text())


def _truth_from_detections(tmp_path, model, name: str, seed: int) -> Path:
    """A COCO json whose boxes are ``model``'s own detections on 4 noise images (PNGs in
    ``tmp_path/images``): one kept as it is, one moved by a few pixels, one object added that it
    misses, so that AP is neither 0 nor 1. Boxes are not whole pixels, as in real exports."""
    from detgraft.data.images import load_image

    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 10 + k, "name": n} for k, n in enumerate(NAMES)]}
    coco["categories"] = [c for c in coco["categories"] if c["name"] not in ("__background__", "N/A")]
    category = {c["name"]: c["id"] for c in coco["categories"]}
    for i, image in enumerate(images(4, seed=seed), start=1):
        file = folder / f"{name}_{i}.png"
        write_png((image * 255).byte(), str(file))
        coco["images"].append({"id": i, "file_name": file.name, "width": 64, "height": 64})
        with torch.no_grad():
            found = model.eval()([load_image(str(file)).float() / 255])[0]
        real = [k for k, label in enumerate(found["labels"].tolist()) if NAMES[label] not in ("N/A",)][:2]
        assert real, "the tiny model detects nothing: the comparison would prove nothing"
        boxes = [(found["labels"][k].item(), found["boxes"][k].tolist()) for k in real]
        boxes[-1] = (boxes[-1][0], [v + 2.5 for v in boxes[-1][1]])  # moved: a hit at IoU 0.5, not at 0.95
        boxes.append((1, [3.25, 40.5, 20.75, 60.125]))  # a person it misses
        for label, (x0, y0, x1, y1) in boxes:
            x1, y1 = min(x1, 64.0), min(y1, 64.0)
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": i,
                    "category_id": category[NAMES[label]],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                }
            )  # no "area": many exports leave it out
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(coco))
    return path


def test_voc_and_yolo_data_score_exactly_as_the_same_coco_json(tmp_path):
    """COCO json -> Pascal VOC and YOLO (detgraft.data.writers) -> ``detgraft eval``: the same AP for
    every class and group, to the last digit; a data.yaml is scored on its val split, never silently
    on train."""
    from detgraft.data.dataset import load_dataset
    from detgraft.data.writers import write_voc, write_yolo

    weights, classes = tmp_path / "tiny.safetensors", tmp_path / "names.json"
    safetensors.torch.save_file(build().state_dict(), str(weights))
    classes.write_text(json.dumps(NAMES))
    model = detgraft.load_model(TINY_BUILDER, weights, classes)
    model_args = [TINY_BUILDER, "--weights", str(weights), "--classes", str(classes)]
    val_json = _truth_from_detections(tmp_path, model, "val", seed=3)
    train_json = _truth_from_detections(tmp_path, model, "train", seed=4)
    val, train = load_dataset(val_json, tmp_path / "images"), load_dataset(train_json, tmp_path / "images")
    voc = write_voc(val, tmp_path / "voc")
    yolo = write_yolo(train, tmp_path / "yolo", split="train")
    write_yolo(val, tmp_path / "yolo", split="val")

    coco_result = _eval_json(tmp_path, str(val_json), model_args, "coco", "--images", str(tmp_path / "images"))
    ap = [c["ap"] for c in coco_result["classes"]]
    assert 0.05 < coco_result["groups"]["all"]["ap"] < 0.95 and len(set(ap)) > 1, ap  # a score that can differ
    for name, data in (("voc", str(voc)), ("yolo", str(yolo / "data.yaml")), ("yolo-dir", str(yolo))):
        result = _eval_json(tmp_path, data, model_args, name)
        assert result["classes"] == coco_result["classes"], name
        assert result["groups"] == coco_result["groups"], name
    on_train = _eval_json(tmp_path, f"{yolo / 'data.yaml'}:train", model_args, "yolo-train")
    train_result = _eval_json(tmp_path, str(train_json), model_args, "coco-train", "--images", str(tmp_path / "images"))
    assert on_train["groups"] == train_result["groups"] != coco_result["groups"]


def test_a_data_yaml_without_the_split_asked_for_is_an_error(tmp_path, caplog):
    from detgraft.data.readers import read_dataset
    from detgraft.data.writers import write_yolo

    data = dataset(tmp_path, GT, CATEGORIES)
    yolo = write_yolo(data, tmp_path / "yolo", split="train")
    assert len(read_dataset(yolo / "data.yaml").coco["images"]) == 2  # train, for training
    with pytest.raises(ValueError, match=r"has no 'val' split \(it has train\).*data.yaml:train"):
        read_dataset(yolo, split="val")
    assert main(["eval", TINY_BUILDER, "--data", str(yolo), "--out", str(tmp_path / "eval")]) == 2
    assert "no 'val' split" in caplog.text


def test_difficult_objects_are_neither_hit_nor_miss(tmp_path):
    """VOC ``difficult`` (COCO ``iscrowd``): a detection on it does not count as a false alarm, and
    missing it does not count as a miss; the same AP as data without it and without that detection."""
    from detgraft.data.readers import read_dataset
    from detgraft.data.writers import write_voc
    from detgraft.evaluation.metrics import coco_eval

    plain = [(1, 1, [5, 5, 20, 20]), (2, 1, [10, 30, 15, 15])]
    data = dataset(tmp_path, [*plain, (1, 1, [30, 30, 20, 25]), (2, 1, [40, 2, 20, 10])], CATEGORIES)
    for a in data.coco["annotations"][2:]:
        a["iscrowd"] = 1  # difficult
    voc = read_dataset(write_voc(data, tmp_path / "voc"))
    assert [a["iscrowd"] for a in voc.coco["annotations"]] == [0, 1, 0, 1]  # by image: 1, 1, 2, 2
    hit_difficult = [(1, 1, [30, 30, 20, 25], 0.9), (2, 1, [10, 30, 15, 15], 0.8), (1, 1, [5, 5, 20, 20], 0.3)]
    rows = [{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in hit_difficult]
    reported = (slice(None), slice(None), 0, 0, -1)  # [T, R, class, area "all", 100 detections]: what detgraft reports
    with_difficult = coco_eval(voc.coco, rows, [1])[0][reported]
    without = {**data.coco, "annotations": data.coco["annotations"][:2]}
    alone = coco_eval(without, [r for r in rows if r["score"] != 0.9], [1])[0][reported]
    assert np.array_equal(with_difficult, alone)
    as_false_alarm = coco_eval(without, rows, [1])[0][reported]
    assert not np.array_equal(with_difficult, as_false_alarm)  # counted, it would lower precision


def test_a_report_leaves_matplotlib_s_backend_alone_and_draws_the_loss(tmp_path):
    """A notebook's backend is the user's: writing report.html must not switch it (it used to
    call matplotlib.use("Agg"))."""
    import matplotlib

    from detgraft.evaluation.report import write_report

    model = tiny_with_names()
    data = dataset(tmp_path, GT, CATEGORIES)
    result = evaluate(model, data, detections=as_detections([(1, 1, [5, 5, 20, 20], 0.9)]))
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        page = write_report(
            tmp_path / "report.html", "t", result, data, {}, NAMES, loss={"from_step": 0, "loss": [2.0, 1.5, 1.2]}
        )
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert "id='loss-curve' src='data:image/png;base64," in page.read_text()
