"""Quickstart, offline: widen a torchvision detector for two new classes and prove nothing changed.

    python examples/quickstart.py [--out runs/quickstart]

With no weights on this machine it uses an untrained ``fasterrcnn_resnet50_fpn`` as a
stand-in for your COCO model (with the COCO weights in torch's cache, load it with
``detgraft.load_model("fasterrcnn_resnet50_fpn", "COCO_V1")`` instead). It

1. detects objects in a picture it draws,
2. adds 'chicken' and 'frog' (labels 91 and 92) with ``detgraft.expand_predictor``,
3. checks that the detections are the same as before,
4. saves a checkpoint and loads it back with torchvision alone,
5. writes the picture with its detections.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
from pathlib import Path

import safetensors.torch
import torch
import torchvision
from PIL import Image, ImageDraw
from torchvision.transforms.functional import pil_to_tensor

import detgraft
from detgraft.cli import main as detgraft_cli

log = logging.getLogger("quickstart")


def picture(size: int = 320) -> torch.Tensor:
    """A picture with a few shapes, Tensor[3, H, W] in 0..1."""
    image = Image.new("RGB", (size, size), (40, 120, 60))
    draw = ImageDraw.Draw(image)
    draw.ellipse((30, 40, 150, 160), fill=(230, 200, 40))
    draw.rectangle((170, 150, 290, 290), fill=(200, 60, 60))
    draw.polygon([(60, 300), (120, 190), (160, 300)], fill=(60, 60, 220))
    noise = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    return pil_to_tensor(image).float() / 255 * 0.5 + noise * 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)

    # 1. the model you have (stand-in: untrained)
    model = torchvision.models.get_model(
        "fasterrcnn_resnet50_fpn",
        weights=None,
        weights_backbone=None,
    ).eval()
    with torch.no_grad():  # untrained, every class scores 1/91; random class rows give it distinct opinions
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.01)
    image = picture()
    with torch.no_grad():  # in float64 (see step 3)
        before = copy.deepcopy(model).double()([image.double()])[0]

    # 2. two new classes: 91 = chicken, 92 = frog
    detgraft.expand_predictor(model, ["chicken", "frog"])
    predictor = model.roi_heads.box_predictor
    log.info(
        "cls_score %s, bbox_pred %s", tuple(predictor.cls_score.weight.shape), tuple(predictor.bbox_pred.weight.shape)
    )

    # 3. nothing changed yet: same boxes, labels and scores. Compared in float64: the widened cls_score
    # is a differently shaped matrix product, whose float32 rounding differs between CPUs (AVX2, AVX-512)
    # by more than the widening moves a score; 'preserve' moves each old score by at most 2 e^-16 (relative)
    with torch.no_grad():
        after = copy.deepcopy(model).double()([image.double()])[0]
    assert torch.equal(before["labels"], after["labels"]), "labels changed"
    box_diff = (before["boxes"] - after["boxes"]).abs().max().item()
    score_diff = ((before["scores"] - after["scores"]).abs() / before["scores"]).max().item()
    log.info(
        "%d detections before and after; max box change %.1e px, max relative score change %.1e",
        len(before["labels"]),
        box_diff,
        score_diff,
    )
    assert box_diff <= 1e-6 and score_diff <= 2 * math.exp(-16) + 1e-12

    # 4. a checkpoint that torchvision alone loads
    ckpt = detgraft.save_checkpoint(model, args.out / "checkpoint", builder="fasterrcnn_resnet50_fpn")
    meta = json.loads((ckpt / "detgraft.json").read_text())
    plain = torchvision.models.get_model(meta["builder"]["name"], **meta["builder"]["kwargs"])
    plain.load_state_dict(safetensors.torch.load_file(str(ckpt / "model.safetensors")))
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    log.info("checkpoint %s reloads with torchvision alone: %s", ckpt, "identical" if same else "DIFFERENT")
    assert same

    # 5. the picture, through the same command a user runs
    args.out.mkdir(parents=True, exist_ok=True)
    torchvision.io.write_png((image * 255).byte(), str(args.out / "picture.png"))
    detgraft_cli(
        ["predict", str(ckpt), str(args.out / "picture.png"), "--out", str(args.out / "predict"), "--score", "0.05"]
    )
    detgraft_cli(["inspect", str(ckpt)])


if __name__ == "__main__":
    main()
