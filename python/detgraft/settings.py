"""``ExtendSettings``: how ``detgraft extend`` trains, one field per flag of ``detgraft extend``,
and the automatic choices (``--steps auto``, ``--lr auto``) that depend on the data and the family."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .heads.rcnn import BRANCH_RANK
from .model.families import Family
from .model.surgery import INITS
from .strategies import STRATEGIES

__all__ = ["AMP", "EXISTING", "FROZEN_DTYPES", "ExtendSettings", "auto_lr", "auto_steps"]

AUTO_EPOCHS, AUTO_MIN_STEPS, AUTO_MAX_STEPS = 8, 150, 500
EXISTING = ("error", "train", "ignore")
AMP = ("auto", "bf16", "fp16", "off")
FROZEN_DTYPES = ("auto", "float32", "float16")


def _flag(help: str, **kw: Any) -> Any:
    return field(metadata={"help": help}, **kw)


@dataclass
class ExtendSettings:
    """How ``extend`` trains; each field is the ``detgraft extend`` flag of the same name."""

    strategy: str = _flag(f"one of {', '.join(STRATEGIES)}", default="branch")
    steps: int | None = _flag(
        f"optimizer steps; auto: {AUTO_EPOCHS} passes over the training images, at least {AUTO_MIN_STEPS}, "
        f"at most {AUTO_MAX_STEPS} (the cap chosen on val within the 5-minute budget: benchmarks/RESULTS.md, "
        "section sizes)",
        default=None,
    )
    batch_size: int = _flag("images per step", default=8)
    lr: float | None = _flag(
        "peak learning rate (SGD); auto: 0.05 for branch and head, 0.01 for naive, pseudo and distill (they train "
        "the whole network); 0.01 for branch on RetinaNet and FCOS",
        default=None,
    )
    momentum: float = _flag("SGD momentum", default=0.9)
    weight_decay: float = _flag("SGD weight decay", default=1e-4)
    warmup: int = _flag("steps of linear warm-up before the cosine decay", default=50)
    init: str = _flag(f"how the new rows start: one of {', '.join(INITS)}", default="preserve")
    keep: float = _flag("pseudo/distill: teacher score that makes a label", default=0.7)
    ignore: float = _flag("pseudo/distill: teacher score from which a box is left out of the loss", default=0.3)
    existing: str = _flag(
        "a training category the model already has: error (say so), train (its boxes are more data for that class; "
        "branch: they teach the branch what is not new) or ignore (leave them out)",
        default="error",
    )
    merge_iou: float | None = _flag(
        "branch: overlap at which the stronger of an old and a new detection wins (none: keep both)", default=0.5
    )
    branch_rank: int = _flag(
        "branch, Faster and Mask R-CNN: the branch trains a copy of the base's box head and keeps its change at "
        "this rank (the base's fc6 computed once for every branch; 0: the whole copy)",
        default=BRANCH_RANK,
    )
    hflip: bool = _flag("flip half the images left-right", default=True)
    jitter: bool = _flag(
        "also photometric distortion, zoom out and IoU crops (torchvision.transforms.v2, seeded per example)",
        default=False,
    )
    frozen_memory: float = _flag(
        "branch: GB of memory for what the frozen base computes for each training image (feature maps, proposals, "
        "the teacher's detections), computed once before training instead of in every step; images beyond it are "
        "computed in each step (0: every image in every step, as torchvision's loop does)",
        default=8.0,
    )
    frozen_dtype: str = _flag(
        "branch: the dtype those feature maps are kept in: auto (as computed when all of them fit in --frozen-memory, "
        "else float16), float32 (as computed) or float16",
        default="auto",
    )
    workers: int = _flag("processes decoding the next batches while the model trains (0: in the loop)", default=1)
    seed: int = _flag("seed of batches, flips and samplers", default=0)
    checkpoint_every: int = _flag("write OUT/last every this many steps", default=100)
    device: str = _flag("auto (cuda when there is one), cpu, cuda or cuda:N", default="auto")
    amp: str = _flag(
        "mixed precision of the training step: auto (on CUDA bf16 where the GPU supports it, else fp16 with a "
        "gradient scaler; off on the CPU), bf16, fp16 or off",
        default="auto",
    )

    def __post_init__(self) -> None:
        if self.device == "auto":  # resolved here, so settings.json records the device it ran on
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.amp not in AMP:
            raise ValueError(f"amp {self.amp!r} is unknown: choose one of {', '.join(AMP)}")
        if self.amp == "auto":  # resolved here too: settings.json records the precision it trained in
            cuda = torch.device(self.device).type == "cuda"
            self.amp = "off" if not cuda else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} is unknown: choose one of {', '.join(STRATEGIES)}")
        if self.existing not in EXISTING:
            raise ValueError(f"existing {self.existing!r} is unknown: choose one of {', '.join(EXISTING)}")
        if self.init not in INITS:
            raise ValueError(f"init {self.init!r} is unknown: choose one of {', '.join(INITS)}")
        if self.frozen_dtype not in FROZEN_DTYPES:
            raise ValueError(f"frozen_dtype {self.frozen_dtype!r} is unknown: choose one of {', '.join(FROZEN_DTYPES)}")
        if not self.frozen_memory >= 0:
            raise ValueError(f"frozen_memory must be 0 or more (GB); got {self.frozen_memory}")
        if self.branch_rank < 0:
            raise ValueError(f"branch_rank must be 0 or more; got {self.branch_rank}")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 or more; got {self.workers}")
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:  # None: auto_lr, once extend knows the model's family
            raise ValueError(f"lr must be positive; got {self.lr}")


def auto_lr(strategy: str, family: Family) -> float:
    """``--lr auto``: the strategy's rate for the model's family (``Family.lr``)."""
    return family.lr[strategy]


def auto_steps(images: int, batch_size: int) -> int:
    """The budget when ``steps`` is not given: it follows the data (a few images must not get the
    steps that hundreds need, or the branch learns them by heart)."""
    return min(AUTO_MAX_STEPS, max(AUTO_MIN_STEPS, math.ceil(AUTO_EPOCHS * images / batch_size)))
