"""The frozen base computed once per training example (``detgraft.kept``): the same training as
computing it in every step, within float rounding."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import detgraft.kept
from conftest import write_coco
from detgraft.extend import extend
from detgraft.heads import rcnn
from test_extend import base_model, settings

# each image's base alone instead of padded in a batch of images of the same size: float rounding
# (measured here: 8e-8 relative on the weights after 6 steps)
RTOL = 1e-5


@pytest.fixture
def train(tmp_path):
    return write_coco(tmp_path, "train", ["chicken", "frog"], [[4, 4, 30, 30], [30, 20, 30, 40]])


def sampling_model():
    """The tiny model with RoI and anchor samples smaller than its candidates: the samplers' draws
    decide what the losses see."""
    model = base_model()
    model.roi_heads.fg_bg_sampler.batch_size_per_image = 16
    model.rpn.fg_bg_sampler.batch_size_per_image = 32
    return model


def run(train, out, steps=6, **kw):
    # the trained weights are compared: the box head kept whole (the singular vectors of its
    # compression turn with float rounding where two singular values are close)
    kw.setdefault("branch_rank", 0)
    model = sampling_model()
    calls = {"backbone": 0, "kept_steps": 0}
    # images through the backbone (a batch counts its images)
    model.backbone.register_forward_hook(
        lambda m, args, out: calls.__setitem__("backbone", calls["backbone"] + len(args[0]))
    )
    step = detgraft.kept.KeptStep.forward

    def counted(self, keys):
        calls["kept_steps"] += 1
        return step(self, keys)

    fill = detgraft.kept.KeptStore.fill

    def counted_fill(self, keys):
        calls["examples"] = len(keys)
        return fill(self, keys)

    detgraft.kept.KeptStep.forward, detgraft.kept.KeptStore.fill = counted, counted_fill
    try:
        extend(model, train, settings(strategy="branch", steps=steps, **kw), out=out)
    finally:
        detgraft.kept.KeptStep.forward, detgraft.kept.KeptStore.fill = step, fill
    return model, calls, json.loads((out / "extend.json").read_text())


def relative_difference(a, b) -> float:
    """The largest |a - b| over each tensor's largest |b|, over all float tensors of two state dicts."""
    sa, sb = a.state_dict(), b.state_dict()
    worst = 0.0
    for k, v in sa.items():
        if v.is_floating_point() and v.numel():
            worst = max(worst, (v.double() - sb[k].double()).abs().max().item() / max(sb[k].abs().max().item(), 1e-12))
    return worst


def test_kept_training_equals_training_that_computes_the_base_in_every_step(train, tmp_path):
    # 12 steps of 2: each of the 6 images and each of their mirror images appears in some step
    kept, kept_calls, kept_run = run(train, tmp_path / "kept", steps=12)
    every, every_calls, every_run = run(train, tmp_path / "every", steps=12, frozen_memory=0)
    assert kept_calls["kept_steps"] == 12 and every_calls["kept_steps"] == 0
    assert every_calls["backbone"] == 12 * 2 + 12  # each step's 2 images, then calibration's 6 and their mirrors
    # each training example (an image, or its mirror image) through the backbone once; calibration reads them
    assert kept_calls["backbone"] == kept_calls["examples"] == 2 * len(train.coco["images"])
    a, b = kept_run["loss_curve"]["loss"], every_run["loss_curve"]["loss"]
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=RTOL, atol=0)
    assert relative_difference(kept, every) < RTOL
    branch = kept.roi_heads.branches[0]
    assert not torch.equal(branch.box_head.fc6.weight, kept.roi_heads.box_head.fc6.weight)  # it trained
    assert torch.equal(branch.prototypes, every.roi_heads.branches[0].prototypes) or torch.allclose(
        branch.prototypes, every.roi_heads.branches[0].prototypes, rtol=RTOL, atol=1e-6
    )


def test_the_step_replays_the_random_draws_it_skips(train, tmp_path, monkeypatch):
    """Without the replay of the transform's and the RPN sampler's draws, the RoI sampler draws
    other RoIs: the losses move by far more than rounding (the test above can fail)."""
    _, _, every = run(train, tmp_path / "every", frozen_memory=0)
    monkeypatch.setattr(rcnn, "_replay_draws", lambda model, kept: None)
    _, _, unreplayed = run(train, tmp_path / "unreplayed")
    a, b = unreplayed["loss_curve"]["loss"], every["loss_curve"]["loss"]
    assert max(abs(x - y) / abs(y) for x, y in zip(a, b)) > 100 * RTOL


def test_beyond_the_memory_budget_examples_are_computed_in_their_step(train, tmp_path, caplog):
    kept, _, _ = run(train, tmp_path / "kept")
    with caplog.at_level(logging.INFO, logger="detgraft.kept"):
        none_kept, calls, _ = run(train, tmp_path / "none", frozen_memory=1e-9)
    assert "frozen base kept for 0 of" in caplog.text and "raise --frozen-memory" in caplog.text
    assert calls["kept_steps"] == 6
    assert relative_difference(none_kept, kept) < RTOL  # the same computation, one example at a time


def test_float16_keeps_half_the_bytes_and_trains_within_its_rounding(train, tmp_path, caplog):
    kept, _, _ = run(train, tmp_path / "kept")
    with caplog.at_level(logging.INFO, logger="detgraft.kept"):
        half, _, _ = run(train, tmp_path / "half", frozen_dtype="float16")
    assert "float16" in caplog.text
    difference = relative_difference(half, kept)
    assert 0 < difference < 1e-2


def test_jitter_computes_the_base_in_every_step_and_says_why(train, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="detgraft.kept"):
        _, calls, _ = run(train, tmp_path / "jitter", jitter=True)
    assert calls["kept_steps"] == 0
    assert "computed in every step: --jitter" in caplog.text


def test_settings_refuse_a_frozen_dtype_they_do_not_know():
    with pytest.raises(ValueError, match="frozen_dtype 'int8' is unknown"):
        settings(frozen_dtype="int8")
    with pytest.raises(ValueError, match="frozen_memory must be 0 or more"):
        settings(frozen_memory=-1)


def test_a_mask_rcnn_branch_trains_the_same_with_kept_features(tmp_path):
    from test_families import _with_polygons
    from test_families import build as build_family

    data = write_coco(tmp_path, "train", ["chicken", "frog"], [[4, 4, 20, 24], [30, 28, 26, 30]])
    data = _with_polygons(data, 101)
    runs = {}
    for name, kw in (("kept", {}), ("every", {"frozen_memory": 0})):
        model = build_family("maskrcnn_resnet50_fpn")
        extend(model, data, settings(strategy="branch", steps=3, **kw), out=tmp_path / name)
        runs[name] = model, json.loads((tmp_path / name / "extend.json").read_text())
    (kept, kept_run), (every, every_run) = runs["kept"], runs["every"]
    assert kept_run["phases"]["frozen_pass"] > 0 and "loss_mask" in kept_run["final_losses"]
    a, b = kept_run["loss_curve"]["loss"], every_run["loss_curve"]["loss"]
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=0)
    assert relative_difference(kept, every) < 1e-4


def test_bf16_autocast_keeps_bf16_feature_maps_and_trains_like_every_step(train, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="detgraft.kept"):
        _, calls, kept = run(train, tmp_path / "kept", amp="bf16")
    _, _, every = run(train, tmp_path / "every", amp="bf16", frozen_memory=0)
    assert calls["kept_steps"] == 6 and "as computed" in caplog.text
    a, b = kept["loss_curve"]["loss"], every["loss_curve"]["loss"]
    # bf16 keeps 8 bits: the same draws, sums rounded differently
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=2e-2, atol=0)


@pytest.mark.parametrize("name", ["retinanet_resnet50_fpn", "fcos_resnet50_fpn"])
def test_a_one_stage_branch_trains_the_same_with_kept_feature_maps(name, tmp_path, monkeypatch):
    from test_families import build as build_family

    data = write_coco(tmp_path, "train", ["chicken", "frog"], [[4, 4, 20, 24], [30, 28, 26, 30]])
    runs = {}
    for run_name, kw in (("kept", {}), ("every", {"frozen_memory": 0})):
        torch.manual_seed(0)
        model = build_family(name)
        images = []  # the batch sizes through the backbone
        model.backbone.register_forward_hook(lambda m, args, out, images=images: images.append(len(args[0])))
        # 12 steps of 2: each of the 6 images and each of their mirror images appears in some step
        extend(model, data, settings(strategy="branch", steps=12, **kw), out=tmp_path / run_name)
        runs[run_name] = model, sum(images), json.loads((tmp_path / run_name / "extend.json").read_text())
    (kept, kept_images, kept_run), (every, every_images, every_run) = runs["kept"], runs["every"]
    assert kept_run["phases"]["frozen_pass"] > 0 and every_run["phases"]["frozen_pass"] == 0
    # each of the images and its mirror through the backbone once (calibration reads them), not once a step
    assert kept_images == 2 * len(data.coco["images"]) < every_images
    a, b = kept_run["loss_curve"]["loss"], every_run["loss_curve"]["loss"]
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=RTOL, atol=0)
    assert relative_difference(kept, every) < RTOL
    branch = kept.head.branches[0].head
    tower, base_tower = next(branch.conv.parameters()), next(kept.head.classification_head.conv.parameters())
    assert not torch.equal(tower, base_tower)  # it trained
    # with another padded shape the anchors' strides are wrong and so is the loss: the test can fail
    monkeypatch.setattr(detgraft.kept.KeptStore, "get", lambda self, key: padded_twice(self.kept[key]))
    extend(build_family(name), data, settings(strategy="branch", steps=2), out=tmp_path / "wrong")
    wrong = json.loads((tmp_path / "wrong" / "extend.json").read_text())["loss_curve"]["loss"]
    assert max(abs(x - y) / abs(y) for x, y in zip(wrong, b)) > 10 * RTOL


def padded_twice(kept):
    height, width = kept.extra["padded"]
    return type(kept)(kept.features, kept.image_size, kept.target, {"padded": (2 * height, 2 * width)}, kept.dtype)
