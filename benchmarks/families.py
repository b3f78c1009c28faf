"""Other detector families on EmojiCOCO: a Mask R-CNN and an FCOS base (and a RetinaNet one), then
step 1 (chicken, frog) with the default strategy on each.

    python benchmarks/families.py --bench ../shared/bench --data $DATA --runs $RUNS [--families fcos]
    ($DATA written with masks: python ../shared/bench/emojicoco.py --masks --out $DATA, the same images)

Each base starts from the EmojiCOCO Faster R-CNN base's weights, frozen with their BatchNorm, and
trains only its own head on ``base_train`` (batches of 8, cosine schedule):

- Mask R-CNN (``benchmarks/maskrcnn_base.py``): the base's backbone, RPN and box head plus
  torchvision's mask head, ``--mask-steps`` steps of SGD (momentum 0.9) at 0.02 on ``base_train``'s masks;
- FCOS (``benchmarks/fcos_base.py``): the base's backbone and FPN plus torchvision's FCOS head,
  ``--fcos-steps`` steps of AdamW at 0.001 after 50 of warm-up;
- RetinaNet (``benchmarks/retinanet_base.py``, ``--families retinanet``): the same with torchvision's
  RetinaNet head, ``--retinanet-steps`` steps (SGD at 0.01 left its scores below 0.02 after 800
  steps; AdamW reached old-class AP 0.027: its classification did not separate the classes).

Each is saved as a detgraft checkpoint in ``$RUNS/{maskrcnn,fcos,retinanet}-base`` and reused. Step 1 is
``detgraft extend`` with its defaults in its own process. Both are scored on ``test``: box AP (old,
new), mask AP where there are masks, and old-on-new. Writes the ``families`` section of RESULTS.md
and ``families`` in results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402
from arbitration import with_claim  # noqa: E402
from sizes import STEP1, shown, train  # noqa: E402

import detgraft  # noqa: E402
from detgraft.data.batches import TrainingSet  # noqa: E402
from detgraft.data.dataset import load_dataset  # noqa: E402
from detgraft.evaluation.metrics import detect, evaluate  # noqa: E402
from detgraft.model.builders import read_classes  # noqa: E402
from detgraft.model.families import by_name  # noqa: E402
from detgraft.settings import auto_lr  # noqa: E402
from detgraft.strategies.incremental import freeze_batchnorm  # noqa: E402

HERE = Path(__file__).parent


def train_mask_rcnn_base(args) -> dict:
    """The Mask R-CNN base: the Faster R-CNN base with a mask head trained on ``base_train``."""
    from maskrcnn_base import build

    def prepare(model) -> None:
        missing, unexpected = model.load_state_dict(load_file(str(args.bench / "base.safetensors")), strict=False)
        assert not unexpected and all(k.startswith("roi_heads.mask_") for k in missing), (missing, unexpected)

    recipe = {"mask_steps": args.mask_steps, "lr": 0.02}
    return train_base(args, "maskrcnn", build, prepare, "roi_heads.mask_", recipe, masks=True)


def train_retinanet_base(args) -> dict:
    """The RetinaNet base: the Faster R-CNN base's backbone and FPN with a RetinaNet head trained
    on ``base_train``."""
    from retinanet_base import build

    recipe = {"head_steps": args.retinanet_steps, "optimizer": "AdamW", "lr": 0.001, "warmup": 50}
    return train_base(args, "retinanet", build, load_backbone(args), "head.", recipe, masks=False)


def train_fcos_base(args) -> dict:
    """The FCOS base: the Faster R-CNN base's backbone and FPN with an FCOS head trained on
    ``base_train``."""
    from fcos_base import build

    recipe = {"head_steps": args.fcos_steps, "optimizer": "AdamW", "lr": 0.001, "warmup": 50}
    return train_base(args, "fcos", build, load_backbone(args), "head.", recipe, masks=False)


def load_backbone(args):
    """A one-stage base's ``prepare``: loads the Faster R-CNN base's backbone and FPN (only the
    head is left to train)."""

    def prepare(model) -> None:
        weights = load_file(str(args.bench / "base.safetensors"))
        weights = {k: v for k, v in weights.items() if k.startswith("backbone.")}
        missing, unexpected = model.load_state_dict(weights, strict=False)
        assert not unexpected and all(k.startswith("head.") for k in missing), (missing, unexpected)

    return prepare


def train_base(args, name: str, build, prepare, trains: str, recipe: dict, masks: bool) -> dict:
    """A base of another family on the EmojiCOCO base's weights (``prepare`` loads them), where
    only the parameters whose names start with ``trains`` learn on ``base_train`` (the recipe's
    optimizer, SGD with momentum 0.9 unless it says AdamW, learning rate and linear warm-up, cosine
    to 0; batches of 8), BatchNorm frozen; saved as a
    detgraft checkpoint in ``$RUNS/{name}-base`` and reused. Returns its training record."""
    out = args.runs / f"{name}-base"
    if (out / "base.json").is_file():
        return json.loads((out / "base.json").read_text())
    start = time.perf_counter()
    model = build()
    prepare(model)
    card = detgraft.get_card(model)
    card.classes[:] = read_classes(args.bench / "base.json")
    card.builder = {"kind": "python", "file": str(HERE / f"{name}_base.py"), "function": "build", "kwargs": {}}
    freeze_batchnorm(model)
    for parameter_name, p in model.named_parameters():
        p.requires_grad_(parameter_name.startswith(trains))
    data = load_dataset(args.data / "base_train.json", args.data / "images")
    labels = {c["id"]: card.classes.index(c["name"]) for c in data.coco["categories"] if c["name"] in card.classes}
    examples = TrainingSet(data, labels, masks=masks)
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.get("optimizer") == "AdamW":
        optimizer = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=1e-4)
    else:
        optimizer = torch.optim.SGD(params, lr=recipe["lr"], momentum=0.9, weight_decay=1e-4)
    steps = recipe.get("mask_steps") or recipe["head_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / recipe.get("warmup", 1)) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    for step in range(steps):
        images, targets = examples.batch(step, 8, 0, True)
        losses = model(images, targets)
        loss = losses["loss_mask"] if masks else sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % 50 == 0:
            print(f"{name} step {step + 1}/{steps} loss={loss.item():.3f}", flush=True)
    model.eval()
    detgraft.save_checkpoint(model, out)
    record = recipe | {
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "command": shown(args, ["python", "benchmarks/families.py", *sys.argv[1:]]),
    }
    (out / "base.json").write_text(json.dumps(record, indent=1))
    return record


def score(folder: Path, test) -> dict:
    return score_model(detgraft.load_model(folder), test)


def score_model(model, test) -> dict:
    ev = evaluate(model, test, detections=detect(model, test))
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    new = set(detgraft.get_card(model).new_labels)
    old = [c for c in ev.classes if c.label not in new and c.name not in STEP1]
    row = {
        "old_ap": mean([c.ap for c in old]),
        "new_ap": mean([c.ap for c in ev.classes if c.label in new]),
        "old_on_new": sum(c.count for c in ev.confusions if c.new_class in STEP1),
    }
    if ev.mask_groups:
        row["old_mask_ap"] = round(ev.mask_groups["old"]["ap"], 4)
        row["new_mask_ap"] = round(ev.mask_groups["new"]["ap"], 4) if "new" in ev.mask_groups else None
    return row


CLAIMS = (0.5, 0.6, 0.7)  # the claim score of detgraft.heads.merge (0.5), and higher ones


def claims_on_val(args, name: str) -> list[dict]:
    """The step-1 model of ``name`` on val: merge off, then merged with each claim score of
    ``CLAIMS`` (the score a new detection needs to lower an old one): what the merge costs and
    gives, the way the default was chosen for Faster R-CNN (``benchmarks/arbitration.py``)."""
    from detgraft.heads import merge as arbitration

    val = load_dataset(args.data / "val.json", args.data / "images")
    base = score(args.runs / f"{name}-base", val)
    model_rows = []
    calibrated = arbitration._calibrated
    try:
        for claim in (None, *CLAIMS):
            arbitration._calibrated = with_claim(calibrated, claim or CLAIMS[0])
            model = detgraft.load_model(args.runs / f"{name}-all")
            if claim is None:
                model.merge_iou = None
            row = score_model(model, val)
            model_rows.append({"claim": claim, **row, "old_x_base": round(row["old_ap"] / base["old_ap"], 4)})
            print(name, "val", model_rows[-1], flush=True)
    finally:
        arbitration._calibrated = calibrated
    return [{"base_old_ap": base["old_ap"], "base_old_on_new": base["old_on_new"]}, *model_rows]


LR_GRID = (0.01, 0.02, 0.05)  # benchmarks/lr_grid.py's grid


def lr_grid_on_val(args, family: str, name: str) -> list[dict]:
    """Step 1 of ``name`` at each rate of ``LR_GRID`` (``--lr LR``; the default rate's run is
    ``$RUNS/{name}-all`` itself), scored on val: how the branch's ``lr`` of FCOS and RetinaNet
    (``detgraft.model.families``) was chosen
    (the best mean of old-class AP x base and new-class AP, as ``benchmarks/lr_grid.py`` chooses)."""
    val = load_dataset(args.data / "val.json", args.data / "images")
    base = score(args.runs / f"{name}-base", val)
    rows = []
    for lr in LR_GRID:
        default = lr == auto_lr("branch", by_name(family))
        out = args.runs / (f"{name}-all" if default else f"{name}-all-lr{lr}")
        flags = ["--base", str(args.runs / f"{name}-base")] + ([] if default else ["--lr", str(lr)])
        run = train(args, out, args.data / "new_train.json", flags)
        got = score(out, val)
        old = round(got["old_ap"] / base["old_ap"], 4)
        rows.append({"lr": lr, "default": default, "val_old_x_base": old, "val_new_ap": got["new_ap"],
                     "val_old_on_new": got["old_on_new"], "val_score": round((old + got["new_ap"]) / 2, 4),
                     "command": run["command"]})  # fmt: skip
        print(name, "lr", rows[-1], flush=True)
    return rows


BASES = {
    "mask_rcnn": ("maskrcnn", train_mask_rcnn_base),
    "fcos": ("fcos", train_fcos_base),
    "retinanet": ("retinanet", train_retinanet_base),
}
TITLES = {"mask_rcnn": "Mask R-CNN", "fcos": "FCOS", "retinanet": "RetinaNet"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, default=Path("../shared/bench"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/emoji-masks"), help="EmojiCOCO written with --masks")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/detgraft-families"))
    parser.add_argument("--families", nargs="+", choices=list(BASES), default=["mask_rcnn", "fcos"])
    parser.add_argument("--mask-steps", type=int, default=300)
    parser.add_argument("--fcos-steps", type=int, default=600)
    parser.add_argument("--retinanet-steps", type=int, default=800)
    parser.add_argument(
        "--claims", action="store_true", help="also the one-stage step 1 on val at other rates and claim scores"
    )
    parser.add_argument("--from-results", action="store_true", help="only write RESULTS.md's section from results.json")
    args = parser.parse_args()
    if args.from_results:
        return write_section("families", table(json.loads((HERE / "results.json").read_text())["families"]))
    args.bench, args.data, args.runs = args.bench.resolve(), args.data.resolve(), args.runs.resolve()
    args.runs.mkdir(parents=True, exist_ok=True)
    test = load_dataset(args.data / "test.json", args.data / "images")
    results = json.loads((HERE / "results.json").read_text())
    for family in args.families:
        name, train_base_of = BASES[family]
        base = train_base_of(args)
        step1 = train(
            args, args.runs / f"{name}-all", args.data / "new_train.json", ["--base", str(args.runs / f"{name}-base")]
        )
        row = {
            "base": base | score(args.runs / f"{name}-base", test),
            "step1": step1 | score(args.runs / f"{name}-all", test),
        }
        for part in ("base", "step1"):
            row[part].pop("final_losses", None)
            row[part].pop("arbitration", None)
        if args.claims and family != "mask_rcnn":
            row["lr_val"] = lr_grid_on_val(args, family, name)
            row["claims_val"] = claims_on_val(args, name)
        results.setdefault("families", {})[family] = row
        (HERE / "results.json").write_text(json.dumps(results, indent=1))
    write_section("families", table(results["families"]))
    print(table(results["families"]))


def table(rows: dict) -> str:
    lines = [
        "## Other detector families on EmojiCOCO (test)",
        "",
        "Command: `python benchmarks/families.py --bench ../shared/bench --data $DATA --runs $RUNS` ($DATA written "
        "with masks: `python ../shared/bench/emojicoco.py --masks --out $DATA`, the same images). Each base starts "
        "from the Faster R-CNN base's weights and trains only its own head on `base_train` (batches of 8; "
        "`benchmarks/maskrcnn_base.py`: its backbone, RPN and box head plus torchvision's mask head; "
        "`benchmarks/fcos_base.py` and `benchmarks/retinanet_base.py`: its backbone and FPN plus torchvision's FCOS "
        "or RetinaNet head, AdamW at 0.001). Step 1: `detgraft extend` with its defaults (`branch`).",
        "",
        "| model | old box AP (x base) | new box AP | old mask AP (x base) | new mask AP | old-on-new (cut) "
        "| train s | peak RSS MB | command |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for family, row in rows.items():
        b, s = row["base"], row["step1"]
        steps = b.get("mask_steps") or b.get("head_steps")
        learns = "mask head" if family == "mask_rcnn" else "head"
        cut = f"{1 - s['old_on_new'] / b['old_on_new']:.0%}" if b["old_on_new"] else "the base fires on none"
        mask = "old_mask_ap" in b
        lines += [
            f"| {TITLES[family]} base ({steps} steps, only the {learns} learns) | {b['old_ap']:.3f} | - "
            f"| {b['old_mask_ap']:.3f} | - | {b['old_on_new']} | {b['seconds']:.0f} | {b['peak_rss_mb']} "
            f"| `{b['command']}` |"
            if mask
            else f"| {TITLES[family]} base ({steps} steps, only the {learns} learns) | {b['old_ap']:.3f} | - | - | - "
            f"| {b['old_on_new']} | {b['seconds']:.0f} | {b['peak_rss_mb']} | `{b['command']}` |",
            f"| {TITLES[family]} step 1, default (`branch`) "
            f"| {s['old_ap']:.3f} ({s['old_ap'] / max(b['old_ap'], 1e-9):.3f}) "
            f"| {s['new_ap']:.3f} | "
            + (
                f"{s['old_mask_ap']:.3f} ({s['old_mask_ap'] / b['old_mask_ap']:.3f}) | {s['new_mask_ap']:.3f}"
                if mask
                else "- | -"
            )
            + f" | {s['old_on_new']} ({cut}) | {s['seconds']:.0f} | {s['peak_rss_mb']} | `{s['command']}` |",
        ]
    lines += [
        "",
        "Mask R-CNN: the branch trains a mask predictor of its own classes on the base's frozen mask head, where "
        "masks are given (at most 8 positives per batch, `detgraft.heads.rcnn.MASK_ROIS`; with 16, at commit "
        "999bd3a, the same command took 330 s and reached new mask AP 0.492, with the same box APs); old "
        "detections keep the base's masks. Step 1 trains with detgraft's Rust NMS and RoIAlign since commit "
        "7557aed (the same weights, bit for bit; 303 s before). FCOS and RetinaNet: the branch is a "
        "classification head of its own on the frozen FPN (`detgraft.heads.dense`), calibrated "
        "(`detgraft.calibrate`) on the base classification tower's features at the boxes.",
    ]
    for family, row in rows.items():
        if "lr_val" not in row:
            continue
        lines += [
            "",
            f"{TITLES[family]} step 1 on val at each learning rate (`--lr`; the rate with the best mean of old x base "
            "and new AP is the default, the branch's `lr` of FCOS and RetinaNet in `detgraft.model.families`): "
            "`python benchmarks/families.py --bench "
            f"../shared/bench --data $DATA --runs $RUNS --families {family} --claims`",
            "",
            "| lr | old AP x base | new AP | old-on-new | mean of the two APs | command |",
            "|---|---|---|---|---|---|",
        ]
        for r in row["lr_val"]:
            lr = f"{r['lr']} (default)" if r["default"] else r["lr"]
            lines.append(
                f"| {lr} | {r['val_old_x_base']:.3f} | {r['val_new_ap']:.3f} | {r['val_old_on_new']} "
                f"| {r['val_score']:.3f} | `{r['command']}` |"
            )
    for family, row in rows.items():
        if "claims_val" not in row:
            continue
        base, *variants = row["claims_val"]
        lines += [
            "",
            f"{TITLES[family]} step 1 on val (base old AP {base['base_old_ap']:.3f}, old-on-new "
            f"{base['base_old_on_new']}), merge off and at each claim score (the calibrated score a new detection "
            "needs to lower an old one; detgraft's: 0.6 for one-stage models, "
            "`detgraft.heads.merge.ONE_STAGE_CLAIM_SCORE`, chosen here; 0.5 for R-CNNs): "
            f"`python benchmarks/families.py --bench ../shared/bench --data $DATA --runs $RUNS --families {family} "
            "--claims`",
            "",
            "| merge | old AP x base | new AP | old-on-new |",
            "|---|---|---|---|",
        ]
        for v in variants:
            merge = "off" if v["claim"] is None else f"claim {v['claim']}"
            lines.append(f"| {merge} | {v['old_x_base']:.3f} | {v['new_ap']:.3f} | {v['old_on_new']} |")
    retina = rows.get("retinanet")
    if retina and retina["base"]["old_ap"] < 0.1:
        lines += [
            "",
            f"The RetinaNet base is too weak for its step-1 row to say much (old-class AP "
            f"{retina['base']['old_ap']:.3f} after {retina['base']['head_steps']} steps), and the branch trained on "
            "it (run before one-stage branches defaulted to `--lr 0.01`: at 0.05, the default of the time) from the "
            "zero-weight start reaches new AP "
            f"{retina['step1']['new_ap']:.3f}.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
