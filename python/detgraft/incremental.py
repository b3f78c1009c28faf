"""Fine-tuning a widened detector inside the user's own torchvision training loop.

``incremental(model, strategy)`` prepares the model in place and returns it; ``model(images,
targets)`` still returns torchvision's loss dict and eval mode still returns its detections.
Strategies implemented so far (the issue lists more):

- ``naive``: every trainable parameter learns from the new labels (the forum recipe; it forgets).
- ``head``: only the new classes' rows of ``cls_score`` / ``bbox_pred`` learn; everything else stays
  bit-identical, whatever the optimizer does (momentum, weight decay), and the softmax over all
  classes arbitrates between old and new.

Both freeze BatchNorm statistics first (``freeze_batchnorm``): live BatchNorm drifts on new data.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .card import get_card

__all__ = ["STRATEGIES", "freeze_batchnorm", "incremental"]

log = logging.getLogger(__name__)

STRATEGIES = ("naive", "head")


def freeze_batchnorm(model: nn.Module) -> int:
    """Replaces every ``nn.BatchNorm2d`` by a ``FrozenBatchNorm2d`` with the same statistics and
    affine parameters (as torchvision's pretrained detectors are built); returns how many."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.BatchNorm2d:
            continue
        if not module.track_running_stats or module.running_mean is None:
            raise ValueError(f"BatchNorm2d {name!r} has no running statistics to freeze")
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps).to(module.running_mean.device)
        with torch.no_grad():
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
            frozen.weight.copy_(module.weight if module.affine else torch.ones_like(frozen.weight))
            frozen.bias.copy_(module.bias if module.affine else torch.zeros_like(frozen.bias))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, frozen)
        replaced += 1
    return replaced


def incremental(model: nn.Module, strategy: str = "head") -> nn.Module:
    """Prepares a widened detector (``expand_predictor`` first) for fine-tuning with ``strategy``,
    in place; build the optimizer afterwards from the parameters that require grad."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    card = get_card(model)
    if not card.new_labels:
        raise ValueError("the model has no new classes: call detgraft.expand_predictor(model, names) first")
    frozen = freeze_batchnorm(model)
    log.info("froze %d BatchNorm layers", frozen)
    if strategy == "head":
        _train_new_rows_only(model, min(card.new_labels))
    model.detgraft_strategy = strategy
    return model


def _train_new_rows_only(model: nn.Module, first_new: int) -> None:
    predictor = model.roi_heads.box_predictor
    for p in model.parameters():
        p.requires_grad_(False)
    rows = {predictor.cls_score: first_new, predictor.bbox_pred: 4 * first_new}
    for layer, old in rows.items():
        for p in (layer.weight, layer.bias):
            p.requires_grad_(True)
            p.register_hook(lambda grad, old=old: _zero_rows(grad, old))
    # the old rows as they are now; put back before every forward, so no optimizer step can move them
    saved = {
        layer: (layer.weight[: rows[layer]].detach().clone(), layer.bias[: rows[layer]].detach().clone())
        for layer in rows
    }

    def restore_old_rows(_module, _args) -> None:
        with torch.no_grad():
            for layer, (weight, bias) in saved.items():
                layer.weight[: len(weight)] = weight
                layer.bias[: len(bias)] = bias

    # before every forward and every state_dict: an optimizer's weight decay or momentum may have
    # moved them in the last step
    model.register_forward_pre_hook(restore_old_rows)
    predictor.register_state_dict_pre_hook(lambda module, prefix, keep_vars: restore_old_rows(module, ()))


def _zero_rows(grad: Tensor, rows: int) -> Tensor:
    grad = grad.clone()
    grad[:rows] = 0
    return grad
