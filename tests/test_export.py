"""``detgraft export``: TorchScript that gives the model's detections without detgraft."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

import detgraft
from conftest import TINY_BUILDER
from detgraft.cli import main
from detgraft.export import export
from detgraft.strategies.incremental import incremental
from tiny_model import build, images


def test_a_head_model_exports_to_torchscript_with_the_same_detections(tmp_path):
    model = build()
    detgraft.expand_predictor(model, ["chicken", "frog"])
    model = incremental(model, "head").eval()
    check = export(model, tmp_path / "model.pt", images=images())
    assert check["detections"] > 0
    assert check["max_box_difference"] < 1e-3 and check["max_score_difference"] < 1e-5
    # a plain torch.jit.load, no detgraft involved: torchvision's scripted (losses, detections)
    _, detections = torch.jit.load(str(tmp_path / "model.pt"))(images())
    eager = model(images())
    for a, b in zip(eager, detections):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"])


def claiming_branch_model(rank: int = 4):
    """A calibrated branch model whose branch sees chickens and frogs everywhere, and whose merge
    takes every old detection a new one claims for a false alarm: the merge acts on every image.
    ``rank``: its box head compressed by calibrate (0: the whole copy)."""
    from detgraft.heads.merge import set_arbitration
    from detgraft.strategies.calibrate import calibrate

    model = build()
    detgraft.expand_predictor(model, ["chicken", "frog"])
    model = incremental(model, "branch", branch_rank=rank)
    branch = model.roi_heads.branches[0]
    with torch.no_grad():
        branch.box_predictor.cls_score.bias[1:3] += torch.tensor([17.0, 15.0])
        branch.box_head.fc6.weight.add_(torch.randn_like(branch.box_head.fc6.weight) * 0.05)  # as if trained
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([label])} for label in (6, 7)]
    calibrate(model, zip(images(), targets))
    # no old object memory, no score cap
    set_arbitration(branch, branch.prototypes, branch.alpha, branch.new_memory, branch.new_memory[:0], 1.0)
    return model.eval()


@pytest.mark.parametrize("rank", [4, 0])
def test_a_branch_model_exports_with_its_branches_and_merge(tmp_path, rank):
    """The default strategy's model scripted: plain torch.jit.load gives the detections of the
    merge, not the base's nor the unmerged ones (the branch's box head low-rank or a whole copy)."""
    model = claiming_branch_model(rank)
    check = export(model, tmp_path / "branch.pt", images=images())
    assert check["detections"] > 0 and check["max_score_difference"] < 1e-5
    _, exported = torch.jit.load(str(tmp_path / "branch.pt"))(images())
    with torch.no_grad():
        merged = model(images())
        model.roi_heads.merge_iou = None
        unmerged = model(images())
    assert any(len(d["labels"]) and (d["labels"] >= 6).any() for d in merged)
    for a, b in zip(merged, exported):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["scores"], b["scores"])
    lowered = [not torch.equal(a["scores"], c["scores"]) for a, c in zip(merged, unmerged)]
    assert any(lowered)  # the merge acted, and the scripted graph did the same


def test_a_mask_rcnn_branch_model_exports_with_its_masks(tmp_path):
    """A Mask R-CNN whose branch detects: TorchScript and ONNX give the merged detections and the
    masks (old ones from the base's mask predictor, new ones from the branch's), ONNX also on an
    image where the branch detects nothing."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=6, min_size=96, max_size=96)
    detgraft.expand_predictor(model, ["chicken"])
    model = incremental(model, "branch").eval()
    with torch.no_grad():
        model.roi_heads.branches[0].box_predictor.cls_score.bias[1] += 22.0  # it sees chickens
    g = torch.Generator().manual_seed(1)
    checked = [torch.rand(3, 96, 96, generator=g), torch.rand(3, 80, 120, generator=g)]
    with torch.no_grad():
        assert all((d["labels"] >= 6).any() and (d["labels"] < 6).any() for d in model(checked))
    check = export(model, tmp_path / "mask.pt", images=checked)
    assert check["detections"] > 0 and check["max_box_difference"] < 1e-3
    assert check["max_score_difference"] < 1e-5 and check["max_mask_difference"] < 1e-5
    pytest.importorskip("onnxruntime")
    for quiet in (False, True):  # then a branch that detects nothing
        if quiet:
            with torch.no_grad():
                model.roi_heads.branches[0].box_predictor.cls_score.bias[1] -= 44.0
                assert not any((d["labels"] >= 6).any() for d in model(checked))
        check = export(model, tmp_path / "mask.onnx", "onnx", images=checked)
        # onnxruntime's kernels and torchvision's traced mask pasting: 3.5e-3 px, mask probability 1.9e-3
        assert check["detections"] > 0 and check["max_box_difference"] < 1e-2
        assert check["max_score_difference"] < 1e-4 and check["max_mask_difference"] < 1e-2


def test_the_export_command(tmp_path, capsys):
    weights = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(build().state_dict(), str(weights))
    assert main(["export", TINY_BUILDER, "--weights", str(weights), "--out", str(tmp_path / "m.pt")]) == 0
    assert (tmp_path / "m.pt").is_file() and "torch.jit.load" in capsys.readouterr().out
    model = ["export", TINY_BUILDER, "--weights", str(weights), "--out", str(tmp_path / "x.pt")]
    assert main([*model, "--format", "tflite"]) == 2
    (tmp_path / "empty").mkdir()
    assert main([*model, "--images", str(tmp_path / "empty")]) == 2


@pytest.mark.parametrize("strategy", ["head", "branch"])
def test_onnx_export_gives_the_model_s_detections_at_other_image_sizes(tmp_path, strategy):
    """Traced on one 64 x 64 image; onnxruntime then runs images of 64 x 64 and 128 x 128 (the
    tiny model resizes to 64) and gives the eager model's detections (the merge's, for branch)."""
    pytest.importorskip("onnxruntime")
    if strategy == "branch":
        model = claiming_branch_model()
    else:
        model = build()
        detgraft.expand_predictor(model, ["chicken", "frog"])
        model = incremental(model, "head").eval()
    checked = images() + [torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(3))]
    check = export(model, tmp_path / "model.onnx", "onnx", images=checked)
    assert check["detections"] >= 3 * 50  # labels and counts equal (else export raises)
    assert check["max_box_difference"] < 1e-3 and check["max_score_difference"] < 1e-4
    with torch.no_grad():
        merged = model(checked[-1:])
    assert (merged[0]["labels"] >= 6).any() == (strategy == "branch")


def test_the_parity_check_pairs_swapped_near_ties_and_catches_real_differences():
    from detgraft.export import ExportMismatch, _compare

    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]])
    model = {"boxes": boxes, "labels": torch.tensor([1, 2, 1]), "scores": torch.tensor([0.9, 0.5, 0.5])}
    swapped = {k: v[[0, 2, 1]] for k, v in model.items()}  # two equal scores in the other order
    swapped["scores"] = swapped["scores"] + torch.tensor([0.0, 1e-6, 0.0])
    assert _compare([model], [swapped]) == {
        "max_box_difference": 0.0,
        "max_score_difference": pytest.approx(1e-6, rel=0.1),
        "detections": 3,
    }
    moved = {**model, "boxes": boxes + torch.tensor([0.0, 0, 0, 2])}
    assert _compare([model], [moved])["max_box_difference"] == 2.0
    with pytest.raises(ExportMismatch, match="image 0"):
        _compare([model], [{**model, "labels": torch.tensor([1, 2, 2])}])
    with pytest.raises(ExportMismatch, match="detects 2 objects, the model 3"):
        _compare([model], [{k: v[:2] for k, v in model.items()}])


def test_torchvision_format_is_a_state_dict_a_plain_model_loads_and_branch_is_refused(tmp_path):
    from detgraft.export import _compare

    file, function = TINY_BUILDER.rsplit(":", 1)
    model = build()
    detgraft.get_card(model).builder = {"kind": "python", "file": file, "function": function, "kwargs": {}}
    detgraft.expand_predictor(model, ["chicken", "frog"])
    model = incremental(model, "head").eval()
    check = export(model, tmp_path / "model.safetensors", "torchvision", images=images())
    assert check["detections"] > 0 and check["max_score_difference"] < 1e-5
    plain = build(num_classes=8)  # the user's own builder with num_classes = 6 + 2, no detgraft
    plain.load_state_dict(safetensors.torch.load_file(str(tmp_path / "model.safetensors")))
    with torch.no_grad():  # FrozenBatchNorm2d there, BatchNorm2d here: float rounding may swap near ties
        same = _compare(model.eval()(images()), plain.eval()(images()))
    assert same["max_box_difference"] < 1e-3 and same["max_score_difference"] < 1e-5
    with pytest.raises(ValueError, match="not one torchvision predictor.*arbitration"):
        export(claiming_branch_model(), tmp_path / "branch.safetensors", "torchvision")


@pytest.mark.parametrize("name", ["retinanet_resnet50_fpn", "fcos_resnet50_fpn"])
def test_a_one_stage_branch_model_exports_with_its_merge(tmp_path, name):
    """A calibrated RetinaNet / FCOS branch model whose branch fires everywhere: plain
    torch.jit.load gives the merged detections (branch ones included) at two image sizes, and so
    does onnxruntime."""
    from test_families import NUM_CLASSES, _fire_branch, _targets, pictures
    from test_families import build as build_family

    model = build_family(name)
    detgraft.expand_predictor(model, ["chicken", "frog"])
    incremental(model, "branch")
    _fire_branch(model, NUM_CLASSES + 1)
    with torch.no_grad():  # scores that differ from anchor to anchor: onnxruntime's TopK breaks exact ties otherwise
        model.head.branches[-1].head.cls_logits.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    detgraft.calibrate(model, list(zip(pictures(), _targets(name, [False]))))
    model.eval()
    checked = pictures() + [torch.rand(3, 96, 160, generator=torch.Generator().manual_seed(2))]
    check = export(model, tmp_path / "model.pt", images=checked)
    assert check["detections"] > 0 and check["max_box_difference"] < 1e-3 and check["max_score_difference"] < 1e-5
    _, exported = torch.jit.load(str(tmp_path / "model.pt"))(checked)
    with torch.no_grad():
        merged = model(checked)
        model.merge_iou = None
        unmerged = model(checked)
    assert all((d["labels"] == NUM_CLASSES + 1).any() for d in exported)
    for a, b in zip(merged, exported):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["scores"], b["scores"])
    assert any(not torch.equal(a["scores"], c["scores"]) for a, c in zip(merged, unmerged))  # the merge acted
    pytest.importorskip("onnxruntime")
    check = export(model, tmp_path / "model.onnx", "onnx", images=checked)
    assert check["detections"] > 0 and check["max_box_difference"] < 1e-3 and check["max_score_difference"] < 1e-4


def test_pt2_export_says_where_torchvision_stops_torch_export(tmp_path):
    """torch.export cannot trace torchvision's detection models (a Python branch on a value from the
    image, benchmarks/pt2.py): ``--format pt2`` says where, and what to use instead."""
    model = build().eval()
    with pytest.raises(ValueError, match=r"torchvision/.*\.py:\d+.*--format torchscript or onnx"):
        export(model, tmp_path / "model.pt2", "pt2")


def test_pt2_exports_a_one_stage_model_with_the_rust_operators(tmp_path):
    """torchvision's batched_nms branches on the number of boxes; detgraft's operator does not, so an
    FCOS exports (benchmarks/pt2.py); the program gives the model's detections."""
    import torchvision

    torch.manual_seed(0)
    kwargs = {"weights": None, "weights_backbone": None, "num_classes": 5, "min_size": 96, "max_size": 96}
    model = torchvision.models.get_model("fcos_resnet50_fpn", score_thresh=0.05, **kwargs).eval()
    check = export(model, tmp_path / "fcos.pt2", "pt2", images=[torch.rand(3, 96, 96)])
    assert check["detections"] > 0 and check["max_box_difference"] < 1e-3 and check["max_score_difference"] < 1e-5
    program = torch.export.load(str(tmp_path / "fcos.pt2"))
    assert any("detgraft" in str(node.target) for node in program.graph.nodes)
