"""Every torchvision detector family: widening keeps its detections (and masks), a plain training
step learns the new classes, checkpoints round-trip and plain torchvision reloads them.

Models are torchvision's builders with random weights at a small input size. Detections are
compared on float64 copies (``detect64``): a widened layer is a differently shaped product, and
only float64 makes that comparison about the surgery rather than the CPU's float32 kernels.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import torchvision

import detgraft
from conftest import assert_same_detections, detect, detect64, preserve_rtol, write_coco
from detgraft import families
from detgraft.evaluate import evaluate
from detgraft.extend import ExtendSettings, extend
from detgraft.predict import predict_files
from detgraft.training_data import TrainingSet
from tiny_model import images

SMALL = {"min_size": 128, "max_size": 128}
# name -> builder arguments; RetinaNet and FCOS get a score threshold their untrained scores pass
BUILDERS = {
    "maskrcnn_resnet50_fpn": SMALL | {"box_detections_per_img": 10},  # the mask head runs per detection
    "retinanet_resnet50_fpn": SMALL | {"score_thresh": 0.005},
    "fcos_resnet50_fpn": SMALL | {"score_thresh": 0.05},
    "ssd300_vgg16": {},
}
FAMILY = {
    "maskrcnn_resnet50_fpn": "mask_rcnn",
    "retinanet_resnet50_fpn": "retinanet",
    "fcos_resnet50_fpn": "fcos",
    "ssd300_vgg16": "ssd",
}
NUM_CLASSES = 5  # background + 4


def build(name: str):
    torch.manual_seed(0)
    kwargs = {"weights": None, "weights_backbone": None, "num_classes": NUM_CLASSES, **BUILDERS[name]}
    model = torchvision.models.get_model(name, **kwargs).eval()
    detgraft.get_card(model).builder = {"kind": "torchvision", "name": name, "kwargs": kwargs}
    return model


def pictures():
    return images(1, size=128)


def score_rtol(name: str) -> float:
    # softmax heads: the new classes take up to num_new * e^-16 of each old probability
    return preserve_rtol(2) if FAMILY[name] in ("mask_rcnn", "ssd") else 1e-9


def test_ssdlite_head_keeps_every_old_column():
    """SSDlite's classification convs sit at the end of a block per level. An untrained SSDlite's
    features vanish (to ~1e-25 at its last level, denormal floats that CPUs compute up to 50x
    slower) and all its scores tie, so its head is compared directly, on random features; SSD's
    detections are compared with ssd300_vgg16 below."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(
        "ssdlite320_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=NUM_CLASSES
    ).double()
    head = model.head.classification_head
    features = [torch.randn(1, m[0][0].in_channels, 4, 4, dtype=torch.float64) for m in head.module_list]
    with torch.no_grad():
        before = head(features).softmax(-1)  # [1, anchors, classes]
        detgraft.expand_predictor(model, ["chicken", "frog"])
        after = head(features).softmax(-1)
    assert after.shape == (*before.shape[:2], NUM_CLASSES + 2)
    torch.testing.assert_close(after[..., :NUM_CLASSES], before, rtol=preserve_rtol(2), atol=0)
    assert (after[..., NUM_CLASSES:] <= after[..., :1] * 1.2e-7).all()


@pytest.mark.parametrize("name", BUILDERS)
def test_widening_keeps_every_detection(name):
    model = build(name)
    before = detect64(model, pictures())
    detgraft.expand_predictor(model, ["chicken", "frog"])
    assert families.family(model) == FAMILY[name]
    assert families.num_classes(model) == NUM_CLASSES + 2
    assert detgraft.get_card(model).new_labels == [5, 6]
    after = detect64(model, pictures())
    assert_same_detections(before, after, score_rtol=score_rtol(name))
    if FAMILY[name] == "mask_rcnn":
        assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == NUM_CLASSES + 2
        for b, a in zip(before, after):
            torch.testing.assert_close(a["masks"], b["masks"], rtol=0, atol=1e-9)


def test_anchor_major_channels_keep_their_anchor_and_class():
    model = build("retinanet_resnet50_fpn")
    conv = model.head.classification_head.cls_logits
    old_weight, old_bias, anchors = conv.weight.detach().clone(), conv.bias.detach().clone(), 9
    detgraft.expand_predictor(model, ["chicken", "frog"])
    weight, bias = conv.weight.detach(), conv.bias.detach()
    assert weight.shape[0] == anchors * (NUM_CLASSES + 2)
    for anchor in range(anchors):
        for label in range(NUM_CLASSES + 2):
            channel = anchor * (NUM_CLASSES + 2) + label
            if label < NUM_CLASSES:
                old = anchor * NUM_CLASSES + label
                assert torch.equal(weight[channel], old_weight[old]) and torch.equal(bias[channel], old_bias[old])
            else:  # a new class scores a tenth of the score threshold on every input
                assert not weight[channel].any()
                assert torch.sigmoid(bias[channel]).item() == pytest.approx(model.score_thresh / 10)


def test_new_classes_are_detected_once_trained():
    """The preserved start is not a dead end: raising a new class's bias makes it fire (RetinaNet)."""
    model = build("retinanet_resnet50_fpn")
    detgraft.expand_predictor(model, ["chicken"])
    assert all((d["labels"] < NUM_CLASSES).all() for d in detect(model, pictures()))
    conv = model.head.classification_head.cls_logits
    with torch.no_grad():
        conv.bias.view(9, NUM_CLASSES + 1)[:, NUM_CLASSES] = 5.0
    assert all((d["labels"] == NUM_CLASSES).any() for d in detect(model, pictures()))


def _targets(name: str, with_masks: list[bool]):
    targets = []
    for masks in with_masks:
        boxes = torch.tensor([[10.0, 12.0, 70.0, 80.0], [60.0, 50.0, 120.0, 110.0], [5.0, 70.0, 50.0, 125.0]])
        t = {"boxes": boxes, "labels": torch.tensor([5, 6, 2])}
        if masks:
            t["masks"] = torch.zeros(3, 128, 128, dtype=torch.uint8)
            for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                t["masks"][k, y0:y1, x0:x1] = 1
        targets.append(t)
    return targets


@pytest.mark.parametrize("name", BUILDERS)
def test_a_plain_training_step_learns_the_new_classes(name):
    model = build(name)
    detgraft.expand_predictor(model, ["chicken", "frog"])
    detgraft.incremental(model, "naive")
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    targets = _targets(name, [True, False])  # Mask R-CNN: one image with masks, one with boxes only
    losses = model(pictures(), targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    grads = [model.get_submodule(spec.path).weight.grad for spec in families.class_tensors(model)]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    if FAMILY[name] == "mask_rcnn":
        assert losses["loss_mask"] > 0
        # boxes only everywhere: the mask loss is 0, the rest trains
        losses = model(pictures(), _targets(name, [False, False]))
        assert losses["loss_mask"] == 0 and losses["loss_classifier"] > 0
    optimizer.step()


@pytest.mark.parametrize("name", ["retinanet_resnet50_fpn", "maskrcnn_resnet50_fpn"])
def test_head_trains_only_the_new_rows(name):
    model = build(name)
    detgraft.expand_predictor(model, ["chicken", "frog"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    detgraft.incremental(model, "head")
    model.train()
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=0.1
    )
    for _ in range(2):
        losses = model(pictures(), _targets(name, [True, True]))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    after = model.state_dict()
    specs = families.class_layers(model)
    changed = set()
    for spec in specs:
        new = families.new_rows(spec, NUM_CLASSES + 2, NUM_CLASSES, torch.device("cpu"))
        for part in ("weight", "bias"):
            key = f"{spec.path}.{part}"
            assert torch.equal(after[key][~new], before[key][~new]), key
            if not torch.equal(after[key][new], before[key][new]):
                changed.add(spec.path)
    assert families.class_tensors(model)[0].path in changed
    others = [k for k in after if not any(k.startswith(s.path + ".") for s in specs)]
    assert all(torch.equal(after[k], before[k]) for k in others)


@pytest.mark.parametrize("name", BUILDERS)
def test_checkpoint_round_trip_and_plain_torchvision_reload(name, tmp_path):
    model = build(name)
    detgraft.expand_predictor(model, ["chicken", "frog"])
    detgraft.incremental(model, "naive")
    model.eval()
    expected = detect(model, pictures())
    detgraft.save_checkpoint(model, tmp_path / "ckpt")
    loaded = detgraft.load_model(tmp_path / "ckpt")
    assert detgraft.get_card(loaded).classes[-2:] == ["chicken", "frog"]
    _assert_equal(detect(loaded, pictures()), expected)
    # deployment without detgraft: the builder with num_classes + 2 and a strict load_state_dict
    kwargs = {**detgraft.get_card(model).builder["kwargs"], "num_classes": NUM_CLASSES + 2}
    plain = torchvision.models.get_model(name, **kwargs).eval()
    saved = safetensors.torch.load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    plain.load_state_dict(saved)
    assert all(torch.equal(v, saved[k]) for k, v in plain.state_dict().items() if k in saved)
    assert any(len(d["labels"]) for d in detect(plain, pictures()))


def _assert_equal(got, expected):
    """The same weights through the same ops on the same shapes: equal by construction."""
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        assert all(torch.equal(g[k], e[k]) for k in e)


def test_branch_on_mask_rcnn_keeps_the_old_masks():
    model = build("maskrcnn_resnet50_fpn")
    before = detect64(model, pictures())
    detgraft.expand_predictor(model, ["chicken", "frog"])
    detgraft.incremental(model, "branch", merge_iou=None)
    after = detect64(model, pictures())
    for b, a in zip(before, after):
        old = a["labels"] < NUM_CLASSES
        assert old.sum() == len(b["labels"]) > 0
        torch.testing.assert_close(a["boxes"][old], b["boxes"], rtol=0, atol=1e-9)
        torch.testing.assert_close(a["masks"][old], b["masks"], rtol=0, atol=1e-9)


def test_keypoint_rcnn_is_refused_with_the_reason():
    model = torchvision.models.get_model(
        "keypointrcnn_resnet50_fpn", weights=None, weights_backbone=None, num_classes=2, **SMALL
    )
    with pytest.raises(NotImplementedError, match="person skeleton"):
        detgraft.expand_predictor(model, ["chicken"])


def test_strategies_a_family_lacks_fail_at_once():
    model = build("fcos_resnet50_fpn")
    detgraft.expand_predictor(model, ["chicken"])
    with pytest.raises(NotImplementedError, match="'branch' is not available for fcos.*naive, head"):
        detgraft.incremental(model, "branch")
    with pytest.raises(ValueError, match="init='preserve'"):
        detgraft.expand_predictor(build("fcos_resnet50_fpn"), ["chicken"], init="mean")


def _with_polygons(data, category_id: int):
    """Gives the boxes of ``category_id`` a polygon segmentation (their rectangle)."""
    for a in data.coco["annotations"]:
        if a["category_id"] == category_id:
            x, y, w, h = a["bbox"]
            a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return data


def test_training_masks_come_first_and_flip_with_the_image(tmp_path):
    data = _with_polygons(write_coco(tmp_path, "train", ["chicken", "frog"], [[4, 4, 20, 24], [30, 28, 26, 30]]), 101)
    image, target = TrainingSet(data, {100: 5, 101: 6}, masks=True).example(0)
    assert target["labels"].tolist() == [6, 5] and target["masks"].shape == (1, 64, 64)  # frog has the mask
    assert target["masks"][0, 28:58, 30:56].all() and target["masks"].sum() == 26 * 30
    _, flipped = TrainingSet(data, {100: 5, 101: 6}, masks=True).example(0, flip=True)
    assert torch.equal(flipped["masks"], target["masks"].flip(-1))
    _, boxes_only = TrainingSet(data, {100: 5, 101: 6}).example(0)
    assert "masks" not in boxes_only


def test_extend_a_mask_rcnn_and_score_its_masks(tmp_path):
    model = build("maskrcnn_resnet50_fpn")
    data = _with_polygons(write_coco(tmp_path, "train", ["chicken", "frog"], [[4, 4, 20, 24], [30, 28, 26, 30]]), 100)
    extend(model, data, ExtendSettings(strategy="naive", steps=2, batch_size=2), out=tmp_path / "run")
    evaluation = evaluate(model, data)
    assert set(evaluation.mask_groups) == set(evaluation.groups) == {"new", "all"}
    predictions, _ = predict_files(model, [data.path(data.coco["images"][0])], tmp_path / "drawn", score=0.0)
    assert predictions[0].labels and (tmp_path / "drawn" / "train_0.png").is_file()
