"""detgraft's Rust core on the torch of this environment, without torchvision (torch 2.15 has none
yet) and without the Python package: loads ``detgraft/_core*.so`` on its own and checks widening,
NMS and RoIAlign against references that hold exactly. Run by ``scripts/build_wheels.sh``.

    python scripts/core_smoke.py [SITE_PACKAGES_OR_PACKAGE_DIR]
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import torch  # loads libtorch before the extension


def load_core(where: Path):
    (path,) = (where / "detgraft").glob("_core*.so") if (where / "detgraft").is_dir() else where.glob("_core*.so")
    loader = importlib.machinery.ExtensionFileLoader("detgraft._core", str(path))
    spec = importlib.util.spec_from_file_location("detgraft._core", path, loader=loader)
    core = importlib.util.module_from_spec(spec)
    loader.exec_module(core)
    return core, path


def reference_nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    keep: list[int] = []
    for i in order:
        if all(_iou(boxes[i], boxes[k]) <= iou for k in keep):
            keep.append(i)
    return keep


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    w = (torch.min(a[2], b[2]) - torch.max(a[0], b[0])).clamp(min=0)
    h = (torch.min(a[3], b[3]) - torch.max(a[1], b[1])).clamp(min=0)
    inter = float(w * h)
    area = lambda t: float((t[2] - t[0]) * (t[3] - t[1]))  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def main() -> None:
    core, path = load_core(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent.parent / "python")
    g = torch.Generator().manual_seed(0)

    cls_w, cls_b = torch.randn(91, 64, generator=g), torch.randn(91, generator=g)
    box_w, box_b = torch.randn(91 * 4, 64, generator=g), torch.randn(91 * 4, generator=g)
    wide = core.widen_predictor(cls_w, cls_b, box_w, box_b, 2, "preserve")
    assert [tuple(t.shape) for t in wide] == [(93, 64), (93,), (93 * 4, 64), (93 * 4,)]
    assert torch.equal(wide[0][:91], cls_w) and torch.equal(wide[2][: 91 * 4], box_w)  # copied rows

    xy = torch.rand(200, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(200, 2, generator=g) * 30], dim=1)
    scores = torch.rand(200, generator=g)
    assert core.nms(boxes, scores, 0.5).tolist() == reference_nms(boxes, scores, 0.5)

    # bilinear interpolation is exact on a linear map: each bin's mean is its centre's x
    ramp = torch.arange(32, dtype=torch.float32).repeat(1, 3, 32, 1)  # value = column index
    rois = torch.tensor([[0.0, 4.0, 6.0, 20.0, 18.0]])
    out = core.roi_align_forward(ramp, rois, 1.0, 4, 4, 2, True)
    centres = 4.0 - 0.5 + (torch.arange(4) + 0.5) * (16.0 / 4)
    torch.testing.assert_close(out[0, 0], centres.repeat(4, 1), rtol=0, atol=1e-5)
    print(f"core smoke passed: {path.name} on torch {torch.__version__}")


if __name__ == "__main__":
    main()
