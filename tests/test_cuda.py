"""Widening on CUDA tensors: run by scripts/gpu_check.sh on a machine with a GPU."""

from __future__ import annotations

import pytest
import torch

import detgraft
from conftest import assert_same_detections, detect64, preserve_rtol
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
    before = detect64(model, images())
    detgraft.expand_predictor(model, ["chicken", "frog"])
    assert all(p.is_cuda for p in model.parameters())
    assert_same_detections(before, detect64(model, images()), score_rtol=preserve_rtol(2))


@pytest.mark.parametrize("n", [100, 3000])
def test_nms_on_cuda_matches_torchvision_and_stays_there(n):
    from torchvision.ops import batched_nms as tv_batched_nms
    from torchvision.ops import nms as tv_nms

    from detgraft import ops
    from test_ops import clustered_boxes

    boxes, scores = (t.cuda() for t in clustered_boxes(n, 7))
    keep = ops.nms(boxes, scores, 0.5)
    assert keep.is_cuda and torch.equal(keep, tv_nms(boxes, scores, 0.5))
    idxs = torch.randint(0, 4, (n,), device="cuda")
    assert torch.equal(ops.batched_nms(boxes, scores, idxs, 0.5), tv_batched_nms(boxes, scores, idxs, 0.5))


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_on_cuda_matches_torchvision(aligned):
    from torchvision.ops import roi_align as tv_roi_align

    from detgraft import ops
    from test_ops import feature_maps, roi_boxes

    x = feature_maps(torch.float32).cuda().requires_grad_()
    rois = roi_boxes(torch.float32).cuda()
    out = ops.roi_align(x, rois, (5, 4), 0.25, 0, aligned)
    expected = tv_roi_align(x, rois, (5, 4), 0.25, 0, aligned)
    assert out.is_cuda
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    grad = torch.randn_like(out)
    (a,) = torch.autograd.grad(out, x, grad)
    (b,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_autocast_on_cuda_computes_in_float32_as_torchvision():
    from torchvision.ops import nms as tv_nms
    from torchvision.ops import roi_align as tv_roi_align

    from detgraft import ops
    from test_ops import clustered_boxes, feature_maps, roi_boxes

    x, rois = feature_maps(torch.float32).cuda().half(), roi_boxes(torch.float32).cuda().half()
    boxes, scores = (t.cuda().half() for t in clustered_boxes(1000, 3))
    with torch.autocast("cuda", dtype=torch.float16):
        out, expected = ops.roi_align(x, rois, 3, 0.25, 2), tv_roi_align(x, rois, 3, 0.25, 2)
        assert torch.equal(ops.nms(boxes, scores, 0.5), tv_nms(boxes, scores, 0.5))
    assert out.dtype == expected.dtype == torch.float16
    torch.testing.assert_close(out.float(), expected.float(), rtol=torch.finfo(torch.float16).eps, atol=1e-5)
