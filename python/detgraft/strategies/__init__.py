"""Layer 4, strategies: preparing a widened detector for fine-tuning (``incremental``), the
teacher's distillation, and ``calibrate``, the branch's arbitration learned after training."""

from .incremental import STRATEGIES, check_strategy, freeze_batchnorm, incremental

__all__ = ["STRATEGIES", "check_strategy", "freeze_batchnorm", "incremental"]
