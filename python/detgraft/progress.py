"""Progress bars wherever detgraft runs: rich's in a terminal; in a Jupyter notebook one line that
the notebook updates in place through IPython's display (rich's own notebook bars need
ipywidgets, which ``pip install detgraft`` does not bring: without it they show nothing but a
warning). Both take rich's ``Progress`` calls: ``add_task``, ``update``, ``with``."""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

from rich.progress import Progress

__all__ = ["NotebookProgress", "in_notebook", "progress", "track"]


def in_notebook() -> bool:
    """Running in a Jupyter kernel (JupyterLab, classic notebook, VS Code, Colab)?"""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and any(c.__name__ == "ZMQInteractiveShell" for c in type(shell).__mro__)


def progress(*columns, transient: bool = False, disable: bool = False) -> Progress | NotebookProgress:
    """rich's ``Progress(*columns)`` in a terminal, ``NotebookProgress`` in a notebook."""
    if in_notebook():
        return NotebookProgress(transient=transient, disable=disable)
    return Progress(*columns, transient=transient, disable=disable)


def track(sequence: Iterable, description: str, *, transient: bool = False, disable: bool = False) -> Iterator:
    """rich's ``track``, drawn as ``progress`` draws."""
    items = list(sequence)
    with progress(*Progress.get_default_columns(), transient=transient, disable=disable) as bar:
        task = bar.add_task(description, total=len(items))
        for item in items:
            yield item
            bar.update(task, advance=1)


class NotebookProgress:
    """One HTML line per task, ``<progress>`` bar, done/total, rate, time left and the task's text
    fields (``losses``), redrawn at most every ``period`` seconds and once at the end."""

    def __init__(self, *, transient: bool = False, disable: bool = False, period: float = 0.5) -> None:
        self.transient, self.disable, self.period = transient, disable, period
        self.tasks: list[dict[str, Any]] = []
        self.handle = None
        self.drawn = 0.0

    def __enter__(self) -> NotebookProgress:
        if not self.disable:
            from IPython.display import HTML, display

            self.handle = display(HTML(""), display_id=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self._draw(final=True)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        now = time.perf_counter()
        self.tasks.append(
            {"description": description, "total": total, "completed": completed, "fields": fields}
            | {"start": now, "start_completed": completed}
        )
        self._draw()
        return len(self.tasks) - 1

    def update(self, task: int, *, completed: float | None = None, advance: float = 0, **fields) -> None:
        t = self.tasks[task]
        t["completed"] = (t["completed"] if completed is None else completed) + advance
        t["fields"].update(fields)
        self._draw()

    def line(self, task: int) -> str:
        """The task's line as text: description, done/total, rate, time left, fields."""
        t = self.tasks[task]
        done, total = t["completed"], t["total"]
        seconds = time.perf_counter() - t["start"]
        rate = (done - t["start_completed"]) / seconds if seconds > 0 else 0.0
        parts = [t["description"], f"{done:g}/{total:g}" if total else f"{done:g}"]
        if rate > 0:
            parts.append(f"{rate:.2f}/s" if rate < 10 else f"{rate:.0f}/s")
            if total:
                parts.append(f"{timedelta(seconds=round((total - done) / rate))} left")
        parts += [str(v) for v in t["fields"].values() if str(v)]
        return " · ".join(parts)

    def _draw(self, final: bool = False) -> None:
        now = time.perf_counter()
        if self.handle is None or (not final and now - self.drawn < self.period):
            return
        self.drawn = now
        from IPython.display import HTML

        if final and self.transient:
            self.handle.update(HTML(""))
            return
        rows = "".join(
            f"<div><progress value='{t['completed']}' max='{t['total'] or 1}' style='width:14em'></progress> "
            f"<code>{html.escape(self.line(k))}</code></div>"
            for k, t in enumerate(self.tasks)
        )
        self.handle.update(HTML(rows))
