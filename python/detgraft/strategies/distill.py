"""The ``distill`` strategy's extra losses: the student keeps answering like the frozen teacher.

After each training forward the teacher (the model before fine-tuning) looks at the same
transformed images and the same sampled proposals, and three terms join torchvision's loss dict:

- ``loss_distill_rpn`` (Faster ILOD): squared difference of RPN objectness logits and box
  deltas, on the anchors where the teacher is more confident than the student;
- ``loss_distill_cls`` (ILOD, with MMA's background-shift correction): KL divergence from the
  teacher's softmax over background + old classes to the student's, in which the student's
  background is its background *or any new class* (log-sum-exp of those logits): the teacher
  called a new object "background" because it did not know the class, which must not push the
  student's new-class scores down;
- ``loss_distill_box`` (ILOD): squared difference of the old classes' box regression.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["add_distillation"]


def add_distillation(model: nn.Module, teacher: nn.Module, first_new: int, weight: float = 1.0) -> None:
    seen: dict[str, object] = {}
    hooks = [
        model.backbone.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0])),
        model.rpn.head.register_forward_hook(lambda m, args, out: seen.__setitem__("rpn", out)),
        model.roi_heads.box_roi_pool.register_forward_pre_hook(lambda m, args: seen.__setitem__("rois", args[1:])),
        model.roi_heads.box_predictor.register_forward_hook(lambda m, args, out: seen.__setitem__("pred", out)),
    ]

    def add_losses(module: nn.Module, args, losses):
        if not module.training or not isinstance(losses, dict) or "pred" not in seen:
            seen.clear()
            return None
        x, (s_obj, s_box), (proposals, image_shapes), (s_logits, s_reg) = (
            seen["x"],
            seen["rpn"],
            seen["rois"],
            seen["pred"],
        )
        seen.clear()
        with torch.no_grad():
            features = teacher.backbone(x)
            if isinstance(features, Tensor):  # a single-map backbone, as GeneralizedRCNN wraps it
                features = OrderedDict([("0", features)])
            t_obj, t_box = teacher.rpn.head(list(features.values()))
            t_heads = teacher.roi_heads
            pooled = t_heads.box_roi_pool(features, proposals, image_shapes)
            t_logits, t_reg = t_heads.box_predictor(t_heads.box_head(pooled))
        return {
            **losses,
            "loss_distill_rpn": weight * _rpn_loss(s_obj, s_box, t_obj, t_box),
            "loss_distill_cls": weight * _cls_loss(s_logits, t_logits[:, :first_new], first_new),
            "loss_distill_box": weight * _box_loss(s_reg, t_reg, first_new),
        }

    hooks.append(model.register_forward_hook(add_losses))
    object.__setattr__(model, "detgraft_distill_hooks", hooks)


def _rpn_loss(s_obj: list[Tensor], s_box: list[Tensor], t_obj: list[Tensor], t_box: list[Tensor]) -> Tensor:
    total, count = s_obj[0].new_zeros(()), 0
    for so, sb, to, tb in zip(s_obj, s_box, t_obj, t_box):
        mask = to > so.detach()  # [N, A, H, W]: where the teacher thinks "object" more
        n, a, h, w = so.shape
        box_mask = mask.unsqueeze(2).expand(n, a, 4, h, w).reshape(n, 4 * a, h, w)
        total = total + ((so - to) ** 2)[mask].sum() + ((sb - tb) ** 2)[box_mask].sum() / 4
        count += so.numel()
    return total / max(count, 1)


def _cls_loss(s_logits: Tensor, t_logits: Tensor, first_new: int) -> Tensor:
    """KL(teacher || student) over background + old classes; student background = bg or new."""
    background = torch.logsumexp(torch.cat([s_logits[:, :1], s_logits[:, first_new:]], 1), 1, keepdim=True)
    student = torch.cat([background, s_logits[:, 1:first_new]], 1)
    log_student = student - torch.logsumexp(s_logits, 1, keepdim=True)
    t = F.softmax(t_logits, 1)
    return (t * (torch.log(t.clamp_min(1e-12)) - log_student)).sum(1).mean()


def _box_loss(s_reg: Tensor, t_reg: Tensor, first_new: int) -> Tensor:
    return F.mse_loss(s_reg[:, 4 : 4 * first_new], t_reg[:, 4 : 4 * first_new])
