"""Running a detector over image files: detections as JSON with class names, and annotated images."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..data.images import load_image
from ..model.card import get_card
from ..progress import track

__all__ = ["PALETTE", "Prediction", "predict_files"]

log = logging.getLogger(__name__)

PALETTE = [
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#46f0f0",
    "#f032e6",
    "#bcf60c",
    "#008080",
    "#9a6324",
    "#800000",
    "#808000",
    "#000075",
    "#ffe119",
]


@dataclass
class Prediction:
    """Detections of one image: ``boxes`` are [x1, y1, x2, y2] in pixels."""

    file: str
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


@torch.no_grad()
def predict_files(
    model: nn.Module, files: list[Path], out_dir: str | Path, *, score: float = 0.5, device: str = "cpu"
) -> tuple[list[Prediction], list[dict[str, str]]]:
    """Detects objects in ``files``; writes ``out_dir/detections.json`` and one annotated PNG per image.

    Files that cannot be read are logged, listed under ``skipped`` in the JSON and returned.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = get_card(model)
    model.eval().to(device)
    predictions, skipped = [], []
    for file in track(files, description="detecting", transient=True):
        try:
            image = load_image(str(file))
        except (RuntimeError, OSError, ValueError) as err:
            log.warning("skipped %s: cannot read it as an image (%s)", file, str(err).splitlines()[0])
            skipped.append({"file": str(file), "error": str(err).splitlines()[0]})
            continue
        out = model([image.to(device).float() / 255])[0]
        keep = out["scores"] >= score
        boxes, labels, scores = out["boxes"][keep].cpu(), out["labels"][keep].cpu(), out["scores"][keep].cpu()
        names = [card.classes[i] for i in labels.tolist()]
        predictions.append(Prediction(str(file), boxes.tolist(), labels.tolist(), names, scores.tolist()))
        colors = [PALETTE[i % len(PALETTE)] for i in labels.tolist()]
        drawn = image
        if "masks" in out and len(boxes):  # Mask R-CNN: [N, 1, H, W] probabilities, cut at 0.5 as torchvision's docs do
            masks = out["masks"][keep].cpu()[:, 0] >= 0.5
            drawn = draw_segmentation_masks(drawn, masks, alpha=0.45, colors=colors)
        drawn = (
            drawn
            if not len(boxes)
            else draw_bounding_boxes(
                drawn,
                boxes,
                labels=[f"{n} {s:.2f}" for n, s in zip(names, scores.tolist())],
                colors=colors,
                width=2,
                fill_labels=True,
                label_colors="white",
                label_background_colors=colors,
            )
        )
        write_png(drawn, str(out_dir / f"{file.stem}.png"))
    report = {
        "score_threshold": score,
        "classes": card.classes,
        "images": [vars(p) for p in predictions],
        "skipped": skipped,
    }
    (out_dir / "detections.json").write_text(json.dumps(report, indent=1))
    return predictions, skipped
