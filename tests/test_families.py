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
from conftest import as_saved_by_detgraft_0_1, assert_same_detections, detect, detect64, preserve_rtol, write_coco
from detgraft.cli import main
from detgraft.data.batches import TrainingSet
from detgraft.evaluation.metrics import evaluate
from detgraft.evaluation.predict import predict_files
from detgraft.extend import extend
from detgraft.model import families
from detgraft.settings import ExtendSettings
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
    assert families.family(model).name == FAMILY[name]
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


def test_branch_on_mask_rcnn_trains_masks_of_its_own_classes():
    model = build("maskrcnn_resnet50_fpn")
    detgraft.expand_predictor(model, ["chicken", "frog"])
    detgraft.incremental(model, "branch")
    branch = model.roi_heads.branches[0]
    assert branch.mask_predictor.mask_fcn_logits.out_channels == 3  # background, chicken, frog
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    losses = model(pictures(), _targets("maskrcnn_resnet50_fpn", [True]))
    assert losses["loss_mask"] > 0
    sum(losses.values()).backward()
    assert branch.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad is None  # the base's stays as it was
    # boxes without masks: the mask loss is 0 and the box losses train
    losses = model(pictures(), _targets("maskrcnn_resnet50_fpn", [False]))
    assert losses["loss_mask"] == 0 and losses["loss_classifier"] > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k in before)
    # new detections read their branch's masks: a new class fires where the branch says so
    model.eval()
    with torch.no_grad():
        branch.box_predictor.cls_score.bias[1] = 20.0
    found = detect(model, pictures())
    assert all((d["labels"] == NUM_CLASSES).any() and d["masks"].shape[1:] == (1, 128, 128) for d in found)


def test_keypoint_rcnn_is_refused_with_the_reason():
    model = torchvision.models.get_model(
        "keypointrcnn_resnet50_fpn", weights=None, weights_backbone=None, num_classes=2, **SMALL
    )
    with pytest.raises(NotImplementedError, match="person skeleton"):
        detgraft.expand_predictor(model, ["chicken"])


def test_strategies_a_family_lacks_fail_at_once():
    model = build("fcos_resnet50_fpn")
    detgraft.expand_predictor(model, ["chicken"])
    with pytest.raises(NotImplementedError, match="'pseudo' is not available for fcos.*naive, head, branch"):
        detgraft.incremental(model, "pseudo")
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


ONE_STAGE = ["retinanet_resnet50_fpn", "fcos_resnet50_fpn"]


def _fire_branch(model, label: int) -> None:
    """Raises the branch's bias of ``label`` so that it detects (an untrained branch starts below
    the score threshold)."""
    branch = model.head.branches[-1]
    conv = branch.head.cls_logits
    with torch.no_grad():
        conv.bias.view(-1, branch.num_new)[:, label - branch.first_label] = 5.0


@pytest.mark.parametrize("name", ONE_STAGE)
def test_one_stage_branch_keeps_the_base_bit_for_bit(name):
    model = build(name)
    before = detect(model, pictures())
    detgraft.expand_predictor(model, ["chicken", "frog"])
    detgraft.incremental(model, "branch", merge_iou=None)
    assert detgraft.get_card(model).new_labels == [NUM_CLASSES, NUM_CLASSES + 1]
    _assert_equal(detect(model, pictures()), before)  # an untrained branch detects nothing
    _fire_branch(model, NUM_CLASSES + 1)
    after = detect(model, pictures())
    for b, a in zip(before, after):
        old = a["labels"] < NUM_CLASSES
        assert (a["labels"][~old] == NUM_CLASSES + 1).any()
        # the base's detections, in its order; the merged list keeps detections_per_img, the strongest
        _assert_equal([{k: v[old] for k, v in a.items()}], [{k: v[: int(old.sum())] for k, v in b.items()}])
    # with the merge, an old detection under a stronger new one is lowered, never raised; calibrated,
    # the arbitration reads the base tower's features at the boxes (as for R-CNN, the box head's)
    model.merge_iou = 0.5
    examples = list(zip(pictures(), _targets(name, [False])))
    learned = detgraft.calibrate(model, examples)
    assert bool(model.head.branches[0].calibrated) and learned["new_boxes"] == 2  # a chicken and a frog
    # old-class images: the base's confident detections there join the old memory
    more = detgraft.calibrate(model, examples, old_images=pictures())
    assert len(model.head.branches[0].old_memory) == more["old_objects"] + more["old_image_objects"]
    assert more["old_objects"] == learned["old_objects"] and more["new_boxes"] == 2
    assert model.head.branches[0].prototypes.shape == (2, model.head.classification_head.cls_logits.in_channels)
    merged = detect(model, pictures())
    for b, m in zip(before, merged):
        old = m["labels"] < NUM_CLASSES
        for box, score, label in zip(m["boxes"][old], m["scores"][old], m["labels"][old]):
            same = (b["boxes"] == box).all(1) & (b["labels"] == label)
            assert same.any() and score <= b["scores"][same].max()
        assert m["scores"][old].sum() < b["scores"].sum()


@pytest.mark.parametrize("name", ONE_STAGE)
def test_one_stage_branch_trains_only_the_branch(name, tmp_path):
    model = build(name)
    detgraft.expand_predictor(model, ["chicken", "frog"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    detgraft.incremental(model, "branch")
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trained} == {id(p) for p in model.head.branches.parameters()}
    start = [p.detach().clone() for p in trained]
    optimizer = torch.optim.SGD(trained, lr=0.1, momentum=0.9)
    for _ in range(2):
        losses = model(pictures(), _targets(name, [False]))
        assert list(losses) == ["classification"] and losses["classification"] > 0
        optimizer.zero_grad()
        losses["classification"].backward()
        optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(not torch.equal(p, s) for p, s in zip(trained, start))
    # the checkpoint rebuilds the branch: the same detections
    model.eval()
    _fire_branch(model, NUM_CLASSES)
    expected = detect(model, pictures())
    detgraft.save_checkpoint(model, tmp_path / "ckpt")
    loaded = detgraft.load_model(tmp_path / "ckpt")
    _assert_equal(detect(loaded, pictures()), expected)
    assert any(len(d["labels"]) for d in expected)
    as_saved_by_detgraft_0_1(tmp_path / "ckpt")  # a checkpoint of detgraft 0.1 loads the same
    _assert_equal(detect(detgraft.load_model(tmp_path / "ckpt"), pictures()), expected)


def test_extend_a_retinanet_with_the_default_strategy(tmp_path, capsys):
    model = build("retinanet_resnet50_fpn")
    data = write_coco(tmp_path, "train", ["chicken", "frog"], [[4, 4, 20, 24], [30, 28, 26, 30]])
    extend(model, data, ExtendSettings(steps=2, batch_size=2), out=tmp_path / "run")
    loaded = detgraft.load_model(tmp_path / "run")
    assert type(loaded).__name__ == "BranchRetinaNet" and len(loaded.head.branches) == 1
    _assert_equal(detect(loaded, pictures()), detect(model, pictures()))
    assert main(["inspect", str(tmp_path / "run")]) == 0
    assert "labels 5..6: classification head" in capsys.readouterr().out
