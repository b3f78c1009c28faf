"""Scoring detectors on COCO-format data: what was kept, what was learned, what got confused.

Model labels are matched to the data's categories by name. Only categories that the data labels
(at least one box) are scored; a model class the data does not label is "not evaluated", never 0.
Groups: ``old`` (the base's classes), ``new`` (added by detgraft), ``all``; a group's AP is the mean
of its classes' APs, as COCOeval computes it over a set of category ids.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from ..data.dataset import Dataset, normalize_name
from ..data.images import load_image
from ..extras import need
from ..model.card import get_card
from ..progress import track

__all__ = ["Evaluation", "compare", "confusions", "detect", "drift", "evaluate", "label_to_category"]

log = logging.getLogger(__name__)

METRICS = ("ap", "ap50", "ap75", "ar")
EVALUATORS = ("pycocotools", "faster-coco-eval")


@dataclass
class ClassResult:
    label: int
    name: str
    group: str
    num_boxes: int
    ap: float
    ap50: float
    ap75: float
    ar: float


@dataclass
class Confusion:
    """Of ``total`` labelled ``new_class`` objects, ``count`` drew an ``old_class`` detection."""

    new_class: str
    old_class: str
    count: int
    total: int

    @property
    def share(self) -> float:
        return self.count / max(self.total, 1)


@dataclass
class Evaluation:
    classes: list[ClassResult]
    groups: dict[str, dict[str, float]]
    not_evaluated: list[str]
    confusions: list[Confusion] = field(default_factory=list)
    #: per new class: precision at recall 0, 0.01, ..., 1 (IoU 0.5)
    pr_curves: dict[str, list[float]] = field(default_factory=dict)
    #: mask AP and AP50 per group, when the model has masks (Mask R-CNN) and the data segmentations
    mask_groups: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for c, row in zip(self.confusions, data["confusions"]):
            row["share"] = round(c.share, 4)
        return data


@torch.no_grad()
def detect(model: nn.Module, data: Dataset, *, device: str = "cpu", batch: int = 8) -> dict[int, dict[str, Tensor]]:
    """The model's detections per image id (boxes, labels, scores on the CPU; a Mask R-CNN's masks
    as COCO run-length encodings under ``segmentation``, cut at 0.5 as torchvision's docs do)."""
    model.eval().to(device)
    images = data.coco["images"]
    out = {}
    for start in track(range(0, len(images), batch), description="detecting", transient=True):
        chunk = images[start : start + batch]
        pictures = [load_image(str(data.path(im))).to(device).float() / 255 for im in chunk]
        for im, d in zip(chunk, model(pictures)):
            masks = d.pop("masks", None)
            out[im["id"]] = {k: v.cpu() for k, v in d.items()}
            if masks is not None:
                out[im["id"]]["segmentation"] = _encode(masks[:, 0] >= 0.5)
    return out


def _encode(masks: Tensor) -> list[dict[str, Any]]:
    from pycocotools import mask as coco_mask

    rles = coco_mask.encode(np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8)))
    return [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in rles]


def label_to_category(model: nn.Module, data: Dataset) -> dict[int, int]:
    by_name = {normalize_name(c["name"]): c["id"] for c in data.coco["categories"]}
    return {
        label: by_name[normalize_name(name)]
        for label, name in enumerate(get_card(model).classes)
        if label > 0 and normalize_name(name) in by_name
    }


def _results(
    detections: dict[int, dict[str, Tensor]], mapping: dict[int, int], masks: bool = False
) -> list[dict[str, Any]]:
    results = []
    for image_id, d in detections.items():
        for k, (box, label, score) in enumerate(zip(d["boxes"].tolist(), d["labels"].tolist(), d["scores"].tolist())):
            if label in mapping:
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": mapping[label],
                        "score": score,
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    }
                    | ({"segmentation": d["segmentation"][k]} if masks else {})
                )
    return results


def coco_eval(
    gt: dict[str, Any],
    results: list[dict[str, Any]],
    category_ids: list[int],
    evaluator: str = "pycocotools",
    iou_type: str = "bbox",
) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval's ``precision`` [T, R, K, A, M] and ``recall`` [T, K, A, M] for ``category_ids``
    (``iou_type`` "bbox" or "segm"), column k for ``category_ids[k]`` (COCOeval itself sorts them)."""
    if evaluator == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    elif evaluator == "faster-coco-eval":
        faster = need("faster_coco_eval", "faster-coco-eval", "--evaluator faster-coco-eval")
        COCO, COCOeval = faster.COCO, faster.COCOeval_faster  # noqa: N806
    else:
        raise ValueError(f"evaluator must be one of {EVALUATORS}; got {evaluator!r}")
    with contextlib.redirect_stdout(io.StringIO()):
        ground = COCO()
        ground.dataset = scorable(gt)
        ground.createIndex()
        dets = ground.loadRes(results) if results else COCO()
        if not results:  # no detections at all: every class scores 0
            shape = (10, 101, len(category_ids), 4, 3)
            return np.zeros(shape), np.zeros((10, len(category_ids), 4, 3))
        ev = COCOeval(ground, dets, iou_type)
        ev.params.catIds = category_ids
        ev.evaluate()
        ev.accumulate()
    column = [list(ev.params.catIds).index(c) for c in category_ids]
    return np.asarray(ev.eval["precision"])[:, :, column], np.asarray(ev.eval["recall"])[:, column]


def scorable(coco: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``coco`` with what COCOeval reads and labelling tools often leave out filled in:
    ``area`` from the box (width x height; COCOeval uses it only to sort objects into size ranges,
    and every box is in the "all" range detgraft reports) and ``iscrowd`` 0. VOC and YOLO data, and
    COCO json exported without them, so score exactly as COCO json that has them."""
    gt = json.loads(json.dumps(coco))
    for a in gt["annotations"]:
        if "area" not in a:
            a["area"] = float(a["bbox"][2] * a["bbox"][3])
        a.setdefault("iscrowd", 0)
    return gt


def _mean(x: np.ndarray) -> float:
    x = x[x > -1]
    return float(x.mean()) if x.size else 0.0


def evaluate(
    model: nn.Module,
    data: Dataset,
    *,
    detections: dict[int, dict[str, Tensor]] | None = None,
    device: str = "cpu",
    evaluator: str = "pycocotools",
    score: float = 0.5,
) -> Evaluation:
    """COCO box AP, AP50, AP75 and AR@100 per class and per group, confusions and PR curves."""
    card = get_card(model)
    detections = detect(model, data, device=device) if detections is None else detections
    mapping = label_to_category(model, data)
    counts: dict[int, int] = {}
    for a in data.coco["annotations"]:
        counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
    scored = [(label, cat) for label, cat in mapping.items() if counts.get(cat)]
    not_evaluated = [
        n for label, n in enumerate(card.classes) if label > 0 and n != "N/A" and label not in dict(scored)
    ]
    unknown = sorted(
        {c["name"] for c in data.coco["categories"] if counts.get(c["id"]) and c["id"] not in set(mapping.values())}
    )
    if unknown:
        log.warning("the data labels classes the model does not have (not scored): %s", ", ".join(unknown))
    if not scored:
        raise ValueError("no class of the model is labelled in the data (classes are matched by name)")
    precision, recall = coco_eval(data.coco, _results(detections, mapping), [c for _, c in scored], evaluator)
    new = set(card.new_labels)
    classes = []
    for k, (label, cat) in enumerate(scored):
        p = precision[:, :, k, 0, -1]
        classes.append(
            ClassResult(
                label,
                card.classes[label],
                "new" if label in new else "old",
                counts[cat],
                _mean(p),
                _mean(p[0]),
                _mean(p[5]),
                _mean(recall[:, k, 0, -1]),
            )
        )
    groups = {}
    for group in ("old", "new", "all"):
        members = [c for c in classes if group == "all" or c.group == group]
        if members:
            groups[group] = {m: float(np.mean([getattr(c, m) for c in members])) for m in METRICS}
    pr = {c.name: [float(v) for v in precision[0, :, k, 0, -1]] for k, c in enumerate(classes) if c.group == "new"}
    mask_groups = {}
    has_masks = all("segmentation" in d for d in detections.values())
    if has_masks and any("segmentation" in a for a in data.coco["annotations"]):
        results = _results(detections, mapping, masks=True)
        mask_precision, _ = coco_eval(data.coco, results, [c for _, c in scored], evaluator, "segm")
        for group in groups:
            ks = [k for k, c in enumerate(classes) if group == "all" or c.group == group]
            mask_groups[group] = {
                "ap": float(np.mean([_mean(mask_precision[:, :, k, 0, -1]) for k in ks])),
                "ap50": float(np.mean([_mean(mask_precision[0, :, k, 0, -1]) for k in ks])),
            }
    return Evaluation(classes, groups, not_evaluated, confusions(model, data, detections, score=score), pr, mask_groups)


def confusions(
    model: nn.Module, data: Dataset, detections: dict[int, dict[str, Tensor]], *, score: float = 0.5, iou: float = 0.5
) -> list[Confusion]:
    """For each new class (or, for a model without new classes, each labelled class it lacks):
    how many of its labelled objects draw a detection of an old class (score >= ``score``,
    IoU >= ``iou``), per old class, most frequent first."""
    card = get_card(model)
    names = {c["id"]: c["name"] for c in data.coco["categories"]}
    known = {n.lower() for n in card.classes}
    new_names = {card.classes[label].lower() for label in card.new_labels}
    targets = {cid for cid, n in names.items() if n.lower() in new_names or n.lower() not in known}
    old = torch.tensor(card.old_labels)
    boxes: dict[int, list[tuple[int, list[float]]]] = {}
    for a in data.coco["annotations"]:
        if a["category_id"] in targets:
            x, y, w, h = a["bbox"]
            boxes.setdefault(a["image_id"], []).append((a["category_id"], [x, y, x + w, y + h]))
    hits: dict[tuple[int, int], int] = {}
    totals: dict[int, int] = {}
    for image_id, objects in boxes.items():
        d = detections.get(image_id)
        for cid, box in objects:
            totals[cid] = totals.get(cid, 0) + 1
            if d is None:
                continue
            keep = (d["scores"] >= score) & torch.isin(d["labels"], old)
            if not keep.any():
                continue
            overlaps = box_iou(torch.tensor([box]), d["boxes"][keep])[0] >= iou
            for label in set(d["labels"][keep][overlaps].tolist()):
                hits[(cid, label)] = hits.get((cid, label), 0) + 1
    rows = [Confusion(names[cid], card.classes[label], n, totals[cid]) for (cid, label), n in hits.items()]
    return sorted(rows, key=lambda c: (c.new_class, -c.count))


def compare(after: Evaluation, before: Evaluation) -> dict[str, Any]:
    """Per old class AP before and after, and forgetting = old-class AP after / before."""
    was = {c.name: c for c in before.classes}
    rows = [
        {"name": c.name, "before": was[c.name].ap, "after": c.ap, "change": c.ap - was[c.name].ap}
        for c in after.classes
        if c.group == "old" and c.name in was
    ]
    old_before = float(np.mean([r["before"] for r in rows])) if rows else 0.0
    old_after = float(np.mean([r["after"] for r in rows])) if rows else 0.0
    return {
        "old_classes": rows,
        "old_ap_before": old_before,
        "old_ap_after": old_after,
        "kept": old_after / old_before if old_before else float("nan"),
    }


@dataclass
class Drift:
    """How far the old classes moved, measured against the base's own confident detections.

    ``kept`` is the headline: on the EmojiCOCO strategies it orders models as labelled old-class AP
    does (every pair the labels settle; ``benchmarks/drift.py``); ``ap`` also rewards keeping the
    base's exact boxes, so it favours models that changed nothing but lost detections."""

    kept: float  # share of the base's confident detections the model still makes (score, IoU >= 0.5, same class)
    ap: float
    ap50: float
    reference: int  # number of reference detections


def drift(
    model: nn.Module,
    base: nn.Module,
    data: Dataset,
    *,
    score: float = 0.7,
    device: str = "cpu",
    detections: dict[int, dict[str, Tensor]] | None = None,
    base_detections: dict[int, dict[str, Tensor]] | None = None,
) -> Drift:
    """Scores ``model``'s old-class detections against ``base``'s detections with score >= ``score``
    on the same images: no labels needed."""
    old = get_card(base).old_labels
    base_detections = detect(base, data, device=device) if base_detections is None else base_detections
    detections = detect(model, data, device=device) if detections is None else detections
    annotations, matched = [], 0
    for image_id, d in base_detections.items():
        keep = d["scores"] >= score
        for box, label in zip(d["boxes"][keep].tolist(), d["labels"][keep].tolist()):
            if label in old:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": label,
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                        "area": (box[2] - box[0]) * (box[3] - box[1]),
                        "iscrowd": 0,
                    }
                )
    if not annotations:
        raise ValueError(f"the base makes no old-class detection with score >= {score} on these images")
    used = sorted({a["category_id"] for a in annotations})
    gt = {
        "images": [{"id": i} for i in base_detections],
        "annotations": annotations,
        "categories": [{"id": c, "name": str(c)} for c in used],
    }
    identity = {label: label for label in used}
    precision, _ = coco_eval(gt, _results(detections, identity), used)
    for a in annotations:
        d = detections.get(a["image_id"])
        x, y, w, h = a["bbox"]
        same = (d["labels"] == a["category_id"]) & (d["scores"] >= score)
        if same.any() and (box_iou(torch.tensor([[x, y, x + w, y + h]]), d["boxes"][same]) >= 0.5).any():
            matched += 1
    return Drift(
        matched / len(annotations), _mean(precision[:, :, :, 0, -1]), _mean(precision[0, :, :, 0, -1]), len(annotations)
    )
