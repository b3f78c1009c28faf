"""What detgraft knows about a model beyond its tensors: class names, how to rebuild it, history.

The card travels on the model as ``model.detgraft_card`` and in checkpoints as ``detgraft.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from . import families

__all__ = ["ModelCard", "get_card", "coco_names"]

log = logging.getLogger(__name__)

BACKGROUND = "__background__"
UNUSED = "N/A"


def coco_names() -> list[str]:
    """The 91 labels of torchvision's COCO detectors ('__background__' at 0, 'N/A' for unused ids)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    return list(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])


@dataclass
class ModelCard:
    """Class names and provenance of a detector.

    Attributes:
        classes (list[str]): the name of each label; ``classes[0]`` is ``'__background__'``, so
            ``len(classes)`` is torchvision's ``num_classes``.
        builder (dict | None): how to rebuild the architecture (see ``detgraft.model.checkpoint``).
        source (str | None): where the base weights came from.
        history (list[dict]): one entry per extension: ``added`` names, their ``labels``, ``init``,
            ``data`` and ``date``.
    """

    classes: list[str]
    builder: dict[str, Any] | None = None
    source: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.classes or self.classes[0] != BACKGROUND:
            raise ValueError(f"classes must start with {BACKGROUND!r}; got {self.classes[:3]!r}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def step_of(self, label: int) -> int:
        """0 for a class of the base model, k for a class added by the k-th extension."""
        for step, entry in enumerate(self.history, start=1):
            if label in entry["labels"]:
                return step
        return 0

    @property
    def old_labels(self) -> list[int]:
        """Labels of the base model's real classes (no background, no 'N/A')."""
        return [i for i, n in enumerate(self.classes) if i > 0 and n != UNUSED and self.step_of(i) == 0]

    @property
    def new_labels(self) -> list[int]:
        """Labels added by extensions, in order."""
        return [label for entry in self.history for label in entry["labels"]]

    def to_json(self) -> dict[str, Any]:
        return {"classes": self.classes, "builder": self.builder, "source": self.source, "history": self.history}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelCard:
        return cls(
            classes=list(data["classes"]),
            builder=data.get("builder"),
            source=data.get("source"),
            history=list(data.get("history", [])),
        )


def get_card(model: nn.Module) -> ModelCard:
    """The model's card; a model detgraft has not seen gets one from its predictor's width.

    A 91-output predictor is taken to be in COCO's label space (torchvision's COCO detectors);
    other widths get names ``class_1`` ... ``class_{C-1}``.
    """
    card = getattr(model, "detgraft_card", None)
    if card is not None:
        return card
    num_classes = families.num_classes(model)
    if num_classes == 91:
        classes = coco_names()
        log.info("model has 91 outputs and no class names: assuming torchvision's COCO categories")
    else:
        classes = [BACKGROUND] + [f"class_{i}" for i in range(1, num_classes)]
    card = ModelCard(classes=classes)
    model.detgraft_card = card
    return card
