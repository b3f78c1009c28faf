"""The ``sizes`` section of ``benchmarks/RESULTS.md`` from ``results.json`` (written by ``sizes.py``)."""

SIZES = (10, 30, 50)  # images per new class of the few-data rows (three draws each)


def table(results: dict) -> str:
    s = results["sizes"]
    base_ap, base_on = s["base_old_ap"], s["base_old_on_new"]
    before = s.get("every_step_seconds", {})  # the frozen base computed in every step (before issue 29)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    spread = lambda xs, f=".3f": f"{mean(xs):{f}} ({min(xs):{f}}-{max(xs):{f}})" if len(xs) > 1 else f"{xs[0]:{f}}"  # noqa: E731
    lines = [
        "## The default (`branch`) at every data size, EmojiCOCO test",
        "",
        "Command: `python benchmarks/sizes.py --bench ../shared/bench --data $DATA --runs $RUNS` ($DATA: "
        "`../shared/bench/emojicoco.py --out $DATA`). Each training row is `detgraft extend` with its defaults "
        "(`--steps auto`, arbitration calibrated on the training images, below 200 images with their mirror images "
        "too), in its own process on this 2-core "
        "machine; 10/30/50 images per class: mean over 3 fixed draws of `new_train` (range in brackets; old x base "
        "to 4 decimals, so that a mean below 1.00 shows). Base: "
        f"old-class AP {base_ap:.3f}; old classes fire on {base_on} chicken/frog objects. Merge off: draw 0's model "
        "with `merge_iou` None (the base's detections untouched, its false alarms included).",
        "",
        "| images per class | old AP x base | new AP | old-on-new (cut) | steps | train s | train s before issue 29 "
        "| peak RSS MB | merge off (draw 0): old x base / new AP / old-on-new |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in (*map(str, SIZES), "all"):
        r = s[k]
        off = r["merge_off"]
        ratio = [a / base_ap for a in r["old_ap"]]
        on = mean(r["old_on_new"])
        lines.append(
            f"| {k} | {spread(ratio, '.4f')} | {spread(r['new_ap'])} | {on:.1f} ({1 - on / base_on:.1%}) | "
            f"{'/'.join(map(str, sorted(set(r['steps']))))} | {spread(r['seconds'], '.0f')} | "
            f"{spread(before[k], '.0f') if k in before else ''} | {r['peak_rss_mb']} | "
            f"{off['old_ap'] / base_ap:.3f} / {off['new_ap']:.3f} / {off['old_on_new']} |"
        )
    lines += ["", "Commands, in the order of the rows:", ""]
    lines += [f"- `{c}`" for k in (*map(str, SIZES), "all") for c in s[k]["commands"]]
    if s.get("old_images"):
        lines += [
            "",
            "With images of the old classes: the same runs with `--old-images $DATA/old_images` (links to "
            "`base_train`'s 4000 images, which show base classes only, as COCO images do for a COCO model; `extend` "
            "reads 300 of them, evenly spaced, no labels; `python benchmarks/sizes.py --bench ../shared/bench --data "
            "$DATA --runs $RUNS --old-images $DATA/old_images --old-images-only`, after `--link-old-images`). The "
            "trained weights are the default runs' bit for bit; only the arbitration's old memory differs.",
            "",
            "| images per class | old AP x base | new AP | old-on-new (cut) | train s |",
            "|---|---|---|---|---|",
        ]
        for k, r in s["old_images"].items():
            ratio = [a / base_ap for a in r["old_ap"]]
            on = mean(r["old_on_new"])
            lines.append(
                f"| {k} | {spread(ratio, '.4f')} | {spread(r['new_ap'])} | {on:.1f} ({1 - on / base_on:.1%}) | "
                f"{spread(r['seconds'], '.0f')} |"
            )
        lines += ["", "Their commands:", ""]
        lines += [f"- `{c}`" for r in s["old_images"].values() for c in r["commands"]]
    cap = dict(s.get("step_cap_val", {}))
    if cap:
        base_val = cap.pop("base_old_ap")
        lines += [
            "",
            "The cap of `--steps auto` (it binds with all images), chosen on val: "
            + "; ".join(
                f"{steps} steps: old x base {r['old_ap'] / base_val:.3f}, new AP {r['new_ap']:.3f}, old-on-new "
                f"{r['old_on_new']}, {r['seconds']:.0f} s (`{r['command']}`)"
                for steps, r in cap.items()
            )
            + ".",
        ]
    if s.get("others"):
        lines += [
            "",
            "Other strategies on draw 0 of each size (`python benchmarks/sizes.py --bench ../shared/bench --data $DATA "
            f"--runs $RUNS --others {' '.join(s['others'])}`), trained the same way (`--strategy`, otherwise the "
            "defaults, `--steps auto`; their learning rates are the defaults; at 10 per class each strategy's rate "
            "chosen on val is in section `lr_grid`). Cells: old x base / "
            "new AP / old-on-new / train s.",
            "",
            "| strategy | " + " | ".join(f"{k} per class" for k in map(str, SIZES)) + " |",
            "|---|" + "---|" * len(SIZES),
        ]
        cell = lambda r: f"{r['old_ap'] / base_ap:.3f} / {r['new_ap']:.3f} / {r['old_on_new']} / {r['seconds']:.0f}"  # noqa: E731
        keys = ("old_ap", "new_ap", "old_on_new", "seconds")
        draw0 = {k: {key: s[k][key][0] for key in keys} for k in map(str, SIZES)}
        lines.append("| branch (the default) | " + " | ".join(cell(draw0[k]) for k in map(str, SIZES)) + " |")
        lines.append(
            "| branch, merge off | "
            + " | ".join(cell(s[k]["merge_off"] | {"seconds": draw0[k]["seconds"]}) for k in map(str, SIZES))
            + " |"
        )
        for strategy, rows in s["others"].items():
            cells = (cell(rows[k]) if k in rows else "not run" for k in map(str, SIZES))
            lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
        lines += ["", "Their commands:", ""]
        lines += [f"- `{r['command']}`" for rows in s["others"].values() for r in rows.values()]
    st = results["step2"]["branch"]
    base2, off2 = s["base_old_on_new_step2"], st["merge_off"]
    before_step2 = before.get("step2")
    lines += [
        "",
        "| step 2 (duck, turtle, penguin on the all-data model) | old x base | step-1 AP | step-2 AP | old-on-new "
        "(cut) | train s | merge off: old x base / step-2 AP / old-on-new | command |",
        "|---|---|---|---|---|---|---|---|",
        f"| branch | {st['old_ap'] / base_ap:.3f} | {st['step1_ap']:.3f} | {st['new_ap']:.3f} | {st['old_on_new']} "
        f"({1 - st['old_on_new'] / max(base2, 1):.0%} of the base's {base2}) | {st['seconds']:.0f}"
        f"{f' ({before_step2:.0f} before issue 29)' if before_step2 else ''} | "
        f"{off2['old_ap'] / base_ap:.3f} / {off2['new_ap']:.3f} / {off2['old_on_new']} "
        f"| `{st['command']}` |",
    ]
    return "\n".join(lines)
