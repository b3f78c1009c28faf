"""Frozen BatchNorm: statistics and affine parameters fixed, as torchvision's pretrained detectors
have them, for training on new data (live BatchNorm drifts).

``freeze_batchnorm`` replaces each ``nn.BatchNorm2d`` by a ``BatchNormFrozen``: torchvision's
``FrozenBatchNorm2d`` (the same buffers, nothing learns) computing as ``nn.BatchNorm2d`` does in
eval mode, with one fused kernel. So a model frozen this way detects bit for bit as before it was
frozen, and as fast (torchvision's scale-and-shift makes two passes over each map;
``benchmarks/speed.py``). A torchvision ``FrozenBatchNorm2d`` the builder made stays as it is.
(No ``from __future__ import annotations`` here: TorchScript compiles ``forward``.)
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["BatchNormFrozen", "batchnorm_in_eval_mode", "freeze_batchnorm"]


class BatchNormFrozen(FrozenBatchNorm2d):
    """torchvision's ``FrozenBatchNorm2d`` with ``nn.BatchNorm2d``'s eval-mode arithmetic."""

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def freeze_batchnorm(model: nn.Module) -> int:
    """Replaces every ``nn.BatchNorm2d`` by a ``BatchNormFrozen`` with the same statistics and
    affine parameters; returns how many."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.BatchNorm2d:
            continue
        if not module.track_running_stats or module.running_mean is None:
            raise ValueError(f"BatchNorm2d {name!r} has no running statistics to freeze")
        frozen = BatchNormFrozen(module.num_features, eps=module.eps).to(module.running_mean.device)
        with torch.no_grad():
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
            frozen.weight.copy_(module.weight if module.affine else torch.ones_like(frozen.weight))
            frozen.bias.copy_(module.bias if module.affine else torch.zeros_like(frozen.bias))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, frozen)
        replaced += 1
    return replaced


def batchnorm_in_eval_mode(model: nn.Module, *_hook_args) -> None:
    """Puts every BatchNorm layer of ``model`` in eval mode (the ``branch`` strategy keeps the
    base's statistics as they are while the rest trains; also a forward pre-hook)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            m.eval()
