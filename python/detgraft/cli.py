"""The ``detgraft`` command.

    detgraft inspect MODEL [--weights W] [--classes C]
    detgraft predict MODEL IMAGE_OR_DIR --out DIR [--score 0.5]
    detgraft eval MODEL --data DATA [--images DIR] [--compare BASE] [--out DIR]
    detgraft drift MODEL --base BASE --images DIR
    detgraft extend --base MODEL --train DATA [--train DATA ...] [--images DIR] [--val DATA] --out DIR
                    [--old-images DIR]
    detgraft data check DATA [DATA ...] [--json FILE]
    detgraft export MODEL --out FILE [--format torchscript]
    detgraft demo [--out runs/demo] [--quick]

MODEL is what ``detgraft.load_model`` accepts: a checkpoint folder, a torchvision builder name with
``--weights DEFAULT|COCO_V1|FILE``, ``file.py:function`` with ``--weights FILE``, or a pickled model
with ``--trust-pickle``. DATA is a COCO json (its images in ``--images``, else beside it), a Pascal
VOC folder or split file, or a YOLO folder or data.yaml (``detgraft.data.readers``); every DATA is
checked first (``detgraft.data.check``), and ``--skip-bad`` leaves out images that cannot be read.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from dataclasses import MISSING, fields

import torch
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from . import __version__, distributed
from ._check_torch import BUILT_FOR
from .data.check import check_dataset
from .data.dataset import Dataset
from .data.images import IMAGE_SUFFIXES, find_images, load_image
from .data.readers import read_checked, read_dataset
from .demo import run_demo
from .evaluation.metrics import compare, detect, drift, evaluate
from .evaluation.predict import predict_files
from .evaluation.report import write_evaluation
from .export import ExportMismatch, export
from .extend import extend
from .extras import MissingPackage
from .model import families
from .model.card import UNUSED, get_card
from .model.loading import load_model
from .settings import ExtendSettings

log = logging.getLogger("detgraft")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not log.handlers and not logging.getLogger().handlers:  # a host that set up logging keeps its own
        log.addHandler(RichHandler(show_time=False, show_path=False))
    log.setLevel(logging.INFO + 10 * (args.quiet - args.verbose))  # -q: warnings only, -v: debug
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, KeyError, NotImplementedError, MissingPackage) as err:
        log.error("%s", err)
        return 2


def _version() -> str:

    return f"detgraft {__version__} (Rust core built for torch {BUILT_FOR}; torch {torch.__version__} here)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detgraft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("-q", "--quiet", action="count", default=0, help="warnings and errors only")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug messages too")
    sub = parser.add_subparsers(dest="command", required=True)
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("model", help="checkpoint folder, torchvision builder, file.py:function, or pickled model")
    model.add_argument("--weights", help="DEFAULT, COCO_V1 or a state-dict file (.safetensors, .pth)")
    model.add_argument("--classes", help="JSON file with the class names (index = label)")
    model.add_argument("--trust-pickle", action="store_true", help="allow unpickling a whole model (runs its code)")

    inspect = sub.add_parser("inspect", parents=[model], help="architecture, class table and history of a model")
    inspect.set_defaults(run=_inspect)

    predict = sub.add_parser("predict", parents=[model], help="detect objects in images")
    predict.add_argument("input", help="an image file or a folder of images")
    predict.add_argument("--out", required=True, help="folder for detections.json and annotated images")
    predict.add_argument("--score", type=float, default=0.5, help="lowest score kept (default 0.5)")
    predict.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    predict.set_defaults(run=_predict)

    ev = sub.add_parser("eval", parents=[model], help="COCO AP per class and group, confusions, report.html")
    ev.add_argument(
        "--data",
        required=True,
        help="the labelled images: COCO json, Pascal VOC or YOLO (a data.yaml's val split; data.yaml:test for another)",
    )
    ev.add_argument("--images", help="a COCO json's image folder (default: images/ beside it, or its folder)")
    ev.add_argument("--skip-bad", action="store_true", help="leave out images that cannot be read (counted)")
    ev.add_argument("--categories", help="only these categories of --data, renamed with name=new: 'hen=chicken,frog'")
    ev.add_argument("--compare", help="the base model, to show AP before/after and forgetting")
    ev.add_argument("--compare-weights", help="--weights of the base")
    ev.add_argument("--compare-classes", help="--classes of the base")
    ev.add_argument("--out", default="eval", help="folder for eval.json and report.html (default: eval)")
    ev.add_argument("--score", type=float, default=0.5, help="score for confusions and pictures (default 0.5)")
    ev.add_argument("--evaluator", default="pycocotools", choices=["pycocotools", "faster-coco-eval"])
    ev.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ev.set_defaults(run=_eval)

    dr = sub.add_parser("drift", parents=[model], help="how far old classes moved, without labels")
    dr.add_argument("--base", required=True, help="the base model")
    dr.add_argument("--base-weights", help="--weights of the base")
    dr.add_argument("--base-classes", help="--classes of the base")
    dr.add_argument("--images", required=True, help="a folder of your images")
    dr.add_argument(
        "--score",
        type=float,
        default=0.7,
        help="base detections at or above this are the reference, and the model's must reach it to count as kept",
    )
    dr.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    dr.set_defaults(run=_drift)

    ex = sub.add_parser("extend", help="add the training file's categories to a model and fine-tune it")
    ex.add_argument("--base", required=True, help="the model to extend (what MODEL accepts elsewhere)")
    ex.add_argument("--weights", help="--weights of the base")
    ex.add_argument("--classes", help="--classes of the base")
    ex.add_argument("--trust-pickle", action="store_true", help="allow unpickling a whole model (runs its code)")
    ex.add_argument(
        "--train",
        required=True,
        action="append",
        help="labels of the new classes (their categories): COCO json, Pascal VOC or YOLO (a data.yaml's train "
        "split; data.yaml:NAME for another); repeat to combine",
    )
    ex.add_argument("--images", help="a COCO json's image folder (default: images/ beside it, or its folder)")
    ex.add_argument("--skip-bad", action="store_true", help="leave out images that cannot be read (counted)")
    ex.add_argument(
        "--categories",
        help="only these categories of --train (the classes to add), renamed with name=new: 'hen=chicken,frog'",
    )
    ex.add_argument(
        "--val",
        help="old and new classes labelled (any format; a data.yaml's val split): AP and report.html at the end",
    )
    ex.add_argument("--replay", help="annotated old-class images to mix in (any format)")
    ex.add_argument(
        "--old-images",
        help="branch: a folder of images that show old classes and none of the new ones (a few hundred COCO images "
        "for a COCO model; no labels): the arbitration learns there what old objects look like, and lowers fewer",
    )
    ex.add_argument("--out", required=True, help="folder for the checkpoint, settings, log and report")
    ex.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    ex.add_argument(
        "--tensorboard", help="a folder for TensorBoard events: loss parts per step, val AP (pip install tensorboard)"
    )
    _settings_flags(ex)
    ex.set_defaults(run=_extend)

    data = sub.add_parser("data", help="check a dataset before training or scoring")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser("check", help="images, boxes per class, sizes and every problem, with what happens")
    check.add_argument(
        "paths", nargs="+", help="COCO json, Pascal VOC or YOLO datasets (a data.yaml's train split; data.yaml:val ...)"
    )
    check.add_argument("--images", help="a COCO json's image folder (default: images/ beside it, or its folder)")
    check.add_argument("--skip-bad", action="store_true", help="count unreadable images as left out, not as errors")
    check.add_argument("--json", help="also write the reports to this JSON file")
    check.set_defaults(run=_data_check)

    export = sub.add_parser("export", parents=[model], help="a file that runs without detgraft (TorchScript, ONNX)")
    export.add_argument("--out", required=True, help="the file to write (model.pt, model.onnx)")
    export.add_argument(
        "--format",
        default="torchscript",
        help="torchscript (torch.jit.load), pt2 (torch.export.load), onnx (onnxruntime; needs pip install onnx "
        "onnxruntime) or torchvision (the state dict for torchvision.models.get_model(name, num_classes=N); not for "
        "branch models)",
    )
    export.add_argument("--images", help="compare the export with the model on up to 4 images of this folder")
    export.set_defaults(run=_export)

    demo = sub.add_parser("demo", help="the whole story offline, on shapes it draws (a few minutes on 2 cores)")
    demo.add_argument("--out", default="runs/demo", help="folder for the data, models and reports")
    demo.add_argument("--cache", help="where the demo's base detector is kept (default ~/.cache/detgraft/demo)")
    demo.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke test)")
    demo.set_defaults(run=_demo)
    return parser


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``ExtendSettings`` field, same name, same default."""

    types = {"int": int, "float": float, "str": str, "float | None": _float_or_none, "int | None": _int_or_auto}
    for f in fields(ExtendSettings):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        shown = "auto" if f.type in ("int | None", "float | None") and default is None else default
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
        else:
            parser.add_argument(
                flag, type=types[f.type], default=default, help=f"{f.metadata['help']} (default {shown})"
            )


def _export(args: argparse.Namespace) -> int:

    model = _load(args)
    images = None
    if args.images:
        device = next(model.parameters()).device
        images = [load_image(str(p)).float().div(255).to(device) for p in find_images(args.images)[:4]]
        if not images:
            raise FileNotFoundError(f"--images {args.images!r} holds no image (.jpg, .png, ...; not searched below)")
    try:
        check = export(model, args.out, args.format, images)
    except ExportMismatch as err:
        log.error("%s is written, but it does not give the model's detections: %s", args.out, err)
        return 1
    how = {
        "onnx": "onnxruntime.InferenceSession",
        "torchvision": "safetensors.torch.load_file",
        "pt2": "torch.export.load",
    }.get(args.format, "torch.jit.load")
    Console().print(
        f"{args.out}: load it with {how}. On {check['detections']} detections the largest difference from "
        f"the model is {check['max_box_difference']:.2g} px in a box and {check['max_score_difference']:.2g} in a "
        "score" + ("" if check["detections"] else " (nothing detected to compare: give --images)")
    )
    return 0


def _demo(args: argparse.Namespace) -> int:

    run_demo(args.out, cache=args.cache, quick=args.quick)
    return 0


def _int_or_auto(text: str) -> int | None:
    return None if text.lower() == "auto" else int(text)


def _float_or_none(text: str) -> float | None:
    return None if text.lower() in ("none", "auto") else float(text)


def _extend(args: argparse.Namespace) -> int:

    settings = ExtendSettings(**{f.name: getattr(args, f.name) for f in fields(ExtendSettings)})
    if not distributed.is_main():  # under torchrun rank 0 reports the data check (and all the rest)
        logging.getLogger("detgraft").setLevel(logging.WARNING)
    train = read_checked(args.train, args.images, args.skip_bad, args.categories)
    val = read_checked([args.val], args.images, args.skip_bad, split="val") if args.val else None
    replay = read_checked([args.replay], args.images, args.skip_bad) if args.replay else None
    old_images = find_images(args.old_images) if args.old_images else None
    if old_images == []:
        raise FileNotFoundError(f"--old-images {args.old_images!r} holds no image (.jpg, .png, ...; not in subfolders)")
    model = load_model(args.base, args.weights, args.classes, trust_pickle=args.trust_pickle)
    try:
        extend(
            model,
            train,
            settings,
            out=args.out,
            val=val,
            replay=replay,
            resume=args.resume,
            old_images=old_images,
            tensorboard=args.tensorboard,
        )
    except KeyboardInterrupt as stop:
        log.warning("%s", stop or f"interrupted; continue with --resume (checkpoint {args.out}/last)")
        return 130
    except FloatingPointError:  # extend logged it (console and extend.log)
        return 1
    log.info("checkpoint, settings.json, mapping.json and extend.log in %s", args.out)
    return 0


def _load(args: argparse.Namespace):
    return load_model(args.model, args.weights, args.classes, trust_pickle=args.trust_pickle)


def _inspect(args: argparse.Namespace) -> int:
    model = _load(args)
    card = get_card(model)
    console = Console()
    kind = families.family(model)
    params = list(model.parameters())
    summary = Table(title=f"model {args.model}", show_header=False)
    summary.add_row("architecture", f"{type(model).__name__} (family {kind.name})")
    summary.add_row("backbone", type(getattr(model.backbone, "body", model.backbone)).__name__)
    if kind.two_stage:
        predictor = model.roi_heads.box_predictor
        summary.add_row(
            "box predictor",
            f"{type(predictor).__name__}({predictor.cls_score.in_features} -> "
            f"{predictor.cls_score.out_features} classes, "
            f"{predictor.bbox_pred.out_features} box outputs)",
        )
    for spec in families.class_tensors(model):
        channels = model.get_submodule(spec.path).weight.shape[0]
        summary.add_row(
            "class layer", f"{spec.path}: {channels} channels = {spec.anchors} anchors x {card.num_classes} classes"
        )
    heads = getattr(model, "roi_heads", None) or getattr(model, "head", None)
    for k, branch in enumerate(getattr(heads, "branches", [])):
        first, last = branch.first_label, branch.first_label + branch.num_new - 1
        parts = "box head + predictor" if hasattr(branch, "box_predictor") else "classification head"
        if getattr(branch, "mask_predictor", None) is not None:
            parts += " + mask predictor"
        summary.add_row(f"branch {k + 1}", f"labels {first}..{last}: {parts} (strategy branch; the base frozen)")
    summary.add_row(
        "parameters",
        f"{sum(p.numel() for p in params):,} ({sum(p.numel() for p in params if p.requires_grad):,} trainable)",
    )
    summary.add_row("builder", str(card.builder) if card.builder else "unknown (cannot be checkpointed)")
    summary.add_row("base weights", card.source or "unknown")
    console.print(summary)

    classes = Table(title=f"classes (num_classes={card.num_classes}, background included)")
    for column in ("label", "name", "group"):
        classes.add_column(column)
    unused = [i for i, n in enumerate(card.classes) if n == UNUSED]
    for label, name in enumerate(card.classes):
        if label == 0 or name == UNUSED:
            continue
        step = card.step_of(label)
        classes.add_row(str(label), name, f"new (step {step})" if step else "old")
    console.print(classes)
    groups = Counter("new" if card.step_of(i) else "old" for i in range(1, card.num_classes) if i not in unused)
    console.print(f"{groups['old']} old classes, {groups['new']} new, {len(unused)} unused labels ('N/A')")

    if card.history:
        history = Table(title="history")
        for column in ("step", "added", "labels", "init", "data", "date"):
            history.add_column(column)
        for step, entry in enumerate(card.history, start=1):
            history.add_row(
                str(step),
                ", ".join(entry["added"]),
                ", ".join(map(str, entry["labels"])),
                entry["init"],
                str(entry.get("data") or "-"),
                entry.get("date", "-"),
            )
        console.print(history)
    return 0


def _data_check(args: argparse.Namespace) -> int:

    console, reports, failed = Console(), [], False
    for path in args.paths:
        try:
            _, report = check_dataset(read_dataset(path, args.images), skip_bad=args.skip_bad, raise_errors=False)
        except (ValueError, FileNotFoundError) as err:  # a file that cannot be parsed at all
            log.error("%s", err)
            reports.append({"source": path, "unreadable": str(err)})
            failed = True
            continue
        for table in report.table():
            console.print(table)
        if report.errors():
            console.print(report.summary())
            failed = True
        reports.append(report.to_json())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    return 1 if failed else 0


def _predict(args: argparse.Namespace) -> int:
    model = _load(args)
    files = find_images(args.input)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {args.input!r}")
    predictions, skipped = predict_files(model, files, args.out, score=args.score, device=args.device)
    count = sum(len(p.labels) for p in predictions)
    log.info("%d detections in %d images -> %s/detections.json", count, len(predictions), args.out)
    if skipped:
        log.warning("%d files skipped (unreadable): %s", len(skipped), ", ".join(s["file"] for s in skipped))
    return 0


def _eval(args: argparse.Namespace) -> int:

    data = read_checked([args.data], args.images, args.skip_bad, args.categories, split="val")
    model = _load(args)
    detections = detect(model, data, device=args.device)
    result = evaluate(model, data, detections=detections, evaluator=args.evaluator, score=args.score)
    before = base_detections = comparison = base = None
    if args.compare:
        base = load_model(args.compare, args.compare_weights, args.compare_classes, trust_pickle=args.trust_pickle)
        base_detections = detect(base, data, device=args.device)
        before = evaluate(base, data, detections=base_detections, evaluator=args.evaluator, score=args.score)
        comparison = compare(result, before)
    _print_eval(result, before, comparison)
    page = write_evaluation(
        args.out,
        f"detgraft eval: {args.model}",
        result,
        data,
        detections,
        get_card(model).classes,
        before=before,
        base_detections=base_detections,
        base_classes=get_card(base).classes if base else None,
        comparison=comparison,
        score=args.score,
        header={"model": args.model, "data": args.data},
    )
    log.info("wrote %s and %s", page.with_name("eval.json"), page)
    return 0


def _print_eval(result, before, comparison) -> None:
    console = Console()
    was = {c.name: c.ap for c in before.classes} if before else {}
    table = Table(title="AP per class (COCO box AP@[.5:.95], AP50, AP75, AR@100)")
    for column in ("label", "name", "group", "boxes", "AP", "AP50", "AP75", "AR") + (
        ("AP before", "change") if before else ()
    ):
        table.add_column(column, justify="right")
    for c in result.classes:
        extra = (
            (f"{was[c.name]:.3f}", f"{c.ap - was[c.name]:+.3f}") if c.name in was else (("-", "-") if before else ())
        )
        table.add_row(
            str(c.label),
            c.name,
            c.group,
            str(c.num_boxes),
            f"{c.ap:.3f}",
            f"{c.ap50:.3f}",
            f"{c.ap75:.3f}",
            f"{c.ar:.3f}",
            *extra,
        )
    console.print(table)
    groups = Table(title="groups (box AP; mask AP beside it when the model and the data have masks)")
    masks = result.mask_groups
    for column in ("group", "AP", "AP50", "AP75", "AR", *(("mask AP", "mask AP50") if masks else ())):
        groups.add_column(column, justify="right")
    for g, v in result.groups.items():
        mask = (f"{masks[g]['ap']:.3f}", f"{masks[g]['ap50']:.3f}") if masks else ()
        groups.add_row(g, *(f"{v[m]:.3f}" for m in ("ap", "ap50", "ap75", "ar")), *mask)
    console.print(groups)
    if comparison:
        console.print(
            f"old classes: AP {comparison['old_ap_before']:.3f} -> {comparison['old_ap_after']:.3f} "
            f"({comparison['kept']:.1%} kept)"
        )
    if result.not_evaluated:
        console.print(f"not evaluated (not labelled in the data): {', '.join(result.not_evaluated)}")
    for who, ev in (("model", result), ("base", before)):
        if ev and ev.confusions:
            console.print(
                f"{who}: old classes fired on new objects: "
                + "; ".join(
                    f"{c.new_class} -> {c.old_class} {c.count}/{c.total} ({c.share:.0%})" for c in ev.confusions
                )
            )


def _drift(args: argparse.Namespace) -> int:

    data = Dataset.from_folder(args.images)
    model = _load(args)
    base = load_model(args.base, args.base_weights, args.base_classes, trust_pickle=args.trust_pickle)
    d = drift(model, base, data, score=args.score, device=args.device)
    Console().print(
        f"kept {d.kept:.1%} of the base's {d.reference} old-class detections with score >= {args.score} on "
        f"{len(data.coco['images'])} images (same class, IoU >= 0.5, score >= {args.score}); "
        f"AP against them {d.ap:.3f}, AP50 {d.ap50:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
