from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import detgraft
from conftest import assert_same_detections, detect, detect64, preserve_rtol
from detgraft import _core
from detgraft.model.card import coco_names
from tiny_model import build, images


def test_resnet50_fpn_widens_to_93_and_keeps_its_detections():
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=320, max_size=320
    )
    torch.manual_seed(0)
    with torch.no_grad():  # untrained scores are all ~1/91; spread them (to 0.16..0.97, 7 labels) to compare
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.01)
    pictures = images(1, size=320)
    before = detect64(model, pictures)
    assert detgraft.expand_predictor(model, ["chicken", "frog"]) is model
    predictor = model.roi_heads.box_predictor
    assert (predictor.cls_score.out_features, predictor.bbox_pred.out_features) == (93, 372)
    assert predictor.cls_score.weight.shape == (93, 1024) and predictor.bbox_pred.weight.shape == (372, 1024)
    card = detgraft.get_card(model)
    assert card.classes[:91] == coco_names() and card.classes[91:] == ["chicken", "frog"]
    assert card.new_labels == [91, 92]
    assert_same_detections(before, detect64(model, pictures), score_rtol=preserve_rtol(2))


def test_tiny_model_with_live_batchnorm_keeps_its_detections(tiny, tiny_images):
    assert isinstance(tiny.backbone[1], nn.BatchNorm2d)
    before = detect64(tiny, tiny_images)
    detgraft.expand_predictor(tiny, ["chicken", "frog", "duck"])
    after = detect64(tiny, tiny_images)
    assert_same_detections(before, after, score_rtol=preserve_rtol(3))
    assert all((d["labels"] < 6).all() for d in after)


def test_expansion_is_in_place_and_optimizer_ready(tiny, tiny_images):
    predictor, cls_score = tiny.roi_heads.box_predictor, tiny.roi_heads.box_predictor.cls_score
    old_weight = cls_score.weight
    tiny.roi_heads.box_predictor.bbox_pred.bias.requires_grad_(False)
    detgraft.expand_predictor(tiny, ["chicken"])
    assert tiny.roi_heads.box_predictor is predictor and predictor.cls_score is cls_score
    assert cls_score.weight is not old_weight and isinstance(cls_score.weight, nn.Parameter)
    assert cls_score.weight.requires_grad and not predictor.bbox_pred.bias.requires_grad
    names = {n for n, _ in tiny.named_parameters()}
    assert "roi_heads.box_predictor.cls_score.weight" in names
    # a torchvision training step with the new label trains the new row
    optimizer = torch.optim.SGD([p for p in tiny.parameters() if p.requires_grad], lr=0.1)
    tiny.train()
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([6])}] * 2
    losses = tiny(tiny_images, targets)
    sum(losses.values()).backward()
    assert cls_score.weight.grad[6].abs().sum() > 0
    row = cls_score.weight[6].detach().clone()
    optimizer.step()
    assert not torch.equal(cls_score.weight[6], row)


def test_expansion_keeps_dtype(tiny, tiny_images):
    tiny.double()
    detgraft.expand_predictor(tiny, ["chicken"], init="mean")
    assert tiny.roi_heads.box_predictor.cls_score.weight.dtype == torch.float64
    detect(tiny, [im.double() for im in tiny_images])


def _class_probabilities(model, features):
    logits, _ = model.roi_heads.box_predictor(features)
    return logits.softmax(-1)


def test_background_init_gives_each_new_class_a_share_of_background(tiny):
    detgraft.expand_predictor(tiny, ["chicken", "frog"], init="background")
    p = _class_probabilities(tiny, torch.randn(50, 32))
    torch.testing.assert_close(p[:, 6], p[:, 0] / 6)
    torch.testing.assert_close(p[:, 7], p[:, 0] / 6)


def test_preserve_init_starts_new_classes_far_below_background(tiny):
    detgraft.expand_predictor(tiny, ["chicken"])
    p = _class_probabilities(tiny, torch.randn(50, 32).double().float())
    assert (p[:, 6] <= p[:, 0] * torch.exp(torch.tensor(-_core.PRESERVE_GAP)) * 1.001).all()


def test_mean_init_is_seeded_and_like_the_old_rows(tiny):
    a, b, c = tiny, copy.deepcopy(tiny), copy.deepcopy(tiny)
    for model, seed in ((a, 3), (b, 3), (c, 4)):
        detgraft.expand_predictor(model, ["chicken", "frog"], init="mean", seed=seed)
    rows = [m.roi_heads.box_predictor.cls_score.weight[6:].detach() for m in (a, b, c)]
    assert torch.equal(rows[0], rows[1]) and not torch.equal(rows[0], rows[2])
    old = a.roi_heads.box_predictor.cls_score.weight[1:6].detach()
    assert ((rows[0] - old.mean(0)).abs() <= 6 * old.std(0, unbiased=False) + 1e-6).all()


def test_imprint_init_points_at_the_new_class_features(tiny, tiny_images):
    examples = [
        (
            tiny_images[0],
            {"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0], [30.0, 20.0, 60.0, 50.0]]), "labels": torch.tensor([6, 7])},
        ),
        (tiny_images[1], {"boxes": torch.tensor([[10.0, 5.0, 50.0, 40.0]]), "labels": torch.tensor([6])}),
    ]
    features, labels = detgraft.box_features(tiny, examples)
    assert features.shape == (3, 32) and labels.tolist() == [6, 7, 6]
    old_norm = tiny.roi_heads.box_predictor.cls_score.weight[1:].norm(dim=1).mean().item()
    detgraft.expand_predictor(tiny, ["chicken", "frog"], init="imprint", examples=examples)
    weight = tiny.roi_heads.box_predictor.cls_score.weight.detach()
    unit = nn.functional.normalize(features, dim=1)
    for label in (6, 7):
        direction = nn.functional.normalize(unit[labels == label].mean(0), dim=0)
        torch.testing.assert_close(weight[label], direction * old_norm)


@pytest.mark.parametrize(
    "names, kwargs, error, match",
    [
        # a class the model already has (COCO-style names would say 'bird'; the tiny one says class_3)
        (["class_3"], {}, ValueError, "'class_3' already exists \\(label 3\\)"),
        # case does not make a new class
        (["Class_3"], {}, ValueError, "already exists"),
        ([], {}, ValueError, "names is empty"),
        (["frog", "frog"], {}, ValueError, "'frog' more than once"),
        # a bare string would otherwise become one class per letter
        ("frog", {}, TypeError, "list of class names"),
        (["__background__"], {}, ValueError, "reserved"),
        ([""], {}, ValueError, "non-empty strings"),
        (["frog"], {"init": "zeros"}, ValueError, 'unknown init "zeros"'),
        (["frog"], {"init": "imprint"}, ValueError, "needs examples"),
        (["frog"], {"init": "mean", "examples": []}, ValueError, 'only used by init="imprint"'),
    ],
)
def test_expand_predictor_errors(tiny, names, kwargs, error, match):
    before = copy.deepcopy(tiny.state_dict())
    with pytest.raises(error, match=match):
        detgraft.expand_predictor(tiny, names, **kwargs)
    # nothing changed on a refused call
    after = tiny.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert detgraft.get_card(tiny).num_classes == 6


def test_unsupported_predictor_is_named(tiny):
    class MyPredictor(nn.Module):
        pass

    tiny.roi_heads.box_predictor = MyPredictor()
    with pytest.raises(NotImplementedError, match="not supported yet: .*MyPredictor"):
        detgraft.expand_predictor(tiny, ["frog"])


def test_expand_state_dict_widens_a_copy(tiny):
    state = tiny.state_dict()
    snapshot = {k: v.clone() for k, v in state.items()}
    out = detgraft.expand_state_dict(state, 2)
    assert out["roi_heads.box_predictor.cls_score.weight"].shape == (8, 32)
    assert out["roi_heads.box_predictor.bbox_pred.bias"].shape == (32,)
    assert all(torch.equal(state[k], snapshot[k]) for k in state)  # input not mutated
    assert out["backbone.0.weight"] is state["backbone.0.weight"]
    widened = build(num_classes=8)
    widened.load_state_dict(out)


def test_expand_state_dict_errors(tiny):
    state = tiny.state_dict()
    with pytest.raises(KeyError, match="predictor weights found under"):
        detgraft.expand_state_dict(state, 1, prefix="roi_heads.predictor")
    bad = dict(state)
    bad["roi_heads.box_predictor.bbox_pred.weight"] = bad["roi_heads.box_predictor.bbox_pred.weight"][:4]
    with pytest.raises(ValueError, match=r"expected cls_score.bias \[6\], bbox_pred.weight \[24, 32\]"):
        detgraft.expand_state_dict(bad, 1)
    with pytest.raises(ValueError, match="num_new must be at least 1"):
        detgraft.expand_state_dict(state, 0)


def test_rust_errors_reach_python_as_value_errors():
    w = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="one dtype and device"):
        _core.widen_predictor(w, torch.zeros(3, dtype=torch.float64), torch.zeros(12, 4), torch.zeros(12), 1)
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        _core.widen_predictor([1.0], torch.zeros(3), torch.zeros(12, 4), torch.zeros(12), 1)
