from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import detgraft
from conftest import TINY_BUILDER, as_saved_by_detgraft_0_1
from detgraft.strategies.incremental import freeze_batchnorm, incremental
from tiny_model import build, images

TARGETS = [
    {"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([6])},
    {"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0]]), "labels": torch.tensor([7])},
]


def widened():
    model = build()
    return detgraft.expand_predictor(model, ["chicken", "frog"])


TORCHVISION_LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


def train(model, steps=3, weight_decay=1e-2, losses=TORCHVISION_LOSSES):
    """A plain torchvision training loop."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        loss_dict = model(images(), TARGETS)
        assert set(loss_dict) == losses
        loss = sum(loss_dict.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_freeze_batchnorm_keeps_outputs_bit_for_bit_and_stops_drift():
    """The frozen layers run BatchNorm's own eval kernel on the same shapes: equal by construction."""
    model = build()
    before = model(images())
    assert freeze_batchnorm(model) == 2
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 2
    after = model(images())
    for b, a in zip(before, after):
        assert all(torch.equal(a[k], b[k]) for k in b)
    stats = model.backbone[1].running_mean.clone()
    model.train()
    model(images(), [{**t, "labels": torch.tensor([2])} for t in TARGETS])
    assert torch.equal(model.backbone[1].running_mean, stats)


def test_head_strategy_moves_only_the_new_rows():
    model = incremental(widened(), "head")
    reference = copy.deepcopy(model.state_dict())
    train(model)
    state = model.state_dict()
    predictor = "roi_heads.box_predictor."
    for name, value in state.items():
        if name.startswith(predictor):
            old = 6 if "cls_score" in name else 24
            assert torch.equal(value[:old], reference[name][:old]), name  # old rows bit-equal
            assert not torch.equal(value[old:], reference[name][old:]), name  # new rows learned
        else:
            assert torch.equal(value, reference[name]), name


def test_naive_strategy_trains_everything_but_batchnorm_statistics():
    model = incremental(widened(), "naive")
    stats = model.backbone[1].running_var.clone()
    first_conv = model.backbone[0].weight.detach().clone()
    train(model)
    assert torch.equal(model.backbone[1].running_var, stats)
    assert not torch.equal(model.backbone[0].weight, first_conv)


@pytest.mark.parametrize(
    "make, strategy, match",
    [
        (widened, "distill-everything", "unknown strategy 'distill-everything'"),
        (build, "head", "expand_predictor"),
    ],
)
def test_incremental_errors(make, strategy, match):
    with pytest.raises(ValueError, match=match):
        incremental(make(), strategy)


def test_pseudo_teacher_never_changes_and_is_not_part_of_the_model():
    model = incremental(widened(), "pseudo", keep=0.5, ignore=0.2)
    teacher = model.detgraft_teacher
    snapshot = copy.deepcopy(teacher.state_dict())
    train(model)
    assert all(torch.equal(v, snapshot[k]) for k, v in teacher.state_dict().items())
    assert not any("teacher" in k for k in model.state_dict())
    assert all(p is not q for p in model.parameters() for q in teacher.parameters())


def test_pseudo_labels_keep_confident_ignore_uncertain_and_respect_user_labels():
    from detgraft.heads.teacher import add_teacher_boxes

    target = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([6])}
    teacher = {
        "boxes": torch.tensor([[0.0, 0, 10, 11], [20, 20, 30, 30], [40, 40, 50, 50], [5, 30, 15, 40]]),
        "labels": torch.tensor([2, 2, 4, 5]),
        "scores": torch.tensor([0.9, 0.8, 0.5, 0.1]),
    }
    merged = add_teacher_boxes(target, teacher, keep=0.7, ignore=0.3)
    # kept: the user's frog; bird 0.8 as a label; cup 0.5 as ignored (-1). Dropped: the bird on the
    # user's frog (IoU > 0.5), the laptop below 0.3
    assert merged["labels"].tolist() == [6, 2, -1]
    assert merged["boxes"].tolist() == [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]
    # the branch's "others" output: every kept teacher box gets the one label it is given
    assert add_teacher_boxes(target, teacher, keep=0.7, ignore=0.3, label=3)["labels"].tolist() == [6, 3, -1]


def test_boxes_labelled_minus_one_are_left_out_of_the_box_head_loss():
    # the torchvision behaviour the pseudo strategy relies on
    model = widened()
    heads = model.roi_heads
    proposals = [torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [30, 30, 40, 40], [50, 50, 60, 60]])]
    _, labels = heads.assign_targets_to_proposals(
        proposals, [torch.tensor([[0.0, 0, 10, 10], [30, 30, 40, 40]])], [torch.tensor([-1, 6])]
    )
    assert labels[0].tolist() == [-1, -1, 6, 0]
    positive, negative = heads.fg_bg_sampler(labels)
    picked = (positive[0] | negative[0]).nonzero().flatten().tolist()
    assert 0 not in picked and 1 not in picked and 2 in picked and 3 in picked


def test_a_deep_copy_of_a_head_model_guards_its_own_rows():
    model = incremental(widened(), "head")
    clone = copy.deepcopy(model)
    reference = copy.deepcopy(model.state_dict())
    train(clone)
    name = "roi_heads.box_predictor.cls_score.weight"
    assert torch.equal(clone.state_dict()[name][:6], reference[name][:6])
    assert not torch.equal(clone.state_dict()[name][6:], reference[name][6:])
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())  # the original untouched


DISTILL_LOSSES = TORCHVISION_LOSSES | {"loss_distill_rpn", "loss_distill_cls", "loss_distill_box"}


def test_distill_adds_its_terms_which_start_at_zero_and_keep_the_teacher_fixed():
    model = incremental(widened(), "distill", keep=0.5, ignore=0.2)
    teacher = model.detgraft_teacher
    snapshot = copy.deepcopy(teacher.state_dict())
    model.train()
    torch.manual_seed(0)
    first = model(images(), TARGETS)
    assert set(first) == DISTILL_LOSSES
    # the student is the teacher before training: nothing to distill yet (preserve init: the new
    # classes take ~0 probability, which the background-shift KL adds to the background)
    for name in ("loss_distill_rpn", "loss_distill_box"):
        assert first[name].item() == 0.0, name
    assert abs(first["loss_distill_cls"].item()) < 1e-5
    train(model, steps=3, losses=DISTILL_LOSSES)
    model.train()
    after = model(images(), TARGETS)
    assert after["loss_distill_cls"].item() > 1e-4 and after["loss_distill_box"].item() > 0
    assert after["loss_distill_cls"].requires_grad
    assert all(torch.equal(v, snapshot[k]) for k, v in teacher.state_dict().items())


def test_background_shift_kl_counts_new_classes_as_background():
    from detgraft.strategies.distill import _cls_loss

    teacher = torch.tensor([[2.0, 0.0, 0.0]])  # background, two old classes
    # the student moved the teacher's background mass onto a new class (label 3): no penalty
    student = torch.tensor([[-30.0, 0.0, 0.0, 2.0]])
    assert _cls_loss(student, teacher, first_new=3).item() < 1e-6
    # but moving it onto an old class is penalized
    assert _cls_loss(torch.tensor([[-30.0, 2.0, 0.0, -30.0]]), teacher, first_new=3).item() > 0.5


def base_detections_only(detections, first_new):
    return [{k: v[d["labels"] < first_new] for k, v in d.items()} for d in detections]


def test_branch_keeps_the_base_bit_identical_and_trains_only_the_branch():
    before = build()(images())  # the base before widening: what the branch keeps, bit for bit
    model = incremental(widened(), "branch", merge_iou=None)
    reference = copy.deepcopy(model.state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("roi_heads.branches.0.") for n in trainable)
    train(model, losses={"loss_classifier", "loss_box_reg"})
    for name, value in model.state_dict().items():
        if name.startswith("roi_heads.branches.0."):
            continue
        assert torch.equal(value, reference[name]), name
    assert any(not torch.equal(model.state_dict()[n], reference[n]) for n in trainable)
    after = model(images())
    assert any(len(d["labels"]) for d in before)
    for b, a in zip(base_detections_only(before, 6), base_detections_only(after, 6)):
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(a[key], b[key]), key  # bit for bit
    assert all(set(d["labels"].tolist()) <= set(range(1, 8)) for d in after)


def test_uncalibrated_merge_lets_the_stronger_claim_win():
    from detgraft.heads.merge import arbitrate

    old = (torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]]), torch.tensor([0.6, 0.9]), torch.tensor([2, 3]))
    new = (torch.tensor([[0.0, 0, 10, 11], [50, 50, 60, 61]]), torch.tensor([0.8, 0.3]), torch.tensor([6, 6]))
    boxes, scores, labels = arbitrate([old, new], [], 0.5, None)
    # the old 2 under a stronger new 6 keeps half its score; so does the new 6 under a stronger old 3
    assert labels.tolist() == [3, 6, 2, 6]
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.8, 0.6 * 0.5, 0.3 * 0.5]))
    _, scores, labels = arbitrate([old, new], [], None, None)
    assert labels.tolist() == [3, 6, 2, 6] and scores.tolist() == pytest.approx([0.9, 0.8, 0.6, 0.3])


def test_calibrated_arbitration_gives_an_object_to_what_it_looks_like():
    from types import SimpleNamespace

    from detgraft.heads.merge import arbitrate

    alpha = 0.7  # the weight of the branch's own score
    branch = SimpleNamespace(
        first_label=6,
        prototypes=torch.tensor([[1.0, 0.0]]),  # label 6 in the base's feature space
        alpha=torch.tensor([alpha]),
        new_memory=torch.tensor([[1.0, 0.0]]),  # chickens and the base's false alarms on them
        old_memory=torch.tensor([[0.0, 1.0]]),  # old objects seen in the training images
        false_alarm_score=torch.tensor(0.95),  # the base's surest false alarm there
    )
    box = lambda x: [x, 0.0, x + 10, 10]  # noqa: E731
    # base: a bird that looks like a chicken (0), a pizza (1), a bird far from any new detection (2),
    # a bird that looks like a chicken but of which the base is surer than of any false alarm (3), a
    # weak bird that looks like an old object (4), a bird that looks like a chicken under a weak claim (5)
    old = (
        torch.tensor([box(0), box(20), box(40), box(60), box(80), box(100)]),
        torch.tensor([0.9, 0.95, 0.6, 0.99, 0.5, 0.9]),
        torch.tensor([2, 3, 2, 2, 2, 2]),
    )
    new = (
        torch.tensor([box(0.5), box(20.5), box(60.5), box(80.5), box(100.5)]),
        torch.tensor([0.8, 0.99, 0.9, 0.9, 0.2]),
        torch.tensor([6, 6, 6, 6, 6]),
    )
    features = torch.tensor(
        [[1.0, 0], [0, 1], [1, 0], [0.8, 0.6], [0.6, 0.8], [1, 0]]  # at the old boxes
        + [[1.0, 0], [0.6, 0.8], [1, 0], [1, 0], [0.6, 0.8]]  # at the new boxes
    )
    boxes, scores, labels = arbitrate([old, new], [branch], 0.5, features)
    got = {(int(b[0]), int(label)): float(s) for b, s, label in zip(boxes, scores, labels)}
    claims = ((0.8, 1.0), (0.99, 0.6), (0.9, 1.0), (0.9, 1.0), (0.2, 0.6))
    calibrated = [alpha * s + (1 - alpha) * sim for s, sim in claims]
    # nearer the chickens than any old object, and no surer than a false alarm: lowered, though it scored higher
    assert got[(0, 2)] == pytest.approx(0.9 * 0.5)
    assert got[(0, 6)] == pytest.approx(calibrated[0])
    # a pizza is never lowered, whatever the branch says; the branch's weaker claim is
    assert got[(20, 3)] == old[1][1].item() and got[(20, 6)] == pytest.approx(calibrated[1] * 0.5)
    # away from every new detection: untouched
    assert got[(40, 2)] == old[1][2].item()
    # chicken-like, but the base is surer than of any false alarm: kept; the weaker new claim is lowered
    assert got[(60, 2)] == old[1][3].item() and got[(60, 6)] == pytest.approx(calibrated[2] * 0.5)
    # weaker than the new claim, but nearer the old objects: kept as it is, beside the new detection
    assert got[(80, 2)] == old[1][4].item() and got[(80, 6)] == pytest.approx(calibrated[3])
    # chicken-like, but the new claim is not confident (calibrated 0.32 < 0.5): kept; the claim is lowered
    assert calibrated[4] < 0.5
    assert got[(100, 2)] == old[1][5].item() and got[(100, 6)] == pytest.approx(calibrated[4] * 0.5)


def test_a_large_old_memory_is_read_at_its_kth_nearest_object():
    from types import SimpleNamespace

    from detgraft.heads.merge import BranchState, arbitrate, merge, old_rank

    assert old_rank(45, 88) == old_rank(88, 88) == 1 and old_rank(1000, 100) == 7  # 0.7 x 1000 / 100
    at = lambda degrees: [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]  # noqa: E731
    box = lambda x: [x, 0.0, x + 10, 10]  # noqa: E731
    # the base's detections: a bird at 40 degrees (cos 0.77 to the new memory) and one at 80 (cos 0.17);
    # the branch claims both confidently
    old = (torch.tensor([box(0), box(20)]), torch.tensor([0.9, 0.9]), torch.tensor([2, 2]))
    new = (torch.tensor([box(0.5), box(20.5)]), torch.tensor([0.99, 0.99]), torch.tensor([6, 6]))
    features = torch.tensor([at(40), at(80), at(0), at(0)])

    def merged(old_memory):
        branch = SimpleNamespace(
            first_label=6,
            prototypes=torch.tensor([at(0)]),
            alpha=torch.tensor([0.7]),
            new_memory=torch.tensor([at(0)]),
            old_memory=torch.tensor(old_memory),
            false_alarm_score=torch.tensor(0.95),
        )
        boxes, scores, labels = arbitrate([old, new], [branch], 0.5, features)
        return {(int(b[0]), int(label)): float(s) for b, s, label in zip(boxes, scores, labels)}

    # one old object at 45 degrees: the nearest, so the bird at 40 is kept
    kept = old[1][0].item()  # the base's score, untouched
    assert merged([at(45)])[(0, 2)] == kept
    # that one among ten at 90 degrees: the 7th nearest (cos 0.64) counts, and the bird at 40 looks new
    got = merged([at(45)] + [at(90)] * 9)
    assert got[(0, 2)] == pytest.approx(0.9 * 0.5)
    assert got[(20, 2)] == kept  # the bird at 80 has seven old objects nearer than the new one
    # TorchScript (detgraft export) reads the k-th neighbour too
    state = BranchState(6, *(torch.tensor(x) for x in ([at(0)], [0.7], [at(0)], [at(45)] + [at(90)] * 9, 0.95)))
    scripted = torch.jit.script(merge)([old, new], [state], 0.5, features)
    for a, b in zip(scripted, merge([old, new], [state], 0.5, features)):
        torch.testing.assert_close(a, b)


def test_calibrate_learns_prototypes_from_the_labelled_boxes():
    from detgraft.strategies.calibrate import calibrate

    model = incremental(widened(), "branch")
    train(model, steps=1, losses={"loss_classifier", "loss_box_reg"})
    learned = calibrate(model, zip(images(), TARGETS))
    branch = model.roi_heads.branches[0]
    assert bool(branch.calibrated) and learned["new_boxes"] == 2
    # one box per class: each prototype is that box's base feature; the new memory starts with them
    with torch.no_grad():
        image_list, targets = model.transform(images(), copy.deepcopy(TARGETS))
        features = {"0": model.backbone(image_list.tensors)}
        expected = model.roi_heads.base_features(features, [t["boxes"] for t in targets], image_list.image_sizes)
    torch.testing.assert_close(branch.prototypes, expected)
    torch.testing.assert_close(branch.new_memory[:2], expected)
    assert len(branch.new_memory) == 2 + learned["false_alarms"] and len(branch.old_memory) == learned["old_objects"]
    assert 0 <= learned["false_alarm_score"] <= 1
    assert sum(learned["false_alarm_labels"].values()) == learned["false_alarms"]
    with pytest.raises(ValueError, match="label"):
        calibrate(model, zip(images(), [TARGETS[0], TARGETS[0]]))  # no frog box


def test_calibration_sorts_the_older_detections_into_false_alarms_and_old_objects():
    from types import SimpleNamespace

    from detgraft.strategies.calibrate import _counts, training_objects

    branch = SimpleNamespace(first_label=91, owns=lambda labels: labels >= 91)
    target = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [0, 50, 10, 60]]),
        "labels": torch.tensor([91, 16, 92]),
    }
    before = {
        # a bird and a laptop on the chicken, a sure laptop on the frog, a weak cup on the frog,
        # the labelled bird itself (an old object), a dog a third on the frog (IoU 0.33: neither)
        "boxes": torch.tensor(
            [[0, 0, 10, 10.5], [1, 0, 10, 10], [0, 50, 10, 60], [0, 50, 10, 61], [50, 50, 60, 60], [5, 50, 15, 60]]
        ),
        "scores": torch.tensor([0.9, 0.6, 0.97, 0.3, 0.8, 0.9]),
        "labels": torch.tensor([16, 73, 73, 47, 16, 18]),
    }
    objects = training_objects([target], [before], branch)
    assert objects["labels"][0].tolist() == [0, 1]
    assert objects["false_alarm_labels"][0].tolist() == [16, 73, 73]
    assert objects["false_alarm_scores"][0].tolist() == pytest.approx([0.9, 0.6, 0.97])
    assert objects["old"][0].tolist() == [[50, 50, 60, 60]]
    assert _counts(objects["false_alarm_labels"][0]) == {"73": 2, "16": 1}
    assert list(_counts(torch.tensor([5, 3, 3, 5, 1]))) == ["3", "5", "1"]  # most frequent first, then by label


def test_calibrate_adds_the_old_class_images_detections_to_the_old_memory_only(monkeypatch):
    from detgraft.heads import rcnn
    from detgraft.strategies import calibrate as calibration
    from detgraft.strategies.calibrate import calibrate

    # the untrained tiny base scores low: every detection (read by the R-CNN pass and by calibrate)
    monkeypatch.setattr(rcnn, "KEEPER_SCORE", 0.0)
    monkeypatch.setattr(calibration, "KEEPER_SCORE", 0.0)
    model = incremental(widened(), "branch")
    train(model, steps=1, losses={"loss_classifier", "loss_box_reg"})
    branch = model.roi_heads.branches[0]
    plain = calibrate(model, zip(images(), TARGETS))
    before = {k: getattr(branch, k).clone() for k in ("prototypes", "new_memory", "old_memory")}
    learned = calibrate(model, zip(images(), TARGETS), old_images=images())
    assert plain["old_image_objects"] == 0 and learned["old_image_objects"] > 0
    # the same images unlabelled: each detection is an old object, also those on the labelled boxes
    assert learned["old_image_objects"] >= learned["old_objects"] == plain["old_objects"]
    assert len(branch.old_memory) == learned["old_objects"] + learned["old_image_objects"]
    assert torch.equal(branch.old_memory[: plain["old_objects"]], before["old_memory"])
    assert torch.equal(branch.prototypes, before["prototypes"]) and torch.equal(branch.new_memory, before["new_memory"])


def test_calibrate_reads_mirror_images_when_asked():
    from detgraft.strategies.calibrate import calibrate

    model = incremental(widened(), "branch")
    train(model, steps=1, losses={"loss_classifier", "loss_box_reg"})
    branch = model.roi_heads.branches[0]
    plain = calibrate(model, zip(images(), TARGETS))
    alpha = branch.alpha.clone()
    learned = calibrate(model, zip(images(), TARGETS), mirrored=True)
    assert learned["mirrored"] and learned["new_boxes"] == plain["new_boxes"] == 2
    torch.testing.assert_close(branch.alpha, alpha)  # alpha counts each labelled box once
    assert len(branch.new_memory) == 4 + learned["false_alarms"]  # each chicken and frog, and its mirror
    # the second row is the first image's chicken seen in its mirror image
    image, target = images()[0], TARGETS[0]
    flipped = target["boxes"].clone()
    flipped[:, [0, 2]] = image.shape[-1] - target["boxes"][:, [2, 0]]
    with torch.no_grad():
        image_list, targets = model.transform([image.flip(-1)], [{"boxes": flipped, "labels": target["labels"]}])
        features = {"0": model.backbone(image_list.tensors)}
        expected = model.roi_heads.base_features(features, [targets[0]["boxes"]], image_list.image_sizes)
    torch.testing.assert_close(branch.new_memory[1:2], expected, atol=1e-4, rtol=1e-4)


def test_branch_checkpoint_round_trip_and_a_second_extension(tmp_path):
    from detgraft.heads.merge import set_arbitration

    model = incremental(widened(), "branch")
    train(model, losses={"loss_classifier", "loss_box_reg"})
    branch = model.roi_heads.branches[0]
    width = branch.prototypes.shape[1]  # memories as long as the data made them: the checkpoint keeps their lengths
    memories = F.normalize(torch.randn(5, width), dim=1), F.normalize(torch.randn(3, width), dim=1)
    set_arbitration(branch, branch.prototypes + 1, branch.alpha / 2, *memories, false_alarm_score=0.9)
    file, function = TINY_BUILDER.rsplit(":", 1)
    model.detgraft_card.builder = {"kind": "python", "file": file, "function": function, "kwargs": {}}
    detgraft.save_checkpoint(model, tmp_path / "one")
    loaded = detgraft.load_checkpoint(tmp_path / "one")
    for name, value in branch.state_dict().items():
        assert torch.equal(loaded.roi_heads.branches[0].state_dict()[name], value), name
    for a, b in zip(model(images()), loaded(images())):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "labels", "scores"))
    as_saved_by_detgraft_0_1(tmp_path / "one")  # a checkpoint of detgraft 0.1 loads the same
    for a, b in zip(model(images()), detgraft.load_checkpoint(tmp_path / "one")(images())):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "labels", "scores"))
    first_branch = copy.deepcopy(loaded.roi_heads.branches[0].state_dict())
    detgraft.expand_predictor(loaded, ["duck"])
    incremental(loaded, "branch")
    assert len(loaded.roi_heads.branches) == 2 and loaded.roi_heads.branches[1].first_label == 8
    train(loaded, losses={"loss_classifier", "loss_box_reg"})
    assert all(torch.equal(v, first_branch[k]) for k, v in loaded.roi_heads.branches[0].state_dict().items())


def test_branch_others_output_joins_the_background_and_keeps_each_class_probability():
    model = incremental(widened(), "branch")
    branch = model.roi_heads.branches[0]
    assert branch.others and branch.num_classes == 3  # background, chicken, frog (+ others)
    assert branch.box_predictor.cls_score.out_features == 4
    pooled = torch.randn(5, 16, 7, 7)
    logits, regression = branch(pooled, model.roi_heads.shared_features(pooled))
    full, _ = branch.box_predictor(branch.box_head(pooled))
    assert logits.shape == (5, 3) and regression.shape == (5, 12)
    torch.testing.assert_close(logits.softmax(1)[:, 1:], full.softmax(1)[:, 1:3])


def test_branch_others_learns_the_teachers_boxes_and_is_never_detected(monkeypatch):
    from detgraft.heads import rcnn as branch_module

    model = incremental(widened(), "branch")
    heads = model.roi_heads
    seen = []
    original = branch_module.add_teacher_boxes

    def spy(target, detections, keep, ignore, label):
        seen.append((detections, label))
        return original(target, detections, keep, ignore, label)

    monkeypatch.setattr(branch_module, "add_teacher_boxes", spy)
    heads.keep, heads.ignore = 0.0, 0.0  # the untrained tiny base scores low: let its detections teach
    train(model, steps=1, losses={"loss_classifier", "loss_box_reg"})
    assert len(seen) == 2 and all(label == 3 for _, label in seen)  # others = the branch's index 3
    assert all(len(d["boxes"]) and (d["labels"] < 6).all() for d, _ in seen)  # the base's classes only
    heads.score_thresh, heads.detections_per_img = 0.0, 10_000  # every detection of every source
    detections = model(images())
    assert all(((d["labels"] >= 1) & (d["labels"] <= 7)).all() for d in detections)
    assert any((d["labels"] >= 6).any() for d in detections)  # the branch detects, others never shows


def test_a_checkpoint_of_the_earlier_arbitration_loads_uncalibrated(tmp_path, caplog):
    import hashlib
    import json

    from safetensors.torch import load_file, save_file

    from detgraft.heads.merge import set_arbitration

    model = incremental(widened(), "branch")
    branch = model.roi_heads.branches[0]
    width = branch.prototypes.shape[1]
    set_arbitration(branch, branch.prototypes, branch.alpha, torch.ones(2, width), torch.ones(1, width), 0.9)
    file, function = TINY_BUILDER.rsplit(":", 1)
    model.detgraft_card.builder = {"kind": "python", "file": file, "function": function, "kwargs": {}}
    folder = detgraft.save_checkpoint(model, tmp_path / "one")
    # as the previous release wrote it: two thresholds instead of the memories and the false-alarm score
    state = load_file(folder / "model.safetensors")
    prefix = "roi_heads.branches.0."
    for name in ("new_memory", "old_memory", "false_alarm_score"):
        del state[prefix + name]
    state[prefix + "look_alike"], state[prefix + "at_least"] = torch.tensor(0.8), torch.tensor(0.7)
    save_file(state, folder / "model.safetensors")
    meta = json.loads((folder / "detgraft.json").read_text())
    del meta["branches"]["branches"][0]["memory"]
    meta["weights_sha256"] = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    (folder / "detgraft.json").write_text(json.dumps(meta))
    loaded = detgraft.load_checkpoint(folder)
    assert not bool(loaded.roi_heads.branches[0].calibrated)  # merged by score alone until calibrated again
    assert "calibrate it again" in caplog.text
    assert all(len(d["boxes"]) == len(d["scores"]) for d in loaded(images()))


def test_calibrate_compresses_the_branch_which_keeps_the_base_bit_identical_and_its_copy_at_full_rank():
    from detgraft.heads.rcnn import LowRankHead

    before = build()(images())
    # rank 64: fc6 and fc7 at full rank (the tiny head's 32 outputs; fc7 takes half the rank)
    model = incremental(widened(), "branch", merge_iou=None, branch_rank=64)
    train(model, losses={"loss_classifier", "loss_box_reg"})
    heads = model.roi_heads
    trained = copy.deepcopy(heads.branches[0].box_head)
    detgraft.calibrate(model, zip(images(), TARGETS))
    assert isinstance(heads.branches[0].box_head, LowRankHead)
    pooled = torch.randn(50, 16, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(heads.branches[0].features(pooled, heads.shared_features(pooled)), trained(pooled))
    after = model(images())
    for b, a in zip(base_detections_only(before, 6), base_detections_only(after, 6)):
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(a[key], b[key]), key  # bit for bit: the shared fc6 runs as the base's head does


def test_a_low_rank_branch_is_small_and_round_trips_with_a_second_extension(tmp_path):
    model = incremental(widened(), "branch", branch_rank=3)
    train(model, losses={"loss_classifier", "loss_box_reg"})
    copied = sum(p.numel() for p in model.roi_heads.branches[0].box_head.parameters())
    detgraft.calibrate(model, zip(images(), TARGETS))
    head = model.roi_heads.branches[0].box_head
    assert head.rank == 3 and sum(p.numel() for p in head.parameters()) < copied / 5
    file, function = TINY_BUILDER.rsplit(":", 1)
    model.detgraft_card.builder = {"kind": "python", "file": file, "function": function, "kwargs": {}}
    detgraft.save_checkpoint(model, tmp_path / "one")
    loaded = detgraft.load_checkpoint(tmp_path / "one")
    for a, b in zip(model(images()), loaded(images())):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "labels", "scores"))
    first = copy.deepcopy(loaded.roi_heads.branches[0].state_dict())
    detgraft.expand_predictor(loaded, ["duck"])
    incremental(loaded, "branch", branch_rank=3)
    second = loaded.roi_heads.branches[1].box_head  # a copy of the base's head, not of the first branch's
    assert all(torch.equal(v, loaded.roi_heads.box_head.state_dict()[k]) for k, v in second.state_dict().items())
    train(loaded, losses={"loss_classifier", "loss_box_reg"})
    detgraft.calibrate(loaded, zip(images(), [{**t, "labels": torch.tensor([8])} for t in TARGETS]))
    assert all(torch.equal(v, first[k]) for k, v in loaded.roi_heads.branches[0].state_dict().items())
    assert loaded.roi_heads.branches[1].box_head.rank == 3
