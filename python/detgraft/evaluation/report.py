"""``report.html``: one self-contained page (figures embedded) with what extension kept, learned
and confused."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from torch import Tensor
from torchvision.io import encode_png
from torchvision.utils import draw_bounding_boxes

from ..data.dataset import Dataset
from ..data.images import load_image
from .metrics import Evaluation
from .predict import PALETTE

__all__ = ["loss_figure", "plot_loss", "write_evaluation", "write_report"]


def _figure(width: float, height: float):
    """A figure and its axes, drawn by Agg without pyplot: a notebook's backend stays as it was."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    return figure, figure.subplots()


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def loss_figure(loss: list[float], from_step: int = 0):
    """A figure of ``plot_loss`` (no pyplot: for files)."""
    fig, ax = _figure(6, 3)
    plot_loss(ax, loss, from_step)
    return fig


def plot_loss(ax, loss: list[float], from_step: int = 0) -> None:
    """Draws the training loss per step (the sum of the loss parts) on ``ax``, with a running mean
    over 10 steps (in a notebook: ``fig, ax = plt.subplots(); plot_loss(ax, losses)``)."""
    steps = range(from_step + 1, from_step + len(loss) + 1)
    ax.plot(steps, loss, color="#bbbbbb", linewidth=1, label="step")
    mean = [sum(loss[max(0, k - 9) : k + 1]) / len(loss[max(0, k - 9) : k + 1]) for k in range(len(loss))]
    ax.plot(steps, mean, color="#4363d8", label="mean of 10")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss")
    ax.legend(fontsize=8)


def _ap_bars(after: Evaluation, before: Evaluation | None) -> str:
    names = [c.name for c in after.classes]
    was = {c.name: c.ap for c in before.classes} if before else {}
    fig, ax = _figure(max(6, len(names) * 0.35), 3.5)
    x = range(len(names))
    if before:
        ax.bar([i - 0.2 for i in x], [was.get(n, 0) for n in names], 0.4, label="base", color="#9e9e9e")
    colors = ["#e6194b" if c.group == "new" else "#4363d8" for c in after.classes]
    ax.bar(
        [i + (0.2 if before else 0) for i in x],
        [c.ap for c in after.classes],
        0.4 if before else 0.8,
        label="model (new classes red)",
        color=colors,
    )
    ax.set_xticks(list(x), names, rotation=70, fontsize=8)
    ax.set_ylabel("AP@[.5:.95]")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("AP per class")
    return _png(fig)


def _pr_curves(after: Evaluation) -> str | None:
    if not after.pr_curves:
        return None
    fig, ax = _figure(4.5, 3.5)
    recall = [i / 100 for i in range(101)]
    for name, precision in after.pr_curves.items():
        ax.plot(recall, [max(p, 0) for p in precision], label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("new classes, IoU 0.5")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    return _png(fig)


def _drawn(path: Path, d: dict[str, Tensor] | None, classes: list[str], score: float) -> str:
    image = load_image(str(path))
    if d is not None and bool((d["scores"] >= score).any()):  # draw_bounding_boxes warns on none
        keep = d["scores"] >= score
        labels = d["labels"][keep].tolist()
        colors = [PALETTE[i % len(PALETTE)] for i in labels]
        image = draw_bounding_boxes(
            image,
            d["boxes"][keep],
            [f"{classes[i]} {s:.2f}" for i, s in zip(labels, d["scores"][keep].tolist())],
            colors=colors,
            width=2,
            fill_labels=True,
            label_colors="white",
            label_background_colors=colors,
        )
    return "data:image/png;base64," + base64.b64encode(encode_png(image).numpy().tobytes()).decode()


def write_report(
    path: str | Path,
    title: str,
    after: Evaluation,
    data: Dataset,
    detections: dict[int, dict[str, Tensor]],
    classes: list[str],
    *,
    before: Evaluation | None = None,
    base_detections: dict[int, dict[str, Tensor]] | None = None,
    base_classes: list[str] | None = None,
    comparison: dict[str, Any] | None = None,
    score: float = 0.5,
    pictures: int = 6,
    loss: dict[str, Any] | None = None,
) -> Path:
    """Writes the report and returns its path (``loss``: extend.json's ``loss_curve``, drawn)."""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(g)}</td>" + "".join(f"<td>{v[m]:.3f}</td>" for m in ("ap", "ap50", "ap75", "ar")) + "</tr>"
        for g, v in after.groups.items()
    )
    parts = [
        f"<h1>{e(title)}</h1>",
        "<h2>Headline</h2>",
        "<table id='headline'><tr><th>group</th><th>AP</th><th>AP50</th><th>AP75</th><th>AR@100</th></tr>"
        f"{rows}</table>",
    ]
    if comparison:
        parts.append(
            f"<p>Old classes: AP {comparison['old_ap_before']:.3f} before, {comparison['old_ap_after']:.3f} "
            f"after: <b>{comparison['kept']:.1%} kept</b>.</p>"
        )
    if after.not_evaluated:
        parts.append(f"<p>Not evaluated (not labelled in the data): {e(', '.join(after.not_evaluated))}</p>")
    parts.append(f"<h2>AP per class</h2><img id='ap-bars' src='{_ap_bars(after, before)}'>")
    if loss and loss.get("loss"):
        curve = _png(loss_figure(loss["loss"], loss["from_step"]))
        parts.append(f"<h2>Training loss</h2><img id='loss-curve' src='{curve}'>")
    curves = _pr_curves(after)
    if curves:
        parts.append(f"<h2>Precision-recall</h2><img id='pr-curves' src='{curves}'>")
    table = [("model", after)] + ([("base", before)] if before else [])
    parts.append("<h2>Old classes fired on new objects (score &ge; 0.5, IoU &ge; 0.5)</h2>")
    for who, ev in table:
        lines = "".join(
            f"<tr><td>{e(c.new_class)}</td><td>{e(c.old_class)}</td><td>{c.count} / {c.total}</td>"
            f"<td>{c.share:.0%}</td></tr>"
            for c in ev.confusions
        )
        parts.append(
            f"<h3>{who}</h3><table class='confusions'><tr><th>object</th><th>detected as</th><th>count</th>"
            f"<th>share</th></tr>{lines or '<tr><td colspan=4>none</td></tr>'}</table>"
        )
    parts.append("<h2>Detections</h2><div id='grid'>")
    for image in data.coco["images"][:pictures]:
        p = data.path(image)
        cells = ""
        if base_detections is not None:
            cells += (
                f"<figure><img src='{_drawn(p, base_detections.get(image['id']), base_classes, score)}'>"
                f"<figcaption>base</figcaption></figure>"
            )
        cells += (
            f"<figure><img src='{_drawn(p, detections.get(image['id']), classes, score)}'>"
            f"<figcaption>model</figcaption></figure>"
        )
        parts.append(f"<div class='pair'>{cells}</div>")
    parts.append("</div>")
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}figure{display:inline-block;margin:4px}"
        "figure img{width:320px}"
        ".pair{display:inline-block;border:1px solid #ddd;margin:4px}figcaption{text-align:center}"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{style}</style>"
        f"</head><body>{''.join(parts)}</body></html>"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path


def write_evaluation(
    out: str | Path,
    title: str,
    after: Evaluation,
    data: Dataset,
    detections: dict[int, dict[str, Tensor]],
    classes: list[str],
    *,
    before: Evaluation | None = None,
    base_detections: dict[int, dict[str, Tensor]] | None = None,
    base_classes: list[str] | None = None,
    comparison: dict[str, Any] | None = None,
    score: float = 0.5,
    header: dict[str, Any] | None = None,
    loss: dict[str, Any] | None = None,
) -> Path:
    """Writes ``out/eval.json`` (``header``, the results, the base's and the comparison) and
    ``out/report.html``; returns the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        **(header or {}),
        **after.to_json(),
        "base": before.to_json() if before else None,
        "comparison": comparison,
    }
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    return write_report(
        out / "report.html",
        title,
        after,
        data,
        detections,
        classes,
        before=before,
        base_detections=base_detections,
        base_classes=base_classes,
        comparison=comparison,
        score=score,
        loss=loss,
    )
