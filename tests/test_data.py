"""The user's data as it comes: three formats read into one form, every problem named and counted,
images of every mode loaded upright, and no raw traceback for anything a file can hold."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_coco
from detgraft.cli import main
from detgraft.data.check import DataError, check_dataset
from detgraft.data.images import ImageError, image_size, load_image
from detgraft.data.readers import combine, read_dataset
from detgraft.data.writers import write_voc, write_yolo

BOXES = [[4, 4, 20, 24], [30, 28, 26, 30]]


def _contents(data):
    """What a dataset says, independent of its format: per image file name, its (name, box) pairs."""
    names = {c["id"]: c["name"] for c in data.coco["categories"]}
    files = {im["id"]: data.path(im).name for im in data.coco["images"]}
    out: dict = {name: [] for name in files.values()}
    for a in data.coco["annotations"]:
        out[files[a["image_id"]]].append((names[a["category_id"]], [round(v, 9) for v in a["bbox"]]))
    return out


def test_coco_voc_and_yolo_give_the_same_data(tmp_path):
    coco = write_coco(tmp_path, "train", ["chicken", "frog"], BOXES)
    voc = read_dataset(write_voc(coco, tmp_path / "voc"))
    yolo = read_dataset(write_yolo(coco, tmp_path / "yolo"))
    expected = _contents(check_dataset(read_dataset(tmp_path / "train.json", tmp_path / "images"))[0])
    for data in (voc, yolo, read_dataset(tmp_path / "yolo" / "images" / "train")):
        assert _contents(check_dataset(data)[0]) == expected
    both = combine([check_dataset(voc)[0], check_dataset(yolo)[0]])
    assert len(both.coco["images"]) == 12 and [c["name"] for c in both.coco["categories"]] == ["chicken", "frog"]


def _broken(tmp_path):
    """A COCO export with one of each problem (and three good images)."""
    data = write_coco(tmp_path, "train", ["chicken", "frog"], BOXES, count=3)
    folder = tmp_path / "images"
    good = (folder / "train_0.png").read_bytes()
    Image.new("RGB", (64, 64), (90, 20, 20)).save(folder / "cut.jpg")
    (folder / "cut.jpg").write_bytes((folder / "cut.jpg").read_bytes()[:300])  # a truncated JPEG
    (folder / "notes.jpg").write_text("not an image")
    (folder / "empty.png").write_bytes(good)
    coco = data.coco
    coco["images"] += [
        {"id": 10, "file_name": "gone.jpg"},
        {"id": 11, "file_name": "cut.jpg"},
        {"id": 12, "file_name": "notes.jpg"},
        {"id": 13, "file_name": "empty.png", "width": 32, "height": 64},
    ]
    ann = len(coco["annotations"]) + 100
    extra = [
        (1, 100, [1, 2, 10, 10]),  # duplicate: annotation ids must be unique (set below)
        (99, 100, [1, 2, 10, 10]),  # unknown image id
        (1, 7, [1, 2, 10, 10]),  # unknown category
        (1, 100, [1, "2", 10, 10]),  # a string in the box
        (1, 100, [1, float("nan"), 10, 10]),
        (1, 100, [10, 10, -5, 10]),  # inverted
        (2, 100, [50, 50, 30, 30]),  # partly outside: clipped
        (2, 101, [80, 80, 5, 5]),  # outside: dropped
    ]
    for k, (image_id, category_id, bbox) in enumerate(extra):
        coco["annotations"].append({"id": ann + k, "image_id": image_id, "category_id": category_id, "bbox": bbox})
    coco["annotations"][-len(extra)]["id"] = coco["annotations"][0]["id"]
    coco["images"].append(dict(coco["images"][0]))  # a duplicate image id
    (tmp_path / "broken.json").write_text(json.dumps(coco))
    return tmp_path / "broken.json"


def test_every_problem_is_named_handled_and_counted(tmp_path):
    path = _broken(tmp_path)
    data = read_dataset(path)  # images/ beside the json
    cleaned, report = check_dataset(data, raise_errors=False)
    assert report.counts() == {
        "duplicate_id": 2,
        "missing_image": 1,
        "unreadable_image": 2,
        "size_corrected": 1,
        "unknown_image_id": 1,
        "unknown_category": 1,
        "not_a_box": 1,
        "non_finite_box": 1,
        "empty_box": 2,
        "clipped_box": 1,
        "no_boxes": 1,
    }
    assert {p.where.rsplit("/", 1)[-1] for p in report.problems if p.kind == "unreadable_image"} == {
        "cut.jpg",
        "notes.jpg",
    }
    clipped = [a for a in cleaned.coco["annotations"] if a["image_id"] == 2 and a["category_id"] == 100][-1]
    assert clipped["bbox"] == [50.0, 50.0, 14.0, 14.0]
    assert next(im for im in cleaned.coco["images"] if im["id"] == 13)["width"] == 64
    with pytest.raises(DataError, match=r"gone.jpg.*does not exist") as raised:
        check_dataset(data)
    assert "image_id 99" in str(raised.value) and "--skip-bad" in str(raised.value)
    _, skipping = check_dataset(data, skip_bad=True, raise_errors=False)
    assert skipping.counts()["skipped_image"] == 3
    assert {p.kind for p in skipping.errors()} == {"duplicate_id", "unknown_image_id", "unknown_category"}


def test_extend_and_eval_stop_on_bad_data_before_loading_the_model(tmp_path, caplog):
    path = _broken(tmp_path)
    code = main(["extend", "--base", "no-such-model", "--train", str(path), "--out", str(tmp_path / "run")])
    assert code == 2 and "broken.json: " in caplog.text and "gone.jpg" in caplog.text
    assert not (tmp_path / "run").exists()
    assert main(["eval", "no-such-model", "--data", str(path)]) == 2


def test_data_check_prints_a_table_and_writes_json(tmp_path, capsys):
    path = _broken(tmp_path)
    assert main(["data", "check", str(path), "--json", str(tmp_path / "report.json")]) == 1
    shown = capsys.readouterr().out
    assert "unreadable_image" in shown and "clipped to the image" in shown
    (report,) = json.loads((tmp_path / "report.json").read_text())
    assert report["counts"]["empty_box"] == 2 and report["boxes_per_class"] == {"chicken": 4, "frog": 3}
    (tmp_path / "clean").mkdir()
    clean = write_coco(tmp_path / "clean", "train", ["chicken"], BOXES[:1])
    assert main(["data", "check", str(clean.source)]) == 0


def test_images_of_every_mode_load_as_upright_rgb(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:5, :10] = (200, 100, 50)  # a mark in the top-left corner
    Image.fromarray(rgb).save(tmp_path / "plain.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit grayscale
    Image.fromarray(rgb).save(tmp_path / "plain.bmp")
    # a camera that stored the picture turned (EXIF orientation 6: rotate 90 clockwise to view)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(rgb, 1).copy()).save(tmp_path / "turned.jpg", exif=exif, quality=100)
    for name in ("plain.png", "gray.png", "palette.png", "rgba.png", "deep.png", "plain.bmp", "turned.jpg"):
        image = load_image(tmp_path / name)
        assert image.dtype == torch.uint8 and image.shape == (3, 20, 30), name
        assert image_size(tmp_path / name, decode=True) == (30, 20), name
        assert image[:, :5, :10].float().mean() > 60 and image[:, 10:, 15:].float().mean() < 10, name
    with pytest.raises(ImageError, match="notes.jpg"):
        (tmp_path / "notes.jpg").write_text("text")
        load_image(tmp_path / "notes.jpg")


ALLOWED = (ValueError, FileNotFoundError)  # DataError and ImageError are ValueErrors


def _mutations(text: str, rng: random.Random, n: int) -> list[str]:
    """Truncations and small corruptions of ``text``."""
    out = [text[: rng.randrange(len(text))] for _ in range(n)]
    for _ in range(n):
        k = rng.randrange(len(text))
        out.append(
            text[:k] + rng.choice(['"x"', "null", "[]", "{}", "-1e309", "NaN", "<", "0 0", "\n", "é"]) + text[k:]
        )
    return out


def test_fuzzed_files_give_clear_errors_never_tracebacks(tmp_path):
    """Every reader and the check, fed truncated and corrupted files of each format: a ValueError or
    FileNotFoundError naming the file, or a report; nothing else escapes."""
    rng = random.Random(0)
    coco = write_coco(tmp_path, "train", ["chicken", "frog"], BOXES, count=2)
    write_voc(coco, tmp_path / "voc")
    write_yolo(coco, tmp_path / "yolo")
    xml = next((tmp_path / "voc" / "Annotations").glob("*.xml"))
    label = next((tmp_path / "yolo" / "labels" / "train").glob("*.txt"))
    image = next((tmp_path / "voc" / "JPEGImages").glob("*.png"))
    cases = [
        (tmp_path / "train.json", tmp_path / "train.json", tmp_path / "train.json"),
        (xml, xml, tmp_path / "voc"),
        (label, label, tmp_path / "yolo"),
        (tmp_path / "yolo" / "data.yaml", tmp_path / "yolo" / "data.yaml", tmp_path / "yolo"),
    ]
    tried = 0
    for original, target, dataset in cases:
        text = original.read_text()
        for mutated in _mutations(text, rng, 15):
            target.write_text(mutated)
            try:
                check_dataset(read_dataset(dataset, tmp_path / "images" if dataset.suffix == ".json" else None))
            except ALLOWED as err:  # the message names the mutated file (or, for a data.yaml, its dataset)
                assert target.name in str(err) or str(dataset) in str(err), (str(err), mutated)
            tried += 1
        target.write_text(text)
    good = image.read_bytes()
    for cut in (0, 10, len(good) // 2):  # truncated and empty images
        image.write_bytes(good[:cut])
        with pytest.raises(DataError, match=image.name):
            check_dataset(read_dataset(tmp_path / "voc"))
        tried += 1
    image.write_bytes(good)
    assert tried == 4 * 30 + 3


def test_jitter_keeps_boxes_and_masks_on_their_objects():
    """Each box's mask is the filled box: after every jitter, a kept box with a mask still bounds
    its mask (to a pixel), boxes stay in the picture, and the masks still come first."""
    from detgraft.data.batches import jittered

    boxes = torch.tensor([[10.0, 12.0, 40.0, 50.0], [30.0, 5.0, 60.0, 30.0], [5.0, 40.0, 25.0, 62.0]])
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    for k, (x0, y0, x1, y1) in enumerate(boxes[:2].int().tolist()):
        masks[k, y0:y1, x0:x1] = 1
    target = {"boxes": boxes, "labels": torch.tensor([1, 2, 3]), "masks": masks}
    moved = 0
    for seed in range(40):
        image, out = jittered(torch.rand(3, 64, 64), target, seed)
        h, w = image.shape[-2:]
        assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
        assert (out["boxes"][:, 2:] > out["boxes"][:, :2]).all()
        assert (out["boxes"] >= 0).all() and (out["boxes"][:, [2, 3]] <= torch.tensor([w, h])).all()
        assert len(out["labels"]) == len(out["boxes"]) and len(out["masks"]) <= 2
        for box, mask in zip(out["boxes"], out["masks"]):
            ys, xs = torch.where(mask > 0)
            drawn = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            torch.testing.assert_close(box, drawn, atol=1.5, rtol=0)
        moved += not torch.equal(out["boxes"], boxes)
    assert moved > 5  # the geometric transforms did act
    _, out_again = jittered(torch.full((3, 64, 64), 0.5), target, 39)
    assert torch.equal(out_again["boxes"], out["boxes"])  # seeded: the same boxes for the same seed


def test_workers_give_the_batches_of_the_loop(tmp_path):
    from detgraft.data.batches import TrainingSet, training_batches
    from detgraft.settings import ExtendSettings

    data = TrainingSet(write_coco(tmp_path, "train", ["chicken", "frog"], BOXES), {100: 5, 101: 6})
    settings = ExtendSettings(batch_size=4, jitter=True, workers=2)
    loaded = list(training_batches(data, 3, 7, settings))
    assert len(loaded) == 4
    for step, (images, targets) in zip(range(3, 7), loaded):
        expected_images, expected_targets = data.batch(step, 4, 0, True, jitter=True)
        assert all(torch.equal(a, b) for a, b in zip(images, expected_images))
        assert all(torch.equal(a[k], b[k]) for a, b in zip(targets, expected_targets) for k in b)


def test_categories_choose_and_rename(tmp_path):
    from detgraft.data.readers import choose_categories

    data = check_dataset(
        read_dataset(write_coco(tmp_path, "train", ["Hen", "frog", "cup"], BOXES + [[2, 40, 10, 10]]).source)
    )[0]
    chosen = choose_categories(data, "hen=chicken, FROG")
    assert [c["name"] for c in chosen.coco["categories"]] == ["chicken", "frog"]
    assert len(chosen.coco["annotations"]) == 12  # the cups left out
    with pytest.raises(ValueError, match=r"does not have; it has 'Hen', 'frog', 'cup'"):
        choose_categories(data, "duck")
