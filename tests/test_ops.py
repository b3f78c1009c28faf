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
    "call, error, match",
    [
        # torchvision's own input checks (its test_nms_input_errors): RuntimeError
        (lambda: ops.nms(torch.rand(4), torch.rand(3), 0.5), RuntimeError, r"Tensor\[N, 4\]"),
        (lambda: ops.nms(torch.rand(3, 5), torch.rand(3), 0.5), RuntimeError, r"Tensor\[N, 4\]"),
        (lambda: ops.nms(torch.rand(3, 4), torch.rand(3, 2), 0.5), RuntimeError, "one per box"),
        (lambda: ops.nms(torch.rand(3, 4), torch.rand(4), 0.5), RuntimeError, "one per box"),
        (lambda: ops.nms(torch.zeros(2, 4), torch.zeros(2, dtype=torch.float64), 0.5), RuntimeError, "one floating"),
        (lambda: ops.nms(torch.tensor([[0.0, float("nan"), 1, 1]]), torch.ones(1), 0.5), RuntimeError, "NaN"),
        # torchvision's box shape check: AssertionError
        (lambda: ops.roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4), 2), AssertionError, r"Tensor\[K, 5\]"),
        (lambda: ops.roi_align(torch.zeros(1, 1, 4, 4), [torch.zeros(1, 3)], 2), AssertionError, r"Tensor\[L, 4\]"),
        (lambda: ops.roi_align(torch.zeros(1, 1, 4, 4), torch.tensor([[2.0, 0, 0, 1, 1]]), 2), RuntimeError, "batch"),
    ],
)
def test_bad_inputs_raise_torchvision_s_exception_types(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_empty_inputs_behave_as_torchvision_s():
    empty = torch.empty((0,), dtype=torch.int64)
    # torchvision's helpers pass None for what an empty call does not read
    assert torch.equal(ops.batched_nms(torch.empty(0), None, None, None), empty)
    assert torch.equal(ops.batched_nms(torch.zeros(0, 4), torch.zeros(0), empty, 0.5), empty)
    assert torch.equal(ops.nms(torch.zeros(0, 4), torch.zeros(0), 0.5), tv_nms(torch.zeros(0, 4), torch.zeros(0), 0.5))
    x = torch.rand(2, 3, 8, 8)
    for boxes in (torch.zeros(0, 5), [torch.zeros(0, 4), torch.zeros(0, 4)]):
        out = ops.roi_align(x, boxes, (2, 3))
        assert out.shape == tv_roi_align(x, boxes, (2, 3)).shape == (0, 3, 2, 3)


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


LOW = [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("input_dtype, rois_dtype", [*LOW, (torch.float16, torch.float16)])
def test_autocast_computes_in_float32_as_torchvision(input_dtype, rois_dtype):
    """Under CPU autocast torchvision casts to float32 (float64 stays), computes, and gives RoIAlign's
    result back in the input's dtype; with both inputs in bfloat16 detgraft computed in bfloat16."""
    x, rois = feature_maps(torch.float32), roi_boxes(torch.float32)
    boxes, scores = clustered_boxes(1000, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.roi_align(x.to(input_dtype), rois.to(rois_dtype), 3, 0.25, 2)
        expected = tv_roi_align(x.to(input_dtype), rois.to(rois_dtype), 3, 0.25, 2)
        kept = ops.nms(boxes.to(input_dtype), scores.to(rois_dtype), 0.5)
        assert torch.equal(kept, tv_nms(boxes.to(input_dtype), scores.to(rois_dtype), 0.5))
        # per class, as torchvision's per-class implementation (its coordinate trick, for fewer boxes,
        # adds the class offsets in the input's dtype first: in bfloat16 that moves the boxes)
        by_class = torch.arange(1000) % 3
        kept = ops.batched_nms(boxes.to(input_dtype), scores.to(rois_dtype), by_class, 0.5)
        vanilla = torchvision.ops.boxes._batched_nms_vanilla(
            boxes.to(input_dtype), scores.to(rois_dtype), by_class, 0.5
        )
        assert torch.equal(kept.sort().values, vanilla.sort().values)  # the same boxes; ties in bfloat16 scores
        assert (scores.to(rois_dtype)[kept].diff() <= 0).all()  # keep their input order here, unsorted there
    assert out.dtype == expected.dtype == input_dtype
    # both computed in float32 and rounded once to the input's dtype: at most one unit of its last place apart
    torch.testing.assert_close(out.float(), expected.float(), rtol=torch.finfo(input_dtype).eps, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is left as it is, as torchvision leaves it
        assert ops.roi_align(x.double(), rois.double(), 3, 0.25, 2).dtype == torch.float64


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


class _Pool(torch.nn.Module):
    """torchvision's own test wrapper: RoIAlign called with a list of boxes."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = torchvision.ops.RoIAlign(output_size=[3, 3], spatial_scale=1.0, sampling_ratio=-1)

    def forward(self, x: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        return self.pool(x, boxes)


def counting_core(monkeypatch) -> list[str]:
    """Records each call into the Rust core's NMS and RoIAlign (proof that a swap took effect)."""
    calls: list[str] = []
    for name in ("nms", "batched_nms", "roi_align_forward", "roi_align_backward"):
        original = getattr(_core, name)
        monkeypatch.setattr(_core, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    return calls


def test_everywhere_swaps_every_public_name_and_puts_them_back(monkeypatch):
    import sys

    tv = torchvision.ops
    modules = ("torchvision.ops.roi_align", "torchvision.ops.poolers", "torchvision.models.detection.roi_heads")
    originals = (tv.nms, tv.batched_nms, tv.roi_align, tv.boxes.nms, tv.boxes.batched_nms)
    calls = counting_core(monkeypatch)
    boxes, scores = random_boxes(50, 1)
    x, rois = feature_maps(torch.float32), roi_boxes(torch.float32)
    with ops.everywhere():
        assert (tv.nms, tv.batched_nms, tv.roi_align) == (ops.nms, ops.batched_nms, ops.roi_align)
        assert tv.boxes.nms is ops.nms and tv.boxes.batched_nms is ops.batched_nms
        assert all(sys.modules[m].roi_align is ops.roi_align for m in modules)
        # a user's own calls, and torchvision's modules, reach the Rust core
        tv.nms(boxes, scores, 0.5)
        tv.batched_nms(boxes, scores, torch.zeros(50, dtype=torch.int64), 0.5)
        tv.RoIAlign(3, 0.25, 2)(x, rois)
        tv.MultiScaleRoIAlign(["0"], 3, 2)({"0": x}, [rois[:2, 1:]], [(200, 200)])
    assert calls == ["nms", "batched_nms", "roi_align_forward", "roi_align_forward"]
    assert (tv.nms, tv.batched_nms, tv.roi_align, tv.boxes.nms, tv.boxes.batched_nms) == originals
    assert all(sys.modules[m].roi_align is originals[2] for m in modules)


def test_torchscript_scripts_the_functions():
    """torchvision's own TorchScript cases: the functions scripted alone, and RoIAlign in a module
    with boxes as a list of tensors."""
    boxes, scores = random_boxes(300, 4)
    assert torch.equal(torch.jit.script(ops.nms)(boxes, scores, 0.5), tv_nms(boxes, scores, 0.5))
    classes = torch.arange(300) % 4
    scripted_nms = torch.jit.script(ops.batched_nms)
    assert torch.equal(scripted_nms(boxes, scores, classes, 0.5), ops.batched_nms(boxes, scores, classes, 0.5))
    f, r = feature_maps(torch.float32), roi_boxes(torch.float32)
    scripted_roi_align = torch.jit.script(ops.roi_align)
    torch.testing.assert_close(
        scripted_roi_align(f, r, [3, 3], 0.25, 2), ops.roi_align(f, r, 3, 0.25, 2), rtol=0, atol=0
    )
    x = torch.rand(2, 1, 10, 10)
    roi = torch.tensor([[0, 0, 0, 9, 9], [0, 0, 5, 4, 9], [0, 5, 5, 9, 9], [1, 0, 0, 9, 9]], dtype=torch.float).t()
    assert scripted_roi_align(x, [roi, roi], [3, 3]).shape == (10, 1, 3, 3)


SCRIPTED_MODEL = """
import sys, torch
sys.path.insert(0, "tests")
from conftest import assert_same_detections, detect
from detgraft import _core, ops
from test_ops import _Pool
from tiny_model import build, images

x = torch.rand(2, 1, 10, 10)
roi = torch.tensor([[0, 0, 0, 9, 9], [0, 0, 5, 4, 9], [0, 5, 5, 9, 9], [1, 0, 0, 9, 9]], dtype=torch.float).t()
with ops.everywhere():
    pool = torch.jit.script(_Pool())
assert pool(x, [roi, roi]).shape == (10, 1, 3, 3)
assert "detgraft::roi_align" in str(pool.inlined_graph)
model = build().eval()
with ops.everywhere():
    scripted = torch.jit.script(model)
assert "detgraft::batched_nms" in str(scripted.inlined_graph) and "detgraft::roi_align" in str(scripted.inlined_graph)
calls = []
for name in ("batched_nms", "roi_align_forward"):
    setattr(_core, name, lambda *a, _f=getattr(_core, name), _n=name: calls.append(_n) or _f(*a))
_, detections = scripted(images())
assert {"batched_nms", "roi_align_forward"} <= set(calls), calls  # the scripted model runs the Rust core
assert_same_detections(detect(model, images()), detections, score_rtol=1e-6)
print("ok")
"""


def test_torchscript_of_a_model_calls_the_rust_operators():
    """A detection model scripted inside ``everywhere()`` calls detgraft's operators, and detects as
    the eager model does. In a fresh process: TorchScript keeps the code it compiled for a module
    class, so a class scripted earlier with torchvision's ops (this suite scripts many) keeps them."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    done = subprocess.run([sys.executable, "-c", SCRIPTED_MODEL], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_fx_sees_roi_align_as_one_node():
    with ops.everywhere():
        traced = torch.fx.symbolic_trace(torchvision.ops.RoIAlign(5, 1.0, -1))
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert targets == [ops.roi_align]
    x, rois = feature_maps(torch.float32), roi_boxes(torch.float32) / 4
    torch.testing.assert_close(traced(x, rois), tv_roi_align(x, rois, 5, 1.0, -1), rtol=0, atol=1e-5)


def test_torch_compile_runs_a_model_with_the_rust_ops_without_a_graph_break():
    class Head(torch.nn.Module):  # what an R-CNN does with them: pool the boxes, score, suppress
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.pool = torchvision.ops.RoIAlign(3, 0.25, 2)
            self.score = torch.nn.Linear(3 * 3 * channels, 1)

        def forward(self, x, rois):
            scores = self.score(self.pool(x, rois).flatten(1)).squeeze(1).sigmoid()
            return torchvision.ops.batched_nms(rois[:, 1:], scores, rois[:, 0].long(), 0.3), scores

    torch.manual_seed(0)
    x, rois = feature_maps(torch.float32), roi_boxes(torch.float32)
    head = Head(x.shape[1])
    with ops.everywhere():
        torch._dynamo.reset()
        compiled = torch.compile(head, fullgraph=True, backend="eager")  # fullgraph: a graph break fails
        kept, scores = compiled(x, rois)
        eager_kept, eager_scores = head(x, rois)  # the same ops, eager: the same result by construction
    assert torch.equal(kept, eager_kept) and torch.equal(scores, eager_scores)
    _, expected_scores = head(x, rois)  # torchvision's ops (another RoIAlign kernel: a tolerance)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-6)


def test_quantized_tensors_get_what_torchvision_gives():
    """detgraft hands quantized tensors to torchvision's kernels: the same result, or the same error."""
    boxes, scores = random_boxes(100, 5)
    q = lambda t: torch.quantize_per_tensor(t, scale=1.0, zero_point=0, dtype=torch.quint8)  # noqa: E731
    x = torch.randint(50, 100, (1, 2, 10, 10)).float()
    rois = torch.tensor([[0, 0, 0, 9, 9], [0, 2, 2, 6, 8]], dtype=torch.float)
    for ours, theirs, args in [
        (ops.nms, tv_nms, (q(boxes), q(scores * 100), 0.5)),
        (ops.roi_align, tv_roi_align, (q(x), q(rois), 5)),
    ]:
        try:
            expected = theirs(*args)
        except Exception as err:  # torchvision 0.28 has no quantized NMS kernel
            with pytest.raises(type(err)):
                ours(*args)
        else:
            assert torch.equal(ours(*args).int_repr() if expected.is_quantized else ours(*args),
                               expected.int_repr() if expected.is_quantized else expected)  # fmt: skip


def test_non_contiguous_and_channels_last_maps_pool_as_torchvision_s():
    x, rois = feature_maps(torch.float64), roi_boxes(torch.float64)
    for view in (x.permute(0, 1, 3, 2), x.contiguous(memory_format=torch.channels_last), x[:, :, ::2, ::2]):
        out = ops.roi_align(view, rois, (3, 4), 0.25, 2, True)
        torch.testing.assert_close(out, tv_roi_align(view, rois, (3, 4), 0.25, 2, True), rtol=0, atol=1e-10)


def test_a_torchvision_module_first_imported_inside_everywhere_gets_torchvision_s_ops_back(monkeypatch):
    import sys
    import types

    # as a torchvision module does on import: ``from torchvision.ops import nms`` binds the current one
    late = types.ModuleType("torchvision.late_import_for_the_test")
    original = torchvision.ops.nms
    with ops.everywhere():
        monkeypatch.setitem(sys.modules, late.__name__, late)  # imported inside the block
        late.nms = torchvision.ops.nms
        assert late.nms is ops.nms
    assert late.nms is original
