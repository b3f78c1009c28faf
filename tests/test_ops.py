from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torchvision.ops import batched_nms as tv_batched_nms
from torchvision.ops import nms as tv_nms
from torchvision.ops import roi_align as tv_roi_align

from conftest import assert_same_detections, detect
from detgraft import _core, ops
from tiny_model import build, images

KERNELS = ["auto", "tensor"]  # host kernel, and the tensor path CUDA tensors take


def random_boxes(n, seed, size=200.0, max_wh=60.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * max_wh
    return torch.cat([xy, xy + wh], 1).to(dtype), torch.rand(n, generator=g).to(dtype)


def clustered_boxes(n, seed, dtype=torch.float32):
    """Many jittered copies of a few boxes: the RPN's situation, heavy suppression."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(8, 4, generator=g) * 100
    centers[:, 2:] += centers[:, :2] + 20
    boxes = centers[torch.randint(0, 8, (n,), generator=g)] + torch.randn(n, 4, generator=g) * 3
    return boxes.to(dtype), torch.rand(n, generator=g).to(dtype)


def adversarial_boxes(dtype):
    boxes = torch.tensor(
        [
            [0, 0, 10, 10],
            [0, 0, 10, 10],
            [0, 0, 10, 10],  # identical, equal scores
            [5, 5, 5, 5],
            [5, 5, 5, 5],  # zero area
            [0, 0, 10, 5],
            [0, 5, 10, 10],  # touching
            [-50, -50, 1000, 1000],  # huge
            [3, 3, 1, 1],  # inverted
            [0, 0, 10, 20],
            [0, 0, 10, 10],  # IoU exactly 0.5
        ],
        dtype=dtype,
    )
    scores = torch.tensor([0.5, 0.5, 0.5, 0.9, 0.9, 0.3, 0.3, 0.1, 0.2, 0.6, 0.6], dtype=dtype)
    return boxes, scores


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_nms_matches_torchvision(kernel, dtype, threshold):
    cases = [random_boxes(500, 1, dtype=dtype), clustered_boxes(700, 2, dtype=dtype), adversarial_boxes(dtype)]
    for boxes, scores in cases:
        expected = tv_nms(boxes, scores, threshold)
        assert torch.equal(_core.nms(boxes, scores, threshold, kernel), expected)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n", [0, 1, 300, 2000])  # torchvision switches strategy past 1000 boxes on the CPU
def test_batched_nms_matches_torchvision(kernel, n):
    boxes, scores = clustered_boxes(n, 3)
    idxs = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(4))
    expected = tv_batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(_core.batched_nms(boxes, scores, idxs, 0.5, kernel), expected)


def test_equal_scores_keep_the_lower_index():
    boxes = torch.tensor([[0.0, 0, 10, 10]] * 3)
    assert ops.nms(boxes, torch.tensor([0.5, 0.7, 0.7]), 0.5).tolist() == [1]
    assert ops.nms(boxes, torch.tensor([0.5, 0.5, 0.5]), 0.5).tolist() == [0]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ops.nms(torch.zeros(3, 5), torch.zeros(3), 0.5), r"Tensor\[N, 4\]"),
        (lambda: ops.nms(torch.tensor([[0.0, float("nan"), 1, 1]]), torch.ones(1), 0.5), "NaN"),
        (lambda: ops.nms(torch.zeros(2, 4), torch.zeros(2, dtype=torch.float64), 0.5), "one floating dtype"),
        (lambda: ops.roi_align(torch.zeros(1, 1, 4, 4), torch.tensor([[2.0, 0, 0, 1, 1]]), 2), "batch indices"),
        (lambda: ops.roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4), 2), r"Tensor\[K, 5\]"),
    ],
)
def test_bad_inputs_raise_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def feature_maps(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 20, 24, generator=g).to(dtype)


def roi_boxes(dtype):
    boxes, _ = random_boxes(30, 5, size=90.0, max_wh=50.0, dtype=dtype)
    boxes = torch.cat(
        [
            boxes,
            torch.tensor(
                [
                    [-20.0, -20, 10, 10],  # partly outside
                    [200, 200, 260, 240],  # outside
                    [40, 40, 40, 40],  # zero area
                    [0, 0, 96, 80],  # whole map
                ],
                dtype=dtype,
            ),
        ]
    )
    index = (torch.arange(len(boxes)) % 2).to(dtype)[:, None]
    return torch.cat([index, boxes], 1)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_matches_torchvision(kernel, dtype, aligned, sampling_ratio):
    x, rois = feature_maps(dtype).requires_grad_(), roi_boxes(dtype)
    expected = tv_roi_align(x, rois, (5, 4), 0.25, sampling_ratio, aligned)
    params = (0.25, 5, 4, sampling_ratio, aligned)
    out = _core.roi_align_forward(x.detach(), rois, *params, kernel)
    torch.testing.assert_close(out, expected.detach(), rtol=0, atol=1e-5)
    grad_out = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, x, grad_out)
    grad = _core.roi_align_backward(grad_out, rois, *params, list(x.shape), kernel)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_reads_channels_last_maps_with_the_same_arithmetic(dtype, aligned, sampling_ratio):
    """A map in channels-last memory is pooled by the channel-vectorised kernel, and so are many RoIs
    on any map; one RoI on a plain map by the plane-by-plane one. Both add the same products in the
    same order for each output value, so they agree bit for bit."""
    x, rois = feature_maps(dtype), roi_boxes(dtype)
    params = (0.25, 5, 4, sampling_ratio, aligned)
    planes = torch.cat([_core.roi_align_forward(x, rois[k : k + 1], *params) for k in range(len(rois))])
    last = _core.roi_align_forward(x.contiguous(memory_format=torch.channels_last), rois, *params)
    assert torch.equal(planes, last)
    assert torch.equal(_core.roi_align_forward(x, rois, *params), last)  # many RoIs: copied channels-last
    torch.testing.assert_close(last, tv_roi_align(x, rois, (5, 4), 0.25, sampling_ratio, aligned), rtol=0, atol=1e-5)


def test_roi_align_and_nms_under_autocast_work_in_float32_as_torchvision():
    x, rois = feature_maps(torch.float32), roi_boxes(torch.float32)
    boxes, scores = random_boxes(50, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.roi_align(x.bfloat16(), rois, 3, 0.25, 2)
        expected = tv_roi_align(x.bfloat16(), rois, 3, 0.25, 2)
        kept = ops.nms(boxes, scores.bfloat16(), 0.5)
        assert torch.equal(kept, torchvision.ops.nms(boxes, scores.bfloat16(), 0.5))
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_roi_align_takes_a_list_of_boxes_and_trains():
    x = feature_maps(torch.float32).requires_grad_()
    boxes = [torch.tensor([[0.0, 0, 40, 40]]), torch.tensor([[10.0, 10, 60, 50], [0, 0, 8, 8]])]
    out = ops.roi_align(x, boxes, 3, 0.25, 2)
    torch.testing.assert_close(out, tv_roi_align(x, boxes, 3, 0.25, 2), rtol=0, atol=1e-6)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_gradcheck(aligned):
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.5, 9.0, 8.0], [0, -2.0, 0.5, 4.0, 13.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: ops.roi_align(t, rois, (3, 2), 0.5, 2, aligned), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.roi_align(t, rois, (3, 2), 0.5, 0, aligned), (x,))


def test_fpn_model_with_rust_ops_detects_the_same():
    # four FPN levels, so MultiScaleRoIAlign maps boxes to levels and calls roi_align per level
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=320, max_size=320
    ).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # untrained scores are all ~1/91; spread them (to 0.16..0.97) to compare
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.01)
    pictures = images(1, size=320)
    before = detect(model, pictures)
    with ops.rust_ops(model):
        after = detect(model, pictures)
    assert_same_detections(before, after, score_rtol=1e-6)
    assert torchvision.ops.boxes.batched_nms is not ops.batched_nms  # restored after the block
    assert not model._forward_pre_hooks


def test_training_step_losses_match_and_other_models_are_untouched():
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([2])}] * 2
    plain, rust = build(), build()
    ops.use_rust_ops(rust)
    calls = []
    original = _core.nms, _core.batched_nms, _core.roi_align_forward
    try:
        _core.batched_nms = lambda *a, **k: calls.append("nms") or original[1](*a, **k)
        _core.roi_align_forward = lambda *a, **k: calls.append("roi") or original[2](*a, **k)
        plain.train(), rust.train()
        torch.manual_seed(1)
        expected = plain(images(), targets)
        assert not calls  # the model without use_rust_ops kept torchvision's ops
        torch.manual_seed(1)
        losses = rust(images(), targets)
        assert "nms" in calls and "roi" in calls
    finally:
        _core.nms, _core.batched_nms, _core.roi_align_forward = original
    for name in expected:
        torch.testing.assert_close(losses[name], expected[name], rtol=1e-5, atol=1e-6)
    sum(losses.values()).backward()
    sum(expected.values()).backward()
    for (name, a), (_, b) in zip(rust.named_parameters(), plain.named_parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    ops.restore(rust)
    assert not rust._forward_pre_hooks and not rust._forward_hooks


def test_ops_are_restored_when_forward_raises(tiny):
    ops.use_rust_ops(tiny).train()
    with pytest.raises(AssertionError, match="targets should not be none"):
        tiny([torch.rand(3, 32, 32)])
    assert torchvision.ops.boxes.batched_nms is not ops.batched_nms
    assert torchvision.ops.poolers.roi_align is not ops.roi_align


def test_deep_copied_model_keeps_working(tiny, tiny_images):
    ops.use_rust_ops(tiny)
    clone = copy.deepcopy(tiny)
    assert_same_detections(detect(tiny, tiny_images), detect(clone, tiny_images), score_rtol=0)
