"""detgraft 0.1's import path of the report helpers (the notebook's ``plot_loss``), kept so that
scripts written for it run unchanged: they live in ``detgraft.evaluation.report``."""

from .evaluation.report import loss_figure, plot_loss, write_evaluation, write_report

__all__ = ["loss_figure", "plot_loss", "write_evaluation", "write_report"]
