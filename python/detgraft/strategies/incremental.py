"""Fine-tuning a widened detector inside the user's own torchvision training loop.

``incremental(model, strategy)`` prepares the model in place and returns it; ``model(images,
targets)`` still returns torchvision's loss dict and eval mode still returns its detections.
Strategies (README, "Strategies", has the measured comparison):

- ``naive``: every trainable parameter learns from the new labels (the forum recipe; it forgets).
- ``head``: only the new classes' rows of ``cls_score`` / ``bbox_pred`` learn; everything else stays
  bit-identical, whatever the optimizer does (momentum, weight decay), and the softmax over all
  classes arbitrates between old and new.
- ``pseudo``: as ``naive``, plus a frozen ``teacher`` (the model before training) labels the old
  classes' objects in the new images; uncertain teacher boxes are left out of the loss.
- ``distill``: ``pseudo`` plus distillation of the teacher's responses (``detgraft.strategies.distill``).
- ``branch`` (default): the base stays frozen and bit-identical; a new box branch learns the new
  classes and detections are merged (``detgraft.heads.rcnn``; RetinaNet / FCOS: a classification
  branch, ``detgraft.heads.dense``).

All but ``branch`` freeze BatchNorm statistics first (``freeze_batchnorm``): live BatchNorm drifts
on new data. ``branch`` keeps the base's BatchNorm layers as they are, in eval mode.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ..heads.masks import allow_boxes_without_masks
from ..heads.rcnn import BRANCH_RANK
from ..heads.teacher import add_teacher_boxes
from ..model import families
from ..model.batchnorm import batchnorm_in_eval_mode, freeze_batchnorm
from ..model.card import get_card
from .distill import add_distillation

__all__ = ["STRATEGIES", "freeze_batchnorm", "incremental"]

log = logging.getLogger(__name__)

STRATEGIES = families.STRATEGIES  # which a family takes: its description (``Family.strategies``)


def check_strategy(model: nn.Module, strategy: str) -> families.Family:
    """The model's family, if ``strategy`` is available for it; a clear error otherwise."""
    kind = families.family(model)
    if strategy not in kind.strategies:
        raise NotImplementedError(
            f"strategy {strategy!r} is not available for {kind.name} models yet; "
            f"choose one of {', '.join(kind.strategies)}"
        )
    return kind


def incremental(
    model: nn.Module,
    strategy: str = "branch",
    *,
    keep: float = 0.7,
    ignore: float = 0.3,
    merge_iou: float | None = 0.5,
    others: bool = True,
    branch_rank: int = BRANCH_RANK,
) -> nn.Module:
    """Prepares a widened detector (``expand_predictor`` first) for fine-tuning with ``strategy``,
    in place; build the optimizer afterwards from the parameters that require grad. The classes
    of the latest ``expand_predictor`` call are the new ones.

    ``keep`` and ``ignore`` are the teacher score thresholds of ``pseudo`` / ``distill`` and of
    ``branch``'s ``others`` output (an object the model knew before, learned from its detections);
    ``merge_iou`` is the overlap at which ``branch`` lets the stronger of an old-class and a
    new-class detection win (None: keep both). ``branch_rank``: an R-CNN branch trains a copy of the
    base's box head, and ``calibrate`` keeps its change from the base's at this rank (0: the whole
    copy)."""
    if not 0 <= ignore <= keep <= 1:
        raise ValueError(f"need 0 <= ignore <= keep <= 1; got ignore={ignore}, keep={keep}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    kind = check_strategy(model, strategy)
    card = get_card(model)
    if not card.new_labels:
        raise ValueError("the model has no new classes: call detgraft.expand_predictor(model, names) first")
    if kind.masks and strategy != "branch":
        allow_boxes_without_masks(model)
    if strategy == "branch":
        # the base must compute exactly as before: BatchNorm layers stay themselves, in eval mode
        model.register_forward_pre_hook(batchnorm_in_eval_mode)
    else:
        log.info("froze %d BatchNorm layers", freeze_batchnorm(model))
    new_labels = card.history[-1]["labels"]
    if strategy == "head":
        _train_new_rows_only(model, min(new_labels))
    if strategy in ("pseudo", "distill"):
        teacher = _add_pseudo_labels(model, keep, ignore, min(new_labels))
        if strategy == "distill":
            add_distillation(model, teacher, min(new_labels))
    if strategy == "branch":
        kind.branch.add(model, new_labels, merge_iou, others=others, keep=keep, ignore=ignore, rank=branch_rank)
    if strategy == "branch" and kind.two_stage:
        # the frozen RPN's losses carry no gradient: leave them out of the loss dict
        model.register_forward_hook(_drop_rpn_losses)
    model.detgraft_strategy = strategy
    return model


def _train_new_rows_only(model: nn.Module, first_new: int) -> None:
    """Only the new classes' rows of every class-dependent layer learn (R-CNN: ``cls_score``,
    ``bbox_pred`` and a Mask R-CNN's ``mask_fcn_logits``; one-stage: the classification
    convolutions, anchor by anchor)."""
    total = families.num_classes(model)
    specs = families.class_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    # the old rows as they are now, put back before every forward and every state_dict: an
    # optimizer's weight decay or momentum may have moved them in its last step. The hooks find
    # the layers through their module argument, so a deep copy of the model restores its own.
    saved = {}
    for spec in specs:
        layer = model.get_submodule(spec.path)
        new = families.new_rows(spec, total, first_new, layer.weight.device)
        for name in ("weight", "bias"):
            p = getattr(layer, name)
            if p is None:
                continue
            p.requires_grad_(True)
            p.register_hook(lambda grad, new=new: torch.where(new.view(-1, *[1] * (grad.dim() - 1)), grad, 0.0))
            saved[(spec.path, name)] = (new, p.detach()[~new].clone())

    def restore(root: nn.Module) -> None:
        with torch.no_grad():
            for (path, name), (new, old) in saved.items():
                getattr(root.get_submodule(path), name)[~new] = old

    model.register_forward_pre_hook(lambda module, args: restore(module))
    model.register_state_dict_pre_hook(lambda module, prefix, keep_vars: restore(module))


def _drop_rpn_losses(module: nn.Module, args, output):
    if module.training and isinstance(output, dict):
        return {k: v for k, v in output.items() if k not in ("loss_objectness", "loss_rpn_box_reg")}
    return None


def _add_pseudo_labels(model: nn.Module, keep: float, ignore: float, first_new: int) -> nn.Module:
    """Before each training forward, a frozen copy of the model as it is now (the ``teacher``)
    detects old classes in the batch: detections scoring >= ``keep`` become labels, those between
    ``ignore`` and ``keep`` become boxes labelled -1, which torchvision's RoI heads match and then
    leave out of the loss (its sampler skips label -1). Teacher boxes on a labelled object
    (IoU >= 0.5) are dropped: the user's label wins."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    card = get_card(model)
    old = torch.tensor([label for label in range(1, first_new) if card.classes[label] != "N/A"])

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        images = args[0] if args else kwargs.get("images")
        targets = args[1] if len(args) > 1 else kwargs.get("targets")
        if not module.training or targets is None:
            return None
        device = images[0].device
        with torch.no_grad():
            detections = teacher.to(device)(images)
        old_only = [{k: v[torch.isin(d["labels"], old.to(device))] for k, v in d.items()} for d in detections]
        merged = [add_teacher_boxes(t, d, keep, ignore) for t, d in zip(targets, old_only)]
        return (images, merged), {}

    model.register_forward_pre_hook(hook, with_kwargs=True)
    object.__setattr__(model, "detgraft_teacher", teacher)  # reachable, but not a submodule: not trained or saved
    return teacher
