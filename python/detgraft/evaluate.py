"""detgraft 0.1's import path of the evaluation helpers the README and the notebook show, kept so
that scripts written for it run unchanged: the names live in ``detgraft.data.dataset`` and
``detgraft.evaluation.metrics``."""

from .data.dataset import Dataset, load_dataset
from .evaluation.metrics import Evaluation, compare, confusions, detect, drift, evaluate

__all__ = ["Dataset", "Evaluation", "compare", "confusions", "detect", "drift", "evaluate", "load_dataset"]
