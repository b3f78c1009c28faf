"""detgraft 0.1's import path of ``TrainingSet`` (the notebook's), kept so that scripts written for
it run unchanged: it lives in ``detgraft.data.batches``."""

from .data.batches import TrainingSet, training_batches

__all__ = ["TrainingSet", "training_batches"]
