"""Widening on CUDA tensors: run by scripts/gpu_check.sh on a machine with a GPU."""

from __future__ import annotations

import pytest
import torch

import detgraft
from conftest import assert_same_detections, detect
from detgraft import _core
from tiny_model import build, images

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("init", ["preserve", "mean", "background"])
def test_widening_stays_on_the_gpu(init):
    predictor = build().roi_heads.box_predictor.cuda()
    tensors = [
        p.detach()
        for p in (
            predictor.cls_score.weight,
            predictor.cls_score.bias,
            predictor.bbox_pred.weight,
            predictor.bbox_pred.bias,
        )
    ]
    torch.cuda.synchronize()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    ) as prof:
        out = _core.widen_predictor(*tensors, 2, init)
        torch.cuda.synchronize()
    assert all(t.is_cuda for t in out)
    names = [e.name for e in prof.events()]
    assert not [n for n in names if "DtoH" in n or "Device -> Host" in n], names
    assert torch.equal(out[0][:6], tensors[0])


def test_cuda_model_keeps_its_detections_and_device():
    model = build().cuda()
    before = detect(model, images())
    detgraft.expand_predictor(model, ["chicken", "frog"])
    assert all(p.is_cuda for p in model.parameters())
    assert_same_detections(before, detect(model, images()))
