"""Arbitration between the base's detections and the branches': who owns an object both claim.

A branch trained on a few images is confidently wrong on old objects it never saw (it calls a
laptop "frog" at 0.99), and the base is confidently wrong on new objects (it calls a frog
"laptop" at 0.97). Scores alone cannot settle such a conflict, so the arbitration asks the one
judge that was not trained on the new images: the base's own box-head features. The base is
frozen, so what it does on the training images is what it does on any image: ``calibrate`` runs
it there and keeps, for the newest branch,

- ``new_memory``: the base features of the labelled new objects and of the base's false alarms on
  them (its detections scoring >= ``KEEPER_SCORE`` at IoU >= 0.5 with a labelled new object);
- ``old_memory``: the base features of the old objects, the detections of the model before the
  branch that score >= ``KEEPER_SCORE`` away from labelled new objects (IoU < 0.3);
- ``false_alarm_score``: the highest score of those false alarms (0 when the base made none);
- one prototype per new class (the mean L2-normalised feature of its labelled boxes) and alpha.

At inference (``arbitrate``), with f the base feature at a detection's box:

1. a new-class score s becomes ``alpha * s + (1 - alpha) * max(cos(f, P), 0)`` for P the prototype
   of its class (DeFRCN's prototype calibration), so the branch's score and the detection's
   resemblance to what the user labelled agree. alpha = n / (n + ``PRIOR_BOXES``) for n labelled
   boxes of the class (0.7 for 16 boxes, 0.99 for 500);
2. where an older detection (the base's, or an earlier branch's) and a confident newer one
   (calibrated score >= ``KEEPER_SCORE``) overlap with IoU >= ``iou``, the older one is lowered
   (its score times ``LOWERED``, 0.5) only if its box is nearer to ``new_memory`` than to
   ``old_memory`` (cosine; the nearest new object against the nearest old one, or, when the old
   memory is the larger, against its k-th nearest, k = ``OLD_RANK_SHARE`` x old / new: ``old_rank``)
   and it scores no higher than ``false_alarm_score``: it looks like the new objects and the base's
   false alarms on them more than like the old objects seen, and the base is no surer than it ever
   was about a false alarm. A newer detection that is not confident itself never lowers an older one;
3. otherwise a newer detection that scores lower than an overlapping older one is lowered the same way.

Lowered, not removed: a lowered detection falls below ``KEEPER_SCORE``, so it no longer counts as
a confident detection, but it keeps its rank among the detections of its class below that score.
Where the arbitration is wrong about a real old object, that object stays in the ranking above
the weak detections instead of at the bottom. The base's detections are otherwise untouched: no
other score, box or label changes. With few training images the old memory is thin (20 images
hold a few dozen old objects of 80 classes), so ``detgraft extend`` calibrates on each image and
its mirror image when it trained with flips and on fewer than ``MIRRORED_BELOW`` images
(``calibrate(..., mirrored=True)``), and reads images of the old classes when the user has some
(``calibrate(..., old_images=...)``, ``detgraft extend --old-images``: a few hundred COCO images for a
COCO model; no labels). A branch that was never calibrated falls back to the plain
soft merge (the stronger claim wins) and ``calibrate`` is logged as missing. How the rule was
chosen, on val: ``benchmarks/arbitration.py``.
"""

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

__all__ = [
    "ARBITRATION_STATE",
    "Arbitrated",
    "BranchState",
    "CLAIM_SCORE",
    "KEEPER_SCORE",
    "LOWERED",
    "ONE_STAGE_CLAIM_SCORE",
    "RETIRED_STATE",
    "add_arbitration_state",
    "arbitrate",
    "memory_lengths",
    "merge",
    "nearest",
    "old_rank",
    "resize_memories",
    "set_arbitration",
]

KEEPER_SCORE = 0.5  # a detection this confident is an old object (away from new ones) or a false alarm (on one)
# the loser of a contest keeps this share of its score: below KEEPER_SCORE (no longer a confident
# detection) but ranked as before among the detections of its class, so a real object the
# arbitration gets wrong loses little AP (chosen on val over score x (1 - the winner's score))
LOWERED = 0.5
CLAIM_SCORE = KEEPER_SCORE  # a newer detection lowers an older one only from this calibrated score (chosen on val)
# RetinaNet / FCOS branches (their scores and the classification tower's features): chosen on FCOS's
# val from 0.5 / 0.6 / 0.7 (benchmarks/RESULTS.md, section families)
ONE_STAGE_CLAIM_SCORE = 0.6
# an old memory k times the new one's size is read at its (OLD_RANK_SHARE * k)-th nearest neighbour
# (``old_rank``; chosen on val from 0.5 / 0.7 / 1 with old-class images: benchmarks/arbitration.py)
OLD_RANK_SHARE = 0.7
# each branch's buffers; new_memory and old_memory change length with the data (detgraft.heads.rcnn.branch_layout)
ARBITRATION_STATE = ("prototypes", "alpha", "new_memory", "old_memory", "false_alarm_score", "calibrated")
RETIRED_STATE = ("look_alike", "at_least")  # saved by detgraft 0.x before the memories: ignored, calibrate again


def add_arbitration_state(branch: nn.Module, num_new: int, like: Tensor, width: int | None = None) -> None:
    """The buffers ``calibrate`` fills, on ``branch`` (saved with its weights): one prototype of
    ``width`` features (default ``like``'s row length) per new class, alpha, the two memories
    (empty until calibrated) and the false-alarm score."""
    width = like.shape[1] if width is None else width
    branch.register_buffer("prototypes", like.new_zeros(num_new, width))
    branch.register_buffer("alpha", like.new_ones(num_new))
    branch.register_buffer("new_memory", like.new_zeros(0, width))
    branch.register_buffer("old_memory", like.new_zeros(0, width))
    branch.register_buffer("false_alarm_score", like.new_zeros(()))
    branch.register_buffer("calibrated", torch.tensor(False, device=like.device))


def memory_lengths(branch: nn.Module) -> list[int]:
    """The lengths of ``branch``'s memories, for a checkpoint's layout (``resize_memories``)."""
    return [len(branch.new_memory), len(branch.old_memory)]


def resize_memories(branch: nn.Module, lengths: list[int]) -> None:
    """Gives a rebuilt ``branch`` memories of the saved ``lengths`` (their values come with the weights)."""
    branch.new_memory = branch.new_memory.new_zeros(lengths[0], branch.new_memory.shape[1])
    branch.old_memory = branch.old_memory.new_zeros(lengths[1], branch.old_memory.shape[1])


def set_arbitration(
    branch: nn.Module,
    prototypes: Tensor,
    alpha: Tensor,
    new_memory: Tensor,
    old_memory: Tensor,
    false_alarm_score: float,
) -> None:
    with torch.no_grad():
        branch.prototypes.copy_(prototypes)
        branch.alpha.copy_(alpha)
        branch.new_memory = new_memory.to(branch.prototypes)
        branch.old_memory = old_memory.to(branch.prototypes)
        branch.false_alarm_score.fill_(false_alarm_score)
        branch.calibrated.fill_(True)


def nearest(features: Tensor, memory: Tensor, rank: int = 1) -> Tensor:
    """Each row's cosine to its nearest ``memory`` row, or with ``rank`` k its k-th nearest (-2 when
    the memory is empty)."""
    if len(memory) == 0:
        return torch.full_like(features[:, 0], -2.0)
    if rank == 1:
        return (features @ memory.T).amax(1)
    return (features @ memory.T).topk(min(rank, memory.shape[0]), dim=1).values[:, -1]


def old_rank(old: int, new: int, share: float = OLD_RANK_SHARE) -> int:
    """Which nearest neighbour in an old memory of ``old`` objects weighs as much as the nearest in a
    new memory of ``new``: the nearest of many objects is nearer than the nearest of few, so a
    contested detection is compared with the k-th nearest old object, k = ``share`` * old / new
    (rounded, at least 1). 1 whenever the old memory is the smaller one."""
    return max(1, int(share * old / max(new, 1) + 0.5))


class BranchState(NamedTuple):
    """What the merge reads of a branch: its first label and what ``calibrate`` learned. A plain
    tuple of tensors, so that TorchScript compiles the merge (``detgraft export``)."""

    first_label: int
    prototypes: Tensor
    alpha: Tensor
    new_memory: Tensor
    old_memory: Tensor
    false_alarm_score: Tensor


class Arbitrated:
    """Gives a branch module (``Branch``, ``DenseBranch``: each has ``first_label`` and the
    arbitration's buffers) its ``state()`` for the merge, in Python and in TorchScript."""

    @torch.jit.export
    def state(self) -> BranchState:
        return BranchState(
            self.first_label, self.prototypes, self.alpha, self.new_memory, self.old_memory, self.false_alarm_score
        )


def branch_state(branch) -> BranchState:
    """``branch``'s ``BranchState`` (a branch module, or anything with the same attributes)."""
    score = torch.as_tensor(branch.false_alarm_score)
    return BranchState(branch.first_label, branch.prototypes, branch.alpha, branch.new_memory, branch.old_memory, score)


def arbitrate(sources: list[tuple[Tensor, Tensor, Tensor]], branches, iou: float | None, features: Tensor | None):
    """Merges one image's detections of the base (``sources[0]``) and of each branch
    (``sources[1:]``, ``branches`` their modules or ``BranchState``s) into one list sorted by score
    (stable: the base's order is kept). ``features``: the base's normalised features at every box,
    in the order of the concatenated sources (None: plain soft merge)."""
    return merge(sources, [b if isinstance(b, BranchState) else branch_state(b) for b in branches], iou, features)


def merge(
    sources: list[tuple[Tensor, Tensor, Tensor]],
    branches: list[BranchState],
    iou: float | None,
    features: Tensor | None,
    claim: float = CLAIM_SCORE,
) -> tuple[Tensor, Tensor, Tensor]:
    """``arbitrate`` on the branches' states (a newer detection claims from the calibrated score
    ``claim``): the code that runs, in Python and in TorchScript."""
    boxes = torch.cat([s[0] for s in sources])
    scores = torch.cat([s[1] for s in sources])
    labels = torch.cat([s[2] for s in sources])
    source = torch.cat([torch.full_like(s[2], k) for k, s in enumerate(sources)])
    if iou is not None:
        if features is None:
            lowers = _stronger(boxes, scores, source, iou)
        else:
            scores, lowers = _calibrated(boxes, scores, labels, source, branches, iou, features, claim)
        scores = _lowered(scores, lowers)
    order = _by_score(scores)
    return boxes[order], scores[order], labels[order]


def _by_score(scores: Tensor) -> Tensor:
    """The order of ``scores``, highest first; equal scores keep their order."""
    if not torch.jit.is_scripting():
        if torch.onnx.is_in_onnx_export():
            return torch.topk(scores, scores.shape[0]).indices  # ONNX's TopK breaks ties by index
    return torch.sort(scores, descending=True, stable=True).indices


def _lowered(scores: Tensor, lowers: Tensor, share: float = LOWERED) -> Tensor:
    """``scores`` with each detection that some other one lowers (``lowers[i, j]``: j lowers i)
    times ``share``."""
    return torch.where(lowers.any(1), scores * share, scores)


def _overlap(boxes: Tensor, source: Tensor, iou: float) -> Tensor:
    """overlap[i, j]: i and j come from different sources and overlap with IoU >= ``iou``."""
    return (box_iou(boxes, boxes) >= iou) & (source[:, None] != source[None, :])


def _stronger(boxes: Tensor, scores: Tensor, source: Tensor, iou: float) -> Tensor:
    """lowers[i, j]: j, of another source, overlaps i and scores higher."""
    return _overlap(boxes, source, iou) & (scores[None, :] > scores[:, None])


def _calibrated(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    source: Tensor,
    branches: list[BranchState],
    iou: float,
    features: Tensor,
    claim: float = CLAIM_SCORE,
) -> tuple[Tensor, Tensor]:
    """Prototype-calibrated scores and lowers[i, j] as the module doc says."""
    # no Python branching on the data: the same code traces for ONNX (``detgraft export``)
    scores = scores.clone()
    for k, branch in enumerate(branches):
        mine = torch.nonzero(source == k + 1).flatten()
        index = labels[mine] - branch.first_label
        similarity = (features[mine] * branch.prototypes[index]).sum(1).clamp(min=0)
        alpha = branch.alpha[index]
        scores = scores.index_put((mine,), alpha * scores[mine] + (1 - alpha) * similarity)
    overlap = _overlap(boxes, source, iou)
    older = source[:, None] < source[None, :]  # i is older than j
    newer_wins = torch.zeros_like(overlap)
    for k, branch in enumerate(branches):
        # [i, j]: j of branch k claims i's object, and is confident
        claims = overlap & older & (source == k + 1)[None, :] & (scores >= claim)[None, :]
        contested = torch.nonzero(claims.any(1)).flatten()
        f = features[contested]
        rank = old_rank(branch.old_memory.shape[0], branch.new_memory.shape[0])
        looks_new = (nearest(f, branch.new_memory) > nearest(f, branch.old_memory, rank)) & (
            scores[contested] <= branch.false_alarm_score
        )
        false_alarm = torch.zeros_like(claims[:, 0]).index_put((contested,), looks_new)
        newer_wins = newer_wins | (claims & false_alarm[:, None])
    stronger = scores[None, :] > scores[:, None]
    older_wins = overlap & ~older & stronger & ~newer_wins.T
    return scores, newer_wins | older_wins
