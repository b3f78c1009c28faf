"""Mask R-CNN on EmojiCOCO: a base, then step 1 (chicken, frog) with the default strategy.

    python benchmarks/families.py --bench ../shared/bench --data $DATA --runs $RUNS
    ($DATA written with masks: python ../shared/bench/emojicoco.py --masks --out $DATA, the same images)

The base (``benchmarks/maskrcnn_base.py``) is the EmojiCOCO Faster R-CNN base's backbone, RPN and
box head, with their weights and BatchNorm frozen, plus torchvision's mask head trained on
``base_train``'s masks for ``--mask-steps`` steps of 8 images (SGD 0.02, momentum 0.9, cosine; only
the mask head learns), saved as a detgraft checkpoint in ``$RUNS/maskrcnn-base`` and reused. Step 1
is ``detgraft extend`` with its defaults in its own process. Both are scored on ``test``: box AP
(old, new), mask AP (old, new) and old-on-new. Writes the ``families`` section of RESULTS.md and
``families`` in results.json.
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
from sizes import STEP1, shown, train  # noqa: E402

import detgraft  # noqa: E402
from detgraft.evaluate import detect, evaluate, load_dataset  # noqa: E402
from detgraft.incremental import freeze_batchnorm  # noqa: E402
from detgraft.loading import _read_classes  # noqa: E402
from detgraft.training_data import TrainingSet  # noqa: E402

HERE = Path(__file__).parent


def train_base(args) -> dict:
    """The Mask R-CNN base (see the module doc); returns its training record."""
    out = args.runs / "maskrcnn-base"
    if (out / "base.json").is_file():
        return json.loads((out / "base.json").read_text())
    from maskrcnn_base import build

    start = time.perf_counter()
    model = build()
    missing, unexpected = model.load_state_dict(load_file(str(args.bench / "base.safetensors")), strict=False)
    assert not unexpected and all(k.startswith("roi_heads.mask_") for k in missing), (missing, unexpected)
    card = detgraft.get_card(model)
    card.classes[:] = _read_classes(args.bench / "base.json")
    card.builder = {"kind": "python", "file": str(HERE / "maskrcnn_base.py"), "function": "build", "kwargs": {}}
    freeze_batchnorm(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("roi_heads.mask_"))
    data = load_dataset(args.data / "base_train.json", args.data / "images")
    labels = {c["id"]: card.classes.index(c["name"]) for c in data.coco["categories"] if c["name"] in card.classes}
    examples = TrainingSet(data, labels, masks=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=1e-4)
    steps = args.mask_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for step in range(steps):
        images, targets = examples.batch(step, 8, 0, True)
        loss = model(images, targets)["loss_mask"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % 50 == 0:
            print(f"mask head step {step + 1}/{steps} loss_mask={loss.item():.3f}", flush=True)
    model.eval()
    detgraft.save_checkpoint(model, out)
    record = {
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "mask_steps": steps,
        "command": shown(args, ["python", "benchmarks/families.py", *sys.argv[1:]]),
    }
    (out / "base.json").write_text(json.dumps(record, indent=1))
    return record


def score(folder: Path, test) -> dict:
    model = detgraft.load_model(folder)
    ev = evaluate(model, test, detections=detect(model, test))
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    new = set(detgraft.get_card(model).new_labels)
    old = [c for c in ev.classes if c.label not in new and c.name not in STEP1]
    return {
        "old_ap": mean([c.ap for c in old]),
        "new_ap": mean([c.ap for c in ev.classes if c.label in new]),
        "old_mask_ap": round(ev.mask_groups["old"]["ap"], 4),
        "new_mask_ap": round(ev.mask_groups["new"]["ap"], 4) if "new" in ev.mask_groups else None,
        "old_on_new": sum(c.count for c in ev.confusions if c.new_class in STEP1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, default=Path("../shared/bench"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/emoji-masks"), help="EmojiCOCO written with --masks")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/detgraft-families"))
    parser.add_argument("--mask-steps", type=int, default=300)
    parser.add_argument("--from-results", action="store_true", help="only write RESULTS.md's section from results.json")
    args = parser.parse_args()
    if args.from_results:
        return write_section(
            "families", table(json.loads((HERE / "results.json").read_text())["families"]["mask_rcnn"])
        )
    args.bench, args.data, args.runs = args.bench.resolve(), args.data.resolve(), args.runs.resolve()
    args.runs.mkdir(parents=True, exist_ok=True)
    base = train_base(args)
    step1 = train(
        args, args.runs / "maskrcnn-all", args.data / "new_train.json", ["--base", str(args.runs / "maskrcnn-base")]
    )
    test = load_dataset(args.data / "test.json", args.data / "images")
    row = {
        "base": base | score(args.runs / "maskrcnn-base", test),
        "step1": step1 | score(args.runs / "maskrcnn-all", test),
    }
    for part in ("base", "step1"):
        row[part].pop("final_losses", None)
        row[part].pop("arbitration", None)
    results = json.loads((HERE / "results.json").read_text())
    results["families"] = {"mask_rcnn": row}
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    write_section("families", table(row))
    print(table(row))


def table(row: dict) -> str:
    b, s = row["base"], row["step1"]
    cut = 1 - s["old_on_new"] / max(b["old_on_new"], 1)
    return "\n".join(
        [
            "## Mask R-CNN on EmojiCOCO (test)",
            "",
            "Command: `python benchmarks/families.py --bench ../shared/bench --data $DATA --runs $RUNS` ($DATA written "
            "with masks: `python ../shared/bench/emojicoco.py --masks --out $DATA`, the same images). Base: the "
            "Faster R-CNN base's backbone, RPN "
            f"and box head with torchvision's mask head trained on `base_train` ({b['mask_steps']} steps of 8, only "
            f"the mask head learns; {b['seconds']:.0f} s). Step 1: `detgraft extend` with its defaults.",
            "",
            "| model | old box AP (x base) | new box AP | old mask AP (x base) | new mask AP | old-on-new (cut) "
            "| train s | peak RSS MB | command |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| base | {b['old_ap']:.3f} | - | {b['old_mask_ap']:.3f} | - | {b['old_on_new']} | {b['seconds']:.0f} "
            f"| {b['peak_rss_mb']} | `{b['command']}` |",
            f"| step 1, default (`branch`) | {s['old_ap']:.3f} ({s['old_ap'] / b['old_ap']:.3f}) | {s['new_ap']:.3f} "
            f"| {s['old_mask_ap']:.3f} ({s['old_mask_ap'] / b['old_mask_ap']:.3f}) | {s['new_mask_ap']:.3f} "
            f"| {s['old_on_new']} ({cut:.0%}) | {s['seconds']:.0f} | {s['peak_rss_mb']} | `{s['command']}` |",
            "",
            "New-class masks come from the mask channel `expand_predictor` adds (the mean old mask): `branch` "
            "does not yet train a mask branch.",
        ]
    )


if __name__ == "__main__":
    main()
