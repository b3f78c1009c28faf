from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import detgraft
from detgraft.incremental import freeze_batchnorm, incremental
from tiny_model import build, images

TARGETS = [
    {"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([6])},
    {"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0]]), "labels": torch.tensor([7])},
]


def widened():
    model = build()
    return detgraft.expand_predictor(model, ["chicken", "frog"])


def train(model, steps=3, weight_decay=1e-2):
    """A plain torchvision training loop."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        losses = model(images(), TARGETS)
        assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_freeze_batchnorm_keeps_outputs_and_stops_drift():
    model = build()
    before = [d["scores"] for d in model(images())]
    assert freeze_batchnorm(model) == 2
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 2
    after = [d["scores"] for d in model(images())]
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b)
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
