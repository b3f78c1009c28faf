"""The ``branch`` strategy: the base stays frozen and bit-identical; each extension adds a branch.

A branch is a box head and a predictor of its own (background + that extension's classes) that
reads the base's RoI features of the base's proposals, plus an ``others`` output that learns
from the model's own detections what is not new. At inference the base's old-class detections
are computed exactly as the base computes them (the same layers, the same weights, the same
shapes), each branch detects its classes, and ``detgraft.heads.merge`` merges the lists: where
an old and a new detection overlap with IoU >= ``merge_iou``, it decides by the branch's
calibrated score and by what the base's own features say the box looks like. That merge is the
only way an old-class detection can change, so "zero forgetting" means exactly: every old-class
box and label of the base is kept bit for bit, and its score too unless the arbitration gives
the object to a new class; with ``merge_iou=None`` the base's detections are all kept bit for bit.

The model stays a torchvision ``FasterRCNN``: its ``roi_heads`` becomes a ``BranchRoIHeads``
(a subclass of torchvision's ``RoIHeads``) in place, so ``model(images, targets)`` returns
torchvision's loss dict (the newest branch's ``loss_classifier`` / ``loss_box_reg``) and eval
mode returns torchvision's list of ``{boxes, labels, scores}``.
"""

import copy
import logging
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_loss

from .frozen import Kept, batched, frozen_batches, replay_transform_draws
from .merge import KEEPER_SCORE, Arbitrated, BranchState, add_arbitration_state, memory_lengths, merge, resize_memories
from .teacher import add_teacher_boxes

__all__ = [
    "BRANCH_RANK",
    "Branch",
    "BranchRoIHeads",
    "LowRankHead",
    "add_branch",
    "attach_branch",
    "branch_layout",
    "branches",
    "calibration_pass",
    "compress_branch",
    "frozen_pass",
    "kept_losses",
    "restore_branches",
]

log = logging.getLogger(__name__)

# a branch's box head after training: its change from the base's, truncated to this rank (chosen on
# val: benchmarks/RESULTS.md, section branch_rank)
BRANCH_RANK = 64
# what a LowRankHead reads of the base's box head: its input flattened, fc6's pre-activation, fc7's
# weight and bias (empty tensors but the first where the base's head is not a TwoMLPHead)
Shared = tuple[Tensor, Tensor, Tensor, Tensor]

MASK_ROIS = 8  # a branch's mask loss: at most this many positives per batch (16: +27 s, new mask AP +0.007)


class LowRankHead(nn.Module):
    """A branch's box head as a change of the base's ``TwoMLPHead``: the base's ``fc6``
    pre-activation (computed once per proposal, shared with the base and every branch) plus
    ``x·A·B`` of rank ``rank``, then the base's ``fc7`` on that plus ``h·C·D`` of rank ``rank // 2``
    (fc7's change is of lower rank: on EmojiCOCO its top 32 directions hold 96% of it, fc6's 89%).
    ``from_copy`` makes one from a trained copy of the base's head (``compress_branch``)."""

    def __init__(self, in_features: int, representation: int, rank: int) -> None:
        super().__init__()
        rank6, rank7 = min(rank, in_features, representation), min(max(1, rank // 2), representation)
        self.down6 = nn.Linear(in_features, rank6, bias=False)
        self.up6 = nn.Linear(rank6, representation)
        self.down7 = nn.Linear(representation, rank7, bias=False)
        self.up7 = nn.Linear(rank7, representation)

    @property
    def rank(self) -> int:
        return self.down6.out_features

    @classmethod
    def shaped_for(cls, base: TwoMLPHead, rank: int) -> "LowRankHead":
        """A head of ``rank`` for ``base``'s shapes, on its device and dtype (weights to be set)."""
        return cls(base.fc6.in_features, base.fc6.out_features, rank).to(base.fc6.weight)

    @classmethod
    @torch.no_grad()
    def from_copy(cls, base: TwoMLPHead, trained: TwoMLPHead, rank: int) -> "LowRankHead":
        """The rank-``rank`` head closest to ``trained`` (a trained copy of ``base``): each layer's
        change from the base truncated to its top singular directions (Eckart-Young), the biases'
        change whole."""
        head = cls.shaped_for(base, rank)
        for name, down, up in (("fc6", head.down6, head.up6), ("fc7", head.down7, head.up7)):
            old, new = getattr(base, name), getattr(trained, name)
            u, s, vh = torch.linalg.svd((new.weight - old.weight).double(), full_matrices=False)
            r = down.out_features
            down.weight.copy_(vh[:r])
            up.weight.copy_(u[:, :r] * s[:r])
            up.bias.copy_(new.bias - old.bias)
        return head

    def forward(self, flat: Tensor, pre6: Tensor, fc7_weight: Tensor, fc7_bias: Tensor) -> Tensor:
        h = F.relu(pre6 + self.up6(self.down6(flat)))
        return F.relu(F.linear(h, fc7_weight, fc7_bias) + self.up7(self.down7(h)))


class Branch(Arbitrated, nn.Module):
    """A box head and a predictor for the ``num_new`` labels ``first_label`` .. ``first_label +
    num_new - 1``; ``num_classes`` = ``num_new + 1`` counts the branch's background, as torchvision's
    does. With ``others``, the
    predictor has one more output after them: "an object the model knew before", learned from the
    teacher's detections (see ``BranchRoIHeads``). In a Mask R-CNN, a mask predictor of its own
    classes reads the base's (frozen) mask head."""

    def __init__(
        self,
        box_head: nn.Module,
        box_predictor: FastRCNNPredictor,
        first_label: int,
        others: bool = False,
        mask_predictor: nn.Module | None = None,
        rank: int = 0,
    ) -> None:
        super().__init__()
        self.box_head = box_head
        self.rank = rank  # > 0: calibrate compresses the trained box head to this rank (compress_branch)
        self.box_predictor = box_predictor
        self.first_label = first_label
        self.others = others
        self.mask_predictor = mask_predictor  # Mask R-CNN: background + the branch's classes, on the base's mask head
        # the predictor's outputs: background, the branch's classes, and with ``others`` one more
        self.num_new = box_predictor.cls_score.out_features - 1 - (1 if others else 0)
        # the arbitration's state (detgraft.strategies.calibrate): saved with the weights
        add_arbitration_state(self, self.num_new, box_predictor.cls_score.weight)

    @property
    def num_classes(self) -> int:
        """The branch's classes and its background (torchvision's ``num_classes``); the ``others``
        output, when there is one, is the next."""
        return self.num_new + 1

    def owns(self, labels: Tensor) -> Tensor:
        return (labels >= self.first_label) & (labels < self.first_label + self.num_new)

    def features(self, pooled: Tensor, shared: Shared) -> Tensor:
        """The branch's box head on the RoI features ``pooled`` (a ``LowRankHead`` reads what
        the base computed of them, ``shared``)."""
        if hasattr(self.box_head, "down6"):  # TorchScript resolves it per branch
            return self.box_head(shared[0], shared[1], shared[2], shared[3])
        return self.box_head(pooled)

    def forward(self, pooled: Tensor, shared: Shared) -> tuple[Tensor, Tensor]:
        """Class logits and box regression over background and the branch's classes: the
        ``others`` output joins the background (log-sum-exp of the two logits), so each class's
        probability is what the full softmax gives it."""
        logits, regression = self.box_predictor(self.features(pooled, shared))
        if not self.others:
            return logits, regression
        background = torch.logsumexp(torch.stack([logits[:, 0], logits[:, -1]], dim=1), dim=1, keepdim=True)
        return torch.cat([background, logits[:, 1:-1]], dim=1), regression[:, :-4]


class BranchRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` (the base's, untouched) plus ``branches`` (an ``nn.ModuleList``).

    Also set by ``add_branch``: ``old_num_classes`` (the base predictor's outputs, background
    included: the first branch's first label),
    ``merge_iou`` (float or None), ``keep`` and ``ignore`` (teacher scores of the branches'
    ``others`` output: a label from keep, left out of the loss from ignore) and
    ``teacher_proposals`` (the teacher reads the top proposals, as many as the base reads at
    inference). The inference path is TorchScript (``detgraft export``); training is Python only.
    """

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            # (TorchScript's stub of an unused method takes every argument, defaults included)
            return self._training_forward(features, proposals, image_shapes, targets, None)
        pooled = self.box_roi_pool(features, proposals, image_shapes)
        per_source = self._per_source(pooled, proposals, image_shapes, len(self.branches))
        states: list[BranchState] = []
        calibrated = True
        for branch in self.branches:
            states.append(branch.state())
            calibrated = calibrated and bool(branch.calibrated)
        merge_iou = self.merge_iou
        features_at: list[Tensor | None] = [None for _ in proposals]
        if merge_iou is not None and calibrated:
            merged = [torch.cat([s[0][i] for s in per_source]) for i in range(len(proposals))]
            at = self.base_features(features, merged, image_shapes).split([m.shape[0] for m in merged])
            features_at = []
            for f in at:
                features_at.append(f)
        elif merge_iou is not None and not torch.jit.is_scripting():
            self._warn_uncalibrated()
        result: list[dict[str, Tensor]] = []
        for i in range(len(proposals)):
            sources = [(s[0][i], s[1][i], s[2][i]) for s in per_source]
            boxes, scores, labels = merge(sources, states, merge_iou, features_at[i])
            n = self.detections_per_img
            result.append({"boxes": boxes[:n], "labels": labels[:n], "scores": scores[:n]})  # torchvision's order
        if self.has_mask():
            self._add_masks(features, result, image_shapes)
        losses: dict[str, Tensor] = {}
        return result, losses

    def base_features(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """The base box head's L2-normalised features at ``boxes`` (one list entry per image): what
        the arbitration judges a box by."""
        pooled = self.box_roi_pool(features, boxes, image_shapes)
        return F.normalize(self.box_head(pooled).flatten(start_dim=1), dim=1)

    @torch.jit.unused
    def _warn_uncalibrated(self) -> None:
        if not getattr(self, "_warned", False):
            log.warning("a branch was not calibrated: merging by score alone (call detgraft.calibrate after training)")
            self._warned = True

    @torch.jit.unused
    def _training_forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None,
        taught: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """The newest branch's losses (torchvision's ``loss_classifier`` / ``loss_box_reg``, and
        ``loss_mask`` in a Mask R-CNN), its ``others`` output taught by the model before it (its
        detections ``taught``, computed here when not given)."""
        if targets is None:
            raise ValueError("training a branch needs targets")
        branch = self.branches[-1]
        targets = [_branch_targets(t, branch) for t in targets]
        if self.has_mask():  # torchvision's checks want masks; boxes without one have none (detgraft.heads.masks)
            targets = [t if "masks" in t else {**t, "masks": t["boxes"].new_zeros(0, 1, 1)} for t in targets]
        if branch.others:
            if taught is None:
                taught = self._teacher(features, proposals, image_shapes)
            others = branch.num_classes
            targets = [add_teacher_boxes(t, d, self.keep, self.ignore, others) for t, d in zip(targets, taught)]
        proposals, matched, labels, regression_targets = self.select_training_samples(proposals, targets)
        pooled = self.box_roi_pool(features, proposals, image_shapes)
        if isinstance(branch.box_head, LowRankHead):  # trained again after calibrate compressed it
            with torch.no_grad():
                shared = self.shared_features(pooled)
            x = branch.features(pooled, shared)
        else:  # the copy that trains (the base's fc6 is not needed: no work for it in the step)
            x = branch.box_head(pooled)
        class_logits, box_regression = branch.box_predictor(x)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        if branch.mask_predictor is not None:
            losses["loss_mask"] = self._branch_mask_loss(features, proposals, matched, labels, targets, image_shapes)
        return [], losses

    @torch.no_grad()
    def _teacher(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """The teacher of the newest branch's ``others`` output on the training proposals: the
        RPN sorts them by objectness, so the top ones are those the base sees at inference."""
        top = [p[: self.teacher_proposals] for p in proposals]
        return self._teacher_detections(features, top, image_shapes, self.branches[-1], self.ignore)

    def _branch_mask_loss(self, features, proposals, matched, labels, targets, image_shapes) -> Tensor:
        """torchvision's mask loss of the newest branch's mask predictor on the base's mask head
        features, over the sampled positives of the branch's classes matched to a box with a mask
        (box ``k`` has one when ``k < len(masks)``, see ``detgraft.heads.masks``), at most
        ``MASK_ROIS`` per batch (the first ones the sampler drew); 0 without any."""
        branch = self.branches[-1]
        boxes, chosen, left = [], [], MASK_ROIS
        for k, (p, m, label, t) in enumerate(zip(proposals, matched, labels, targets)):
            has = len(t["masks"]) if "masks" in t else 0
            pos = torch.where((label > 0) & (label < branch.num_classes) & (m < has))[0][:left]
            left -= len(pos)
            boxes.append(p[pos])
            if len(pos):
                chosen.append((k, m[pos]))
        if not chosen:
            return sum(p.sum() for p in branch.mask_predictor.parameters()) * 0.0
        with torch.no_grad():
            x = self.mask_head(self.mask_roi_pool(features, boxes, image_shapes))
        return maskrcnn_loss(
            branch.mask_predictor(x),
            [boxes[k] for k, _ in chosen],
            [targets[k]["masks"] for k, _ in chosen],
            [targets[k]["labels"] for k, _ in chosen],
            [m for _, m in chosen],
        )

    def _add_masks(
        self, features: dict[str, Tensor], result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]]
    ) -> None:
        """A Mask R-CNN's masks for the merged detections, as torchvision infers them: the base's
        mask head on all of them (one pass, as the base runs it on its own detections), an old
        class's detection reading its channel of the base's mask predictor, a new class's its
        branch's (0 where its branch has none). Selected elementwise, so an image where one source
        detects nothing traces like any other (ONNX). (TorchScript: the ``is not None`` tests tell
        it which modules a Mask R-CNN has.)"""
        if self.mask_roi_pool is None or self.mask_head is None or self.mask_predictor is None:
            return
        x = self.mask_head(self.mask_roi_pool(features, [r["boxes"] for r in result], image_shapes))
        labels = torch.cat([r["labels"] for r in result])
        index = torch.arange(labels.shape[0], device=labels.device)
        old = (labels < self.old_num_classes)[:, None, None]
        logits = self.mask_predictor(x)[index, labels.clamp(max=self.old_num_classes - 1)]
        probs = torch.where(old, logits.sigmoid(), torch.zeros_like(logits))
        for branch in self.branches:
            predictor = branch.mask_predictor
            if predictor is not None:
                first = branch.first_label
                own = ((labels >= first) & (labels < first + branch.num_new))[:, None, None]
                theirs = predictor(x)[index, (labels - first + 1).clamp(0, branch.num_new)]
                probs = torch.where(own, theirs.sigmoid(), probs)
        for r, masks in zip(result, probs[:, None].split([r["labels"].shape[0] for r in result])):
            r["masks"] = masks

    def shared_features(self, pooled: Tensor) -> Shared:
        """What a ``LowRankHead`` reads of the base's ``TwoMLPHead`` on ``pooled`` (``Shared``)."""
        head = self.box_head
        if hasattr(head, "fc6") and hasattr(head, "fc7"):  # TorchScript resolves it
            flat = pooled.flatten(start_dim=1)
            return flat, head.fc6(flat), head.fc7.weight, head.fc7.bias
        empty = pooled.new_zeros(0)
        return pooled, empty, empty, empty

    def _base_head(self, pooled: Tensor) -> tuple[Tensor, Shared]:
        """The base's box head on ``pooled``, and what low-rank branches read of it. With one,
        the base's ``TwoMLPHead`` runs as its own forward does (flatten, fc6, relu, fc7, relu:
        the same ops, so the same bits), keeping fc6's pre-activation."""
        if self.shares_box_head:
            shared = self.shared_features(pooled)
            head = self.box_head
            if hasattr(head, "fc7"):
                return F.relu(head.fc7(F.relu(shared[1]))), shared
        empty = pooled.new_zeros(0)
        return self.box_head(pooled).flatten(start_dim=1), (pooled, empty, empty, empty)

    def _base_detections(
        self, x: Tensor, proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """The base's detections from its box head's output ``x``, computed as the base computes
        them: its predictor's first ``old_num_classes`` rows are a Linear of the base's own shape."""
        predictor, width = self.box_predictor, self.old_num_classes
        logits = F.linear(x, predictor.cls_score.weight[:width], predictor.cls_score.bias[:width])
        regression = F.linear(x, predictor.bbox_pred.weight[: 4 * width], predictor.bbox_pred.bias[: 4 * width])
        return self.postprocess_detections(logits, regression, proposals, image_shapes)

    def _per_source(
        self, pooled: Tensor, proposals: list[Tensor], image_shapes: list[tuple[int, int]], branches: int
    ) -> list[tuple[list[Tensor], list[Tensor], list[Tensor]]]:
        """(boxes, scores, labels), each a list over images, of the base and of the first
        ``branches`` branches."""
        x, shared = self._base_head(pooled)
        sources = [self._base_detections(x, proposals, image_shapes)]
        for k, branch in enumerate(self.branches):
            if k < branches:
                logits, regression = branch(pooled, shared)
                boxes, scores, labels = self.postprocess_detections(logits, regression, proposals, image_shapes)
                sources.append((boxes, scores, [label + branch.first_label - 1 for label in labels]))
        return sources

    def _teacher_detections(
        self, features, proposals, image_shapes, branch: Branch, score: float
    ) -> list[dict[str, Tensor]]:
        """What the model detected before ``branch`` was added (the base and the earlier
        branches, unmerged) on ``proposals``, scoring above ``score``: the ``teacher`` of its
        ``others`` output. Postprocessed at that score, not the usual 0.05: the same detections
        above it, without the per-class NMS over thousands of boxes that nobody uses."""
        pooled = self.box_roi_pool(features, proposals, image_shapes)
        usual, self.score_thresh = self.score_thresh, score
        try:
            earlier = list(self.branches).index(branch)
            sources = self._per_source(pooled, proposals, image_shapes, earlier)
        finally:
            self.score_thresh = usual
        return [
            {k: torch.cat([s[j][i] for s in sources]) for j, k in enumerate(("boxes", "scores", "labels"))}
            for i in range(len(proposals))
        ]


def add_branch(
    model: nn.Module,
    labels: list[int],
    merge_iou: float | None = 0.5,
    others: bool = True,
    keep: float = 0.7,
    ignore: float = 0.3,
    rank: int = 0,
) -> Branch:
    """Adds a branch for ``labels`` (consecutive, after everything the model has) to ``model``'s
    RoI heads, in place. Its box head starts as a copy of the base's; its predictor's rows start
    as the widened predictor's rows for the background and ``labels`` (set by ``expand_predictor``'s
    init). With ``others``, one more output learns "an object the model already knew" from the
    model's own detections on the training images (score >= ``keep`` a label; between ``ignore``
    and ``keep`` left out of the loss), on the proposals the model reads at inference; it starts
    as the mean of the old classes' rows. Everything but the new branch is frozen. ``rank`` > 0:
    after training, ``calibrate`` replaces the trained copy by a ``LowRankHead`` of that rank
    (``compress_branch``; only on a ``TwoMLPHead``, others keep the copy)."""
    if not labels or list(labels) != list(range(labels[0], labels[0] + len(labels))):
        raise ValueError(f"a branch takes consecutive labels; got {labels}")
    if not 0 <= ignore <= keep <= 1:
        raise ValueError(f"need 0 <= ignore <= keep <= 1; got ignore={ignore}, keep={keep}")
    heads = model.roi_heads
    predictor = heads.box_predictor
    if predictor.cls_score.out_features < labels[-1] + 1:
        raise ValueError(
            f"labels {labels} are beyond the predictor's {predictor.cls_score.out_features} outputs: "
            "call detgraft.expand_predictor first"
        )
    if not isinstance(heads, BranchRoIHeads):
        heads.__class__ = BranchRoIHeads
        heads.branches = nn.ModuleList()
        heads.old_num_classes = labels[0]
        heads.merge_iou = merge_iou
        heads.shares_box_head = False
    heads.keep, heads.ignore = keep, ignore
    heads.teacher_proposals = model.rpn._post_nms_top_n["testing"]
    rows = [0, *labels]
    new = FastRCNNPredictor(predictor.cls_score.in_features, len(rows) + others).to(predictor.cls_score.weight)
    blocks = torch.tensor([4 * r + k for r in rows for k in range(4)], device=predictor.bbox_pred.weight.device)
    with torch.no_grad():
        cls_weight, cls_bias = predictor.cls_score.weight, predictor.cls_score.bias
        box_weight, box_bias = predictor.bbox_pred.weight, predictor.bbox_pred.bias
        new.cls_score.weight[: len(rows)] = cls_weight[rows]
        new.cls_score.bias[: len(rows)] = cls_bias[rows]
        new.bbox_pred.weight[: 4 * len(rows)] = box_weight[blocks]
        new.bbox_pred.bias[: 4 * len(rows)] = box_bias[blocks]
        if others:  # a typical old class: the mean of the rows before this branch's labels
            new.cls_score.weight[-1] = cls_weight[1 : labels[0]].mean(0)
            new.cls_score.bias[-1] = cls_bias[1 : labels[0]].mean(0)
            new.bbox_pred.weight[-4:] = box_weight[4 : 4 * labels[0]].view(-1, 4, box_weight.shape[1]).mean(0)
            new.bbox_pred.bias[-4:] = box_bias[4 : 4 * labels[0]].view(-1, 4).mean(0)
    mask_predictor = None
    if heads.has_mask():  # background and ``labels``' channels of the widened mask predictor
        mask_predictor = copy.deepcopy(heads.mask_predictor)
        logits = mask_predictor.mask_fcn_logits
        rows = torch.tensor(rows, device=logits.weight.device)
        logits.weight = nn.Parameter(logits.weight.detach()[rows].clone())
        logits.bias = nn.Parameter(logits.bias.detach()[rows].clone())
        logits.out_channels = len(rows)
    if rank > 0 and type(heads.box_head) is not TwoMLPHead:
        kind = type(heads.box_head).__name__
        log.info("the box head is a %s, not a TwoMLPHead: the branch keeps its copy whole", kind)
        rank = 0
    branch = Branch(copy.deepcopy(heads.box_head), new, labels[0], others, mask_predictor, rank)
    return attach_branch(model, heads.branches, branch)


def compress_branch(model: nn.Module) -> None:
    """Replaces each branch's trained copy of the base's box head by the ``LowRankHead`` of the
    branch's ``rank`` closest to it (no-op for a branch of rank 0 or already compressed). On
    torchvision's ResNet-50 FPN at rank 64 a branch has 0.956M parameters where the copy had 13.92M,
    and the base's fc6 pre-activation is computed once for every branch (``benchmarks/steps.py``)."""
    heads = model.roi_heads
    for branch in heads.branches:
        if branch.rank > 0 and not isinstance(branch.box_head, LowRankHead):
            before = sum(p.numel() for p in branch.box_head.parameters())
            branch.box_head = LowRankHead.from_copy(heads.box_head, branch.box_head, branch.rank)
            after = sum(p.numel() for p in branch.box_head.parameters())
            log.info("branch box head compressed to rank %d: %d parameters (%d before)", branch.rank, after, before)
            heads.shares_box_head = True


def attach_branch(model: nn.Module, branches: nn.ModuleList, branch: nn.Module) -> nn.Module:
    """Appends ``branch`` to ``branches``; every parameter of ``model`` but the new branch's is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    branches.append(branch)
    for p in branch.parameters():
        p.requires_grad_(True)
    return branch


def branches(model: nn.Module) -> nn.ModuleList | None:
    """The model's R-CNN branches (None before the first)."""
    heads = getattr(model, "roi_heads", None)
    return heads.branches if isinstance(heads, BranchRoIHeads) else None


def branch_layout(model: nn.Module) -> dict | None:
    """What ``restore_branches`` needs to rebuild the branches before loading their weights."""
    if branches(model) is None:
        return None
    heads = model.roi_heads
    return {
        "old_num_classes": heads.old_num_classes,
        "merge_iou": heads.merge_iou,
        "branches": [
            {
                "first_label": b.first_label,
                "num_new": b.num_new,
                "others": b.others,
                "memory": memory_lengths(b),
                "rank": b.rank,
                "compressed": isinstance(b.box_head, LowRankHead),
            }
            for b in heads.branches
        ],
    }


def restore_branches(model: nn.Module, layout: dict) -> None:
    """Rebuilds the branches ``branch_layout`` described (weights follow with load_state_dict).
    Reads the layout of detgraft 0.1 checkpoints too (``base_width``; ``num_classes`` with the background)."""
    for b in layout["branches"]:
        num_new = b["num_new"] if "num_new" in b else b["num_classes"] - 1
        labels = list(range(b["first_label"], b["first_label"] + num_new))
        branch = add_branch(model, labels, layout["merge_iou"], others=b.get("others", False), rank=b.get("rank", 0))
        if b.get("compressed"):
            branch.box_head = LowRankHead.shaped_for(model.roi_heads.box_head, branch.rank)
            model.roi_heads.shares_box_head = True
        resize_memories(branch, b.get("memory", [0, 0]))
    model.roi_heads.old_num_classes = layout.get("old_num_classes", layout.get("base_width"))


def calibration_pass(
    model: nn.Module, image_list: ImageList, branch: Branch, features: OrderedDict[str, Tensor] | None = None
):
    """What ``detgraft.calibrate`` reads of an R-CNN on transformed images: the model's detections
    before ``branch`` scoring >= ``KEEPER_SCORE``, and a function giving the base features at boxes.
    ``features``: the backbone's feature maps of those images when they were kept (``frozen_pass``)."""
    heads = model.roi_heads
    if features is None:
        features = model.backbone(image_list.tensors)
    if isinstance(features, Tensor):  # as GeneralizedRCNN does for a single-map backbone
        features = OrderedDict([("0", features)])
    proposals, _ = model.rpn(image_list, features)
    before = heads._teacher_detections(features, proposals, image_list.image_sizes, branch, KEEPER_SCORE)
    return before, lambda boxes: heads.base_features(features, boxes, image_list.image_sizes)


@torch.no_grad()
def frozen_pass(model: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]]) -> list[Kept]:
    """What a training step of the newest branch computes with the frozen base, for each example
    (``image`` and ``target`` as the training loop gives them), computed as the step computes it
    (``frozen_batches``): the transform (training mode), the backbone's feature maps, the RPN's
    training proposals, how many anchors its sampler drew from, and the teacher's detections. Call
    it with the model in training mode, its BatchNorm layers in eval mode (as the ``branch``
    strategy keeps them)."""
    return frozen_batches(model, images, targets, _frozen_batch)


def _frozen_batch(model: nn.Module, image_list: ImageList, targets: list[dict[str, Tensor]]) -> list[Kept]:
    heads, rpn = model.roi_heads, model.rpn
    features = model.backbone(image_list.tensors)
    if isinstance(features, Tensor):  # as GeneralizedRCNN does for a single-map backbone
        features = OrderedDict([("0", features)])
    counting = _CountingSampler(rpn.fg_bg_sampler)
    rpn.fg_bg_sampler = counting
    try:
        proposals, _ = rpn(image_list, features, targets)
    finally:
        rpn.fg_bg_sampler = counting.sampler
    taught = heads._teacher(features, proposals, image_list.image_sizes) if heads.branches[-1].others else None
    return [
        Kept(
            OrderedDict((name, maps[i]) for name, maps in features.items()),
            image_list.image_sizes[i],
            targets[i],
            {"proposals": proposals[i], "sampled": counting.counts[i], "taught": taught[i] if taught else None},
            next(iter(features.values())).dtype,
        )
        for i in range(len(targets))
    ]


def kept_losses(model: nn.Module, kept: list[Kept]) -> dict[str, Tensor]:
    """The losses of a training step (``model(images, targets)`` in training mode) on examples
    whose frozen part ``frozen_pass`` computed: the step's random draws before the RoI heads are
    replayed (the transform's size choice per image, the RPN sampler's permutations), so the RoI
    sampler draws what it draws in the step; then the RoI heads run on the kept feature maps,
    proposals and teacher detections."""
    _replay_draws(model, kept)
    taught = [k.extra["taught"] for k in kept]
    _, losses = model.roi_heads._training_forward(
        batched(kept),
        [k.extra["proposals"] for k in kept],
        [k.image_size for k in kept],
        [k.target for k in kept],
        taught=None if taught[0] is None else taught,
    )
    return losses


def _replay_draws(model: nn.Module, kept: list[Kept]) -> None:
    """The random draws of a training step before its RoI heads, made again: the same calls on
    inputs of the same sizes."""
    replay_transform_draws(model.transform, len(kept))
    device = kept[0].extra["proposals"].device
    # the RPN's sampler draws a permutation of each image's positive and of its negative anchors
    model.rpn.fg_bg_sampler(
        [
            torch.cat([torch.ones(p, device=device), torch.zeros(n, device=device)])
            for p, n in (k.extra["sampled"] for k in kept)
        ]
    )


class _CountingSampler:
    """The RPN's ``fg_bg_sampler``, counting the positive and negative anchors of each image it
    draws from (a permutation of each: what ``kept_losses`` replays)."""

    def __init__(self, sampler) -> None:
        self.sampler, self.counts = sampler, []

    def __call__(self, matched: list[Tensor]):
        self.counts += [(int((m >= 1).sum()), int((m == 0).sum())) for m in matched]
        return self.sampler(matched)


def _branch_targets(target: dict[str, Tensor], branch: Branch) -> dict[str, Tensor]:
    """The branch's view of a target: its own classes as 1..n; boxes the user labelled with an
    older class (``extend --existing train``) its ``others`` output (without one: background, as
    every other box)."""
    labels = target["labels"]
    own = branch.owns(labels)
    older = (labels >= 1) & (labels < branch.first_label) if branch.others else torch.zeros_like(own)
    keep = own | older
    others = torch.full_like(labels, branch.num_classes)
    view = {
        **target,
        "boxes": target["boxes"][keep],
        "labels": torch.where(own, labels - branch.first_label + 1, others)[keep],
    }
    if "masks" in target:  # the first len(masks) boxes have one; they stay first
        view["masks"] = target["masks"][keep[: len(target["masks"])]]
    return view
