"""NMS and RoIAlign: detgraft's Rust kernels against torchvision's, timed in the same run.

    python benchmarks/ops.py [--device cpu|cuda] [--repeats 15] [--no-write]

Prints a table and writes it to benchmarks/RESULTS.md (section ops-DEVICE). Ratios are
detgraft time / torchvision time (< 1 is faster), each the median of interleaved repeats.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import nms as tv_nms
from torchvision.ops import roi_align as tv_roi_align

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402

from detgraft import _core, ops  # noqa: E402


def timed(fn, device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(ours, theirs, repeats, device) -> tuple[float, float]:
    ours(), theirs()  # warm up
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(ours, device))
        b.append(timed(theirs, device))
    return statistics.median(a), statistics.median(b)


def rpn_like_boxes(n: int, device: str, seed: int = 0):
    """Proposals as an RPN makes them: many jittered boxes around ~n/50 objects, in an 800px image."""
    g = torch.Generator().manual_seed(seed)
    objects = max(n // 50, 1)
    centers = torch.rand(objects, 2, generator=g) * 700
    sizes = torch.rand(objects, 2, generator=g) * 150 + 16
    pick = torch.randint(0, objects, (n,), generator=g)
    jitter = torch.randn(n, 4, generator=g) * 0.15
    x1y1 = centers[pick] + jitter[:, :2] * sizes[pick]
    x2y2 = centers[pick] + sizes[pick] * (1 + jitter[:, 2:])
    boxes = torch.cat([x1y1, torch.maximum(x2y2, x1y1 + 1)], 1)
    return boxes.to(device), torch.rand(n, generator=g).to(device)


def fpn_inputs(device: str, rois: int = 512, channels: int = 256):
    """An 800x800 batch of 2 through an FPN: 4 levels (strides 4..32) and 512 RoIs."""
    g = torch.Generator().manual_seed(0)
    features = OrderedDict(
        (str(i), torch.randn(2, channels, 800 // s, 800 // s, generator=g).to(device).requires_grad_())
        for i, s in enumerate((4, 8, 16, 32))
    )
    boxes = []
    for _ in range(2):
        xy = torch.rand(rois // 2, 2, generator=g) * 700
        wh = torch.rand(rois // 2, 2, generator=g) ** 2 * 400 + 8
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=800)], 1).to(device))
    return features, boxes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    default_threads = torch.get_num_threads()
    parser.add_argument("--threads", type=int, default=default_threads)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    rows = []

    # small inputs, where calling through the dispatcher costs most: detgraft's function (an eager call
    # runs the operator's kernel directly when nothing the dispatcher adds is active) and the
    # registered operator itself (what TorchScript, torch.compile and autocast call)
    boxes, scores = rpn_like_boxes(100, device)
    assert torch.equal(ops.nms(boxes, scores, 0.7), tv_nms(boxes, scores, 0.7))
    for name, ours in (
        ("ops.nms", lambda: ops.nms(boxes, scores, 0.7)),
        ("torch.ops.detgraft.nms", lambda: torch.ops.detgraft.nms(boxes, scores, 0.7)),
    ):
        a, b = compare(ours, lambda: tv_nms(boxes, scores, 0.7), args.repeats * 20, device)
        rows.append((f"nms 100 boxes, `{name}`", a, b))

    for n in (1000, 5000, 20000):
        boxes, scores = rpn_like_boxes(n, device)
        assert torch.equal(ops.nms(boxes, scores, 0.7), tv_nms(boxes, scores, 0.7))
        repeats = args.repeats if n < 20000 else max(3, args.repeats // 3)
        ours, theirs = compare(
            lambda b=boxes, s=scores: ops.nms(b, s, 0.7), lambda b=boxes, s=scores: tv_nms(b, s, 0.7), repeats, device
        )
        kept = len(tv_nms(boxes, scores, 0.7))
        rows.append((f"nms {n} boxes (IoU 0.7, {kept} kept)", ours, theirs))
        if n == 1000:  # what the Python layer (operator checks, torchvision's exception types) costs here
            core, theirs = compare(
                lambda b=boxes, s=scores: _core.nms(b, s, 0.7),
                lambda b=boxes, s=scores: tv_nms(b, s, 0.7),
                repeats,
                device,
            )
            rows.append((f"nms {n} boxes, the Rust kernel called directly (`_core.nms`)", core, theirs))

    features, boxes = fpn_inputs(device)
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    sizes = [(800, 800)] * 2
    pooler(features, boxes, sizes)  # sets scales and level mapper

    def forward(use_ours):
        if use_ours:
            with ops.rust_ops(pooler):
                return pooler(features, boxes, sizes)
        return pooler(features, boxes, sizes)

    torch.testing.assert_close(forward(True), forward(False), rtol=0, atol=1e-5)
    with torch.no_grad():
        ours, theirs = compare(lambda: forward(True), lambda: forward(False), args.repeats, device)
    rows.append(("roi_align forward, 512 RoIs on 4 FPN levels (256 ch, 7x7, sampling 2)", ours, theirs))

    grad = torch.randn(len(boxes[0]) * 2, 256, 7, 7, device=device)
    outs = {True: forward(True), False: forward(False)}

    def backward(use_ours):
        return torch.autograd.grad(outs[use_ours], list(features.values()), grad, retain_graph=True)

    for a, b in zip(backward(True), backward(False)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    ours, theirs = compare(lambda: backward(True), lambda: backward(False), args.repeats, device)
    rows.append(("roi_align backward, same", ours, theirs))

    # the EmojiCOCO training step's pooling: 8 images' 150 proposals each, all on the stride-8 level
    g = torch.Generator().manual_seed(1)
    level = torch.randn(8, 64, 32, 32, generator=g).to(device)
    xy = torch.rand(1200, 2, generator=g) * 200
    rois = torch.cat([torch.arange(1200)[:, None] % 8, xy, xy + 10 + torch.rand(1200, 2, generator=g) * 70], 1)
    rois = rois.to(device)
    pooled = (rois, 7, 1 / 8, 2)
    if device == "cpu":  # the same arithmetic per value as torchvision's kernel
        assert torch.equal(ops.roi_align(level, *pooled), tv_roi_align(level, *pooled))
    with torch.no_grad():
        ours, theirs = compare(
            lambda: ops.roi_align(level, *pooled), lambda: tv_roi_align(level, *pooled), args.repeats, device
        )
    rows.append(("roi_align forward, 1200 RoIs on one 8x64x32x32 map (EmojiCOCO's training step)", ours, theirs))

    card = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    command = (
        "python benchmarks/ops.py"
        + (f" --device {device}" if device != "cpu" else "")
        + (f" --threads {args.threads}" if args.threads != default_threads else "")
    )
    lines = [
        f"## Ops on {device} ({card}, {torch.get_num_threads()} torch threads)",
        "",
        f"Command: `{command}` — torch {torch.__version__}, torchvision {torchvision.__version__}; "
        f"median of {args.repeats} interleaved runs; ratio = detgraft / torchvision (< 1: detgraft faster). "
        "Results were checked equal to torchvision's before timing.",
        "",
        "| workload | detgraft ms | torchvision ms | ratio |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {a * 1e3:.2f} | {b * 1e3:.2f} | {a / b:.2f} |" for name, a, b in rows]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section(f"ops-{device}-{torch.get_num_threads()}t", table)


if __name__ == "__main__":
    main()
