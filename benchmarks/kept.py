"""The frozen base computed once per training example (``detgraft.kept``, issue 29) against every
step computing it, on EmojiCOCO and on torchvision's ResNet-50 FPN Faster R-CNN at 800 px.

    python benchmarks/kept.py --bench ../shared/bench --data $DATA --runs $RUNS

1. EmojiCOCO, 10 images per class (draw 0 of ``benchmarks/sizes.py``): ``detgraft extend`` with its
   defaults, and the same command with ``--frozen-memory 0`` (every step computes the whole model, as
   before): seconds and peak memory of each (from its extend.json), the largest difference of the
   trained weights (relative to each tensor's largest value), and old AP / new AP / old-on-new on
   test of both.
2. ``fasterrcnn_resnet50_fpn`` (torchvision's architecture with seeded random weights, scaled on
   four training images as trained ones are, written to $RUNS: COCO's cannot be downloaded here)
   at torchvision's default 800 px, the same 17 images: the default command from start to
   checkpoint (kept). Computing the base in every step takes about half a minute a step there, so
   the whole default run of 150 steps that way is not run: the same command with ``--steps 10
   --frozen-memory 0`` runs, and the default run without kept features is estimated from its
   10-step run as its phases (extend.json ``phases``) with the steps' time times 15.

Writes the ``kept`` section of RESULTS.md and ``kept`` in results.json. Finished runs in $RUNS are
reused (delete a folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file, save_file
from torchvision.ops.misc import FrozenBatchNorm2d

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402
from sizes import STEP1, bench_base, draw, score, train  # noqa: E402

import detgraft  # noqa: E402
from detgraft.data.dataset import load_dataset  # noqa: E402
from detgraft.data.images import load_image  # noqa: E402

HERE = Path(__file__).parent


def weight_difference(a: Path, b: Path) -> tuple[float, str]:
    """The largest |a - b| over the tensor's largest |b|, and its tensor, over two checkpoints."""
    sa, sb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    worst = (0.0, "")
    for k, v in sa.items():
        if v.is_floating_point() and v.numel():
            d = (v.double() - sb[k].double()).abs().max().item() / max(sb[k].abs().max().item(), 1e-12)
            worst = max(worst, (d, k))
    return worst


def r50_weights(runs: Path, data: Path) -> Path:
    """torchvision's ``fasterrcnn_resnet50_fpn`` with seeded random weights, scaled on four EmojiCOCO
    training images so that the feature maps have the scale trained ones have: each frozen BatchNorm
    normalises what the layers before it give those images, and each FPN convolution is divided by
    its output's standard deviation (left as torchvision initialises them, BatchNorm is the identity,
    the FPN maps' standard deviation is about 20 and the box losses overflow at the default learning
    rate)."""
    path = runs / "r50_random.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
        train = load_dataset(data / "new_train.json", data / "images")
        images, _ = model.transform([load_image(train.path(image)).float() / 255 for image in train.coco["images"][:4]])

        def normalise(module, args):
            x = args[0]
            module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
            module.running_var.copy_(x.var(dim=(0, 2, 3)))

        def unit(conv, args, out):
            std = out.std()
            conv.weight /= std
            conv.bias /= std
            return out / std

        norms = [m for m in model.backbone.body.modules() if isinstance(m, FrozenBatchNorm2d)]
        convs = [m for m in model.backbone.fpn.modules() if isinstance(m, torch.nn.Conv2d)]
        hooks = [m.register_forward_pre_hook(normalise) for m in norms] + [m.register_forward_hook(unit) for m in convs]
        with torch.no_grad():
            model.backbone(images.tensors)
        for hook in hooks:
            hook.remove()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def estimated(ten_steps: dict, steps: int) -> float:
    """A run's seconds with ``steps`` steps, from its run of 10: its steps' time scaled."""
    phases = ten_steps["phases"]
    return ten_steps["seconds"] + phases["steps"] * (steps / ten_steps["steps"] - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, default=Path("../shared/bench"))
    parser.add_argument("--data", type=Path, default=Path("/tmp/emojicoco"))
    parser.add_argument("--runs", type=Path, default=Path("/tmp/detgraft-sizes"))
    parser.add_argument("--emojicoco-only", action="store_true", help="part 1 only")
    parser.add_argument("--from-results", action="store_true", help="only write RESULTS.md's section from results.json")
    args = parser.parse_args()
    if args.from_results:
        return write_section("kept", table(json.loads((HERE / "results.json").read_text())["kept"], args))
    args.bench, args.data, args.runs = args.bench.resolve(), args.data.resolve(), args.runs.resolve()
    args.runs.mkdir(parents=True, exist_ok=True)
    b = args.bench
    base_args = bench_base(b)
    ten = draw(args.data, 10, 0)

    # 1. EmojiCOCO 10 per class, both ways
    kept = train(args, args.runs / "kept-k10-draw0", ten, base_args)
    every = train(args, args.runs / "every-k10-draw0", ten, base_args, ("--frozen-memory", "0"))
    test = load_dataset(args.data / "test.json", args.data / "images")
    emoji = {}
    for name, run in (("kept", kept), ("every_step", every)):
        model = detgraft.load_model(args.runs / f"{name.replace('_step', '')}-k10-draw0")
        emoji[name] = score(model, test, STEP1) | {k: run[k] for k in ("seconds", "peak_rss_mb", "phases", "command")}
    difference, tensor = weight_difference(args.runs / "kept-k10-draw0", args.runs / "every-k10-draw0")
    emoji["weight_difference"] = {"relative": difference, "tensor": tensor}
    # all of new_train, both ways, one after the other (sizes.py scores the default run)
    runs = {
        "kept": train(args, args.runs / "kept-all", args.data / "new_train.json", base_args),
        "every_step": train(
            args, args.runs / "every-all", args.data / "new_train.json", base_args, ("--frozen-memory", "0")
        ),
    }
    emoji_all = {
        k: {key: run[key] for key in ("seconds", "peak_rss_mb", "phases", "command")} for k, run in runs.items()
    }
    difference, tensor = weight_difference(args.runs / "kept-all", args.runs / "every-all")
    emoji_all["weight_difference"] = {"relative": difference, "tensor": tensor}

    results = json.loads((HERE / "results.json").read_text())
    if args.emojicoco_only:
        results["kept"] = {"emojicoco_10": emoji, "emojicoco_all": emoji_all}
        (HERE / "results.json").write_text(json.dumps(results, indent=1))
        write_section("kept", table(results["kept"], args))
        return print(table(results["kept"], args))

    # 2. ResNet-50 FPN at 800 px
    weights = r50_weights(args.runs, args.data)
    r50 = ["--base", "fasterrcnn_resnet50_fpn", "--weights", str(weights), "--classes", f"{b}/base.json"]
    r50_runs = {
        "kept": train(args, args.runs / "r50-kept", ten, r50),
        "every_step_10_steps": train(
            args, args.runs / "r50-every-10steps", ten, r50, ("--steps", "10", "--frozen-memory", "0")
        ),
    }
    resnet = {
        k: {key: run[key] for key in ("seconds", "peak_rss_mb", "steps", "phases", "command")}
        for k, run in r50_runs.items()
    }
    resnet["every_step_estimated_seconds"] = round(
        estimated(r50_runs["every_step_10_steps"], r50_runs["kept"]["steps"]), 1
    )

    results = json.loads((HERE / "results.json").read_text())
    results["kept"] = {"emojicoco_10": emoji, "emojicoco_all": emoji_all, "resnet50_fpn_800": resnet}
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    write_section("kept", table(results["kept"], args))
    print(table(results["kept"], args))


def table(k: dict, args) -> str:
    e, r = k["emojicoco_10"], k.get("resnet50_fpn_800")
    phases = lambda run: " / ".join(f"{run['phases'][p]:.0f}" for p in ("frozen_pass", "steps", "calibrate"))  # noqa: E731
    lines = [
        "## The frozen base once per image (issue 29)",
        "",
        "Command: `python benchmarks/kept.py --bench ../shared/bench --data $DATA --runs $RUNS"
        f"{'' if r else ' --emojicoco-only'}`. Each run is "
        "`detgraft extend` in its own process on this 2-core machine (the "
        "command beside it); seconds from the command to the checkpoint as extend.json records them, with its "
        "phases: computing the frozen base once per training example (0 when every step computes it) / the "
        "training steps / calibration. `--frozen-memory 0` computes the whole model in every step, as before.",
        "",
        "| run | seconds | phases s | peak RSS MB | old AP | new AP | old-on-new | command |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for name in ("kept", "every_step"):
        run, label = e[name], "kept (default)" if name == "kept" else "every step"
        lines.append(
            f"| EmojiCOCO 10/class draw 0, {label} | {run['seconds']:.0f} | "
            f"{phases(run)} | {run['peak_rss_mb']} | {run['old_ap']:.4f} | {run['new_ap']:.4f} | {run['old_on_new']} | "
            f"`{run['command']}` |"
        )
    for name in ("kept", "every_step") if "emojicoco_all" in k else ():
        run, label = k["emojicoco_all"][name], "kept (default)" if name == "kept" else "every step"
        lines.append(
            f"| EmojiCOCO all of new_train, {label} | {run['seconds']:.0f} | {phases(run)} | {run['peak_rss_mb']} "
            f"| | | | `{run['command']}` |"
        )
    resnet_rows = (("kept", "default (150 steps), kept"), ("every_step_10_steps", "10 steps, every step"))
    for name, label in resnet_rows if r else ():
        run = r[name]
        lines.append(
            f"| ResNet-50 FPN 800 px, {label} | {run['seconds']:.0f} | {phases(run)} | {run['peak_rss_mb']} | | | | "
            f"`{run['command']}` |"
        )

    def same(w: dict) -> str:
        if w["relative"] == 0:
            return "are bit-identical"
        return f"differ by at most {w['relative']:.1e} of a tensor's largest value (`{w['tensor']}`): float rounding"

    lines += [
        "",
        f"EmojiCOCO 10/class: the two runs' trained weights {same(e['weight_difference'])}; so are their test scores.",
    ]
    if "emojicoco_all" in k:
        a = k["emojicoco_all"]
        lines += [
            f"EmojiCOCO all data: the two runs' trained weights {same(a['weight_difference'])}; kept / every step "
            f"= {a['kept']['seconds'] / a['every_step']['seconds']:.2f} in this run (its test scores: section `sizes`)."
        ]
    if not r:
        return "\n".join(lines)
    kept, every = r["kept"], r["every_step_10_steps"]
    lines += [
        "ResNet-50 FPN: a training step takes "
        f"{kept['phases']['steps'] / kept['steps']:.1f} s with the base kept and "
        f"{every['phases']['steps'] / every['steps']:.1f} s computing it; the default run computing the base in every "
        f"step is estimated at {r['every_step_estimated_seconds']:.0f} s (its 10-step run with the steps' time scaled "
        f"to {kept['steps']} steps), against the kept run's measured {kept['seconds']:.0f} s.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
