from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision
from torchvision.io import write_png

import detgraft
from conftest import TINY_BUILDER, write_coco
from detgraft import ops
from detgraft.cli import _parser, main
from detgraft.data.images import ImageError
from detgraft.extend import extend
from detgraft.model.families import by_name
from detgraft.settings import ExtendSettings, auto_lr
from tiny_model import build
from tiny_model import images as tiny_images


@pytest.fixture
def train(tmp_path):
    return write_coco(tmp_path, "train", ["chicken", "frog"], [[4, 4, 30, 30], [30, 20, 30, 40]])


def base_model():
    file, function = TINY_BUILDER.rsplit(":", 1)
    model = build()
    detgraft.get_card(model).builder = {"kind": "python", "file": file, "function": function, "kwargs": {}}
    return model


def settings(**kw):
    return ExtendSettings(**({"strategy": "naive", "steps": 4, "batch_size": 2, "lr": 0.01, "warmup": 2} | kw))


def test_seeded_runs_repeat_exactly(train, tmp_path):
    a = extend(base_model(), train, settings(strategy="pseudo", keep=0.3, ignore=0.1), out=tmp_path / "a")
    b = extend(base_model(), train, settings(strategy="pseudo", keep=0.3, ignore=0.1), out=tmp_path / "b")
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(v, sb[k]) for k, v in sa.items())
    assert not torch.equal(sa["roi_heads.box_head.fc6.weight"], build().state_dict()["roi_heads.box_head.fc6.weight"])
    assert json.loads((tmp_path / "a" / "mapping.json").read_text()) == {"chicken": 6, "frog": 7}


def test_extend_runs_detgraft_ops_on_the_cpu_and_gives_torchvision_s_back(train, tmp_path, monkeypatch):
    original = torchvision.ops.poolers.roi_align, torchvision.ops.boxes.batched_nms
    calls = []
    forward, batched = detgraft._core.roi_align_forward, detgraft._core.batched_nms
    monkeypatch.setattr(detgraft._core, "roi_align_forward", lambda *a: calls.append("roi") or forward(*a))
    monkeypatch.setattr(detgraft._core, "batched_nms", lambda *a: calls.append("nms") or batched(*a))
    extend(base_model(), train, settings(strategy="branch"), out=tmp_path / "run")
    assert {"roi", "nms"} <= set(calls)
    assert (torchvision.ops.poolers.roi_align, torchvision.ops.boxes.batched_nms) == original


@pytest.mark.parametrize("strategy", ["naive", "branch"])
def test_ctrl_c_leaves_a_usable_checkpoint_and_resume_continues_exactly(train, tmp_path, strategy, monkeypatch):
    whole = extend(base_model(), train, settings(strategy=strategy), out=tmp_path / "whole")

    calls = []
    sgd_step = torch.optim.SGD.step

    def press_ctrl_c(optimizer, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives during step 2 (index 1)
        return sgd_step(optimizer, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.SGD, "step", press_ctrl_c)
        with pytest.raises(KeyboardInterrupt, match="stopped at step 2"):
            extend(base_model(), train, settings(strategy=strategy), out=tmp_path / "cut")
    last = detgraft.load_checkpoint(tmp_path / "cut" / "last")  # usable as it is
    assert detgraft.get_card(last).classes[6:] == ["chicken", "frog"]
    assert torch.load(tmp_path / "cut" / "last" / "train_state.pt", weights_only=True)["step"] == 2

    resumed = extend(base_model(), train, settings(strategy=strategy), out=tmp_path / "cut", resume=True)
    expected = whole.state_dict()
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_resume_refuses_other_settings(train, tmp_path):
    extend(base_model(), train, settings(steps=2), out=tmp_path / "run")
    with pytest.raises(ValueError, match="these differ: lr"):
        extend(base_model(), train, settings(steps=4, lr=0.5), out=tmp_path / "run", resume=True)


def test_a_non_finite_loss_stops_with_a_clear_message(train, tmp_path):
    model = base_model()
    model.register_forward_hook(
        lambda m, a, out: {k: v * float("nan") for k, v in out.items()} if isinstance(out, dict) else None
    )
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 0 .* lower --lr"):
        extend(model, train, settings(), out=tmp_path / "nan")
    assert "training stopped" in (tmp_path / "nan" / "extend.log").read_text()  # the run's log says so too


def test_a_category_the_model_has_is_an_error_that_offers_the_choice(tmp_path):
    data = write_coco(tmp_path, "clash", ["chicken", "Class 2"], [[4, 4, 30, 30], [30, 20, 30, 40]])
    with pytest.raises(ValueError, match=r"already has 'Class 2' \(the model's label 2\).*--existing train"):
        extend(base_model(), data, settings(), out=tmp_path / "x")
    model = extend(base_model(), data, settings(existing="ignore"), out=tmp_path / "ignore")
    assert detgraft.get_card(model).classes[-1] == "chicken" and detgraft.get_card(model).num_classes == 7
    mapping = json.loads((tmp_path / "ignore" / "mapping.json").read_text())
    assert mapping == {"chicken": 6}
    for strategy in ("naive", "branch"):  # branch: the labelled old objects teach its 'others' output
        model = extend(base_model(), data, settings(existing="train", strategy=strategy), out=tmp_path / strategy)
        assert detgraft.get_card(model).num_classes == 7


def test_every_setting_is_a_flag_with_the_same_default():
    parser = _parser()
    args = parser.parse_args(["extend", "--base", "m", "--train", "t", "--images", "i", "--out", "o"])
    for f in fields(ExtendSettings):
        assert getattr(args, f.name) == f.default, f.name
    args = parser.parse_args(
        ["extend", "--base", "m", "--train", "t", "--images", "i", "--out", "o", "--merge-iou", "none", "--no-hflip"]
    )
    assert args.merge_iou is None and args.hflip is False


def test_extend_command_writes_checkpoint_settings_log_and_evaluation(train, tmp_path):
    weights = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(build().state_dict(), str(weights))
    write_coco(tmp_path, "val", ["class_1", "chicken"], [[2, 2, 20, 20], [4, 4, 30, 30]], count=3)
    out = tmp_path / "out"
    argv = ["extend", "--base", TINY_BUILDER, "--weights", str(weights), "--train", str(tmp_path / "train.json"),
            "--images", str(tmp_path / "images"), "--val", str(tmp_path / "val.json"), "--out", str(out),
            "--steps", "2", "--batch-size", "2", "--lr", "0.01"]  # fmt: skip
    assert main(argv) == 0
    for name in ("model.safetensors", "detgraft.json", "settings.json", "mapping.json", "extend.log", "extend.json",
                 "eval.json", "report.html"):  # fmt: skip
        assert (out / name).is_file(), name
    model = detgraft.load_model(out)
    assert detgraft.get_card(model).classes[6:] == ["chicken", "frog"]
    assert detgraft.get_card(model).history[-1]["strategy"] == "branch"
    assert json.loads((out / "settings.json").read_text())["settings"]["steps"] == 2
    assert {c["name"] for c in json.loads((out / "eval.json").read_text())["classes"]} == {"class_1", "chicken"}
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["base"]["groups"]["old"] and evaluation["comparison"]["old_classes"][0]["name"] == "class_1"
    assert "<figcaption>base</figcaption>" in (out / "report.html").read_text()  # before/after pictures
    assert main(argv[:-6] + ["--strategy", "everything"]) == 2  # a clear error, not a traceback


def test_extend_scores_a_voc_val_exactly_as_eval_scores_the_same_coco_json(train, tmp_path):
    from detgraft.data.writers import write_voc

    weights = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(build().state_dict(), str(weights))
    val = write_coco(tmp_path, "val", ["class_1", "chicken"], [[2, 2, 20, 20], [4, 4, 30, 30]], count=3)
    voc = write_voc(val, tmp_path / "voc")
    out = tmp_path / "out"
    argv = ["extend", "--base", TINY_BUILDER, "--weights", str(weights), "--train", str(tmp_path / "train.json"),
            "--images", str(tmp_path / "images"), "--val", str(voc), "--out", str(out),
            "--steps", "2", "--batch-size", "2", "--lr", "0.01"]  # fmt: skip
    assert main(argv) == 0
    data = ["--data", str(tmp_path / "val.json"), "--images", str(tmp_path / "images")]
    with ops.everywhere():  # the ops extend scores with on the CPU: the same computation, so equal to the digit
        assert main(["eval", str(out), *data, "--out", str(tmp_path / "eval"), "--score", "0.5"]) == 0
    during, after = (json.loads((p / "eval.json").read_text()) for p in (out, tmp_path / "eval"))
    assert {c["name"] for c in after["classes"]} == {"class_1", "chicken"}
    assert during["classes"] == after["classes"] and during["groups"] == after["groups"]


def test_extend_with_val_of_new_classes_only_reports_without_a_before(train, tmp_path):
    val = write_coco(tmp_path, "val", ["chicken"], [[4, 4, 30, 30]], count=2)  # no class the base has
    extend(base_model(), train, settings(steps=1), out=tmp_path / "out", val=val)
    evaluation = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert evaluation["base"] is None and evaluation["comparison"] is None
    assert {c["name"] for c in evaluation["classes"]} == {"chicken"}
    assert "<figcaption>base</figcaption>" not in (tmp_path / "out" / "report.html").read_text()


def test_a_new_class_without_a_box_is_an_error_that_names_it(tmp_path):
    data = write_coco(tmp_path, "half", ["chicken", "frog"], [[4, 4, 30, 30]])  # no frog box anywhere
    with pytest.raises(ValueError, match="no box of 'frog'"):
        extend(base_model(), data, settings(), out=tmp_path / "x")
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_the_default_budget_follows_the_data_and_is_recorded(train, tmp_path):
    from detgraft.settings import AUTO_EPOCHS, AUTO_MAX_STEPS, AUTO_MIN_STEPS, auto_steps

    assert auto_steps(17, 8) == AUTO_MIN_STEPS  # a few images: the floor, not the full run's steps
    assert auto_steps(600, 8) == min(AUTO_MAX_STEPS, AUTO_EPOCHS * 600 // 8)
    assert auto_steps(10_000, 8) == AUTO_MAX_STEPS
    extend(base_model(), train, settings(strategy="branch", steps=None), out=tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "settings.json").read_text())["settings"]
    assert saved["steps"] == auto_steps(6, 2)
    assert saved["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto, as it ran
    record = json.loads((tmp_path / "out" / "extend.json").read_text())
    assert record["steps"] == auto_steps(6, 2) and record["arbitration"]["new_boxes"] == 12
    # which old classes the base fired on the labelled new objects: one count per false alarm
    assert sum(record["arbitration"]["false_alarm_labels"].values()) == record["arbitration"]["false_alarms"]
    assert bool(detgraft.load_model(tmp_path / "out").roi_heads.branches[0].calibrated)


def test_old_class_images_reach_the_arbitration_and_are_recorded(train, tmp_path):
    from detgraft.extend import OLD_IMAGES

    folder = tmp_path / "old"
    folder.mkdir()
    for i, image in enumerate(tiny_images(OLD_IMAGES + 2, seed=3)):
        write_png((image * 255).byte(), str(folder / f"old_{i:03d}.png"))
    files = sorted(folder.iterdir())
    extend(base_model(), train, settings(strategy="branch"), out=tmp_path / "out", old_images=files)
    saved = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert saved["old_images"] == {"files": OLD_IMAGES, "folder": str(folder)}  # at most OLD_IMAGES, evenly spaced
    assert "old_image_objects" in json.loads((tmp_path / "out" / "extend.json").read_text())["arbitration"]
    with pytest.raises(ValueError, match="--strategy naive"):
        extend(base_model(), train, settings(), out=tmp_path / "naive", old_images=files)
    (folder / "old_000.png").write_bytes(b"not a png")
    with pytest.raises(ImageError, match="old_000.png"):  # found before training, named
        extend(base_model(), train, settings(strategy="branch"), out=tmp_path / "bad", old_images=files)
    assert not (tmp_path / "bad" / "model.safetensors").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["extend", "--base", TINY_BUILDER, "--train", str(tmp_path / "train.json"), "--out", str(tmp_path / "x"),
            "--old-images", str(empty)]  # fmt: skip
    assert main(argv) == 2


def test_the_default_learning_rate_follows_the_strategy_and_family(train, tmp_path):
    # the whole-network strategies diverge at the heads' rate: naive gave a NaN loss at 0.05
    rcnn, mask, fcos, retinanet = (by_name(n) for n in ("faster_rcnn", "mask_rcnn", "fcos", "retinanet"))
    assert auto_lr("branch", rcnn) == 0.05 and auto_lr("head", mask) == 0.05
    assert all(auto_lr(s, rcnn) == 0.01 for s in ("naive", "pseudo", "distill"))
    assert auto_lr("branch", fcos) == auto_lr("branch", retinanet) == 0.01 and auto_lr("head", fcos) == 0.05
    assert ExtendSettings().lr is None  # auto: extend resolves it, knowing the model's family
    assert ExtendSettings(strategy="naive", lr=0.02).lr == 0.02
    extend(base_model(), train, settings(lr=None), out=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "settings.json").read_text())["settings"]["lr"] == 0.01
    argv = ["extend", "--base", "m", "--train", "t", "--images", "i", "--out", "o", "--lr", "auto"]
    assert _parser().parse_args(argv).lr is None


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_and_is_recorded(train, tmp_path, amp):
    """--amp on the CPU (autocast runs there too; on CUDA auto picks bf16 or fp16): the step runs in
    that precision (other losses than float32's), stays finite, and settings.json says which."""
    if not torch.cuda.is_available():
        assert ExtendSettings().amp == "off"  # auto: full precision on the CPU
    full = extend(base_model(), train, settings(), out=tmp_path / "full")
    mixed = extend(base_model(), train, settings(amp=amp), out=tmp_path / "mixed")
    curves = [
        json.loads((tmp_path / run / "extend.json").read_text())["loss_curve"]["loss"] for run in ("full", "mixed")
    ]
    assert all(map(math.isfinite, curves[1])) and curves[0] != curves[1]
    assert json.loads((tmp_path / "mixed" / "settings.json").read_text())["settings"]["amp"] == amp
    assert not torch.equal(full.state_dict()["roi_heads.box_predictor.cls_score.weight"],
                           mixed.state_dict()["roi_heads.box_predictor.cls_score.weight"])  # fmt: skip
    with pytest.raises(ValueError, match="amp 'fp8' is unknown"):
        ExtendSettings(amp="fp8")


def test_tensorboard_gets_each_loss_part_per_step_and_the_val_ap(train, tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs the tensorboard extra (.ci/run)")
        pytest.skip("tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    val = write_coco(tmp_path, "val", ["class_1", "chicken"], [[2, 2, 20, 20], [4, 4, 30, 30]], count=2)
    extend(base_model(), train, settings(steps=3), out=tmp_path / "out", val=val, tensorboard=tmp_path / "tb")
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    tags = events.Tags()["scalars"]
    assert {"loss/total", "loss/loss_classifier", "loss/loss_box_reg", "val/all_ap", "val/new_ap"} <= set(tags)
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2, 3]
    saved = json.loads((tmp_path / "out" / "extend.json").read_text())["loss_curve"]["loss"]
    assert [e.value for e in events.Scalars("loss/total")] == pytest.approx(saved)


def test_without_tensorboard_the_flag_is_one_line_with_the_pip_command(train, tmp_path, monkeypatch):
    from detgraft.extras import MissingPackage

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(MissingPackage, match=r"^--tensorboard needs tensorboard: pip install tensorboard$"):
        extend(base_model(), train, settings(steps=1), out=tmp_path / "out", tensorboard=tmp_path / "tb")


def test_replay_matches_class_names_as_the_training_file_does():
    """A --replay category is matched to the model's class by ``normalize_name``, as --train's are:
    'traffic_light' is the model's 'traffic light' (detgraft 0.1 dropped it: it compared lower())."""
    from detgraft.data.dataset import Dataset
    from detgraft.extend import replay_labels
    from detgraft.model.card import ModelCard

    card = ModelCard(classes=["__background__", "traffic light", "N/A", "Person"])
    categories = [{"id": 7, "name": "traffic_light"}, {"id": 8, "name": "person"}, {"id": 9, "name": "zebra"}]
    replay = Dataset({"images": [], "annotations": [], "categories": categories}, Path("."))
    assert replay_labels(replay, card) == {7: 1, 8: 3}
