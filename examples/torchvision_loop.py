"""The training loop of torchvision's detection tutorial, with the three detgraft lines added.

    python examples/torchvision_loop.py --base runs/demo-base --train new.json --images DIR [--epochs 2]

Without arguments it draws the demo's shapes and trains the demo's base first (``detgraft demo``'s
data, small), so it runs offline anywhere. Everything below ``# --- the tutorial ---`` is the loop
of https://pytorch.org/tutorials/intermediate/torchvision_tutorial.html (its ``train_one_epoch``
written out, without the references/ helpers); the only detgraft lines are marked: two before the
loop, one after it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image

import detgraft
from detgraft.data.images import find_images


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-json detection set as the tutorial's PennFudanDataset returns it: (image, target)."""

    def __init__(self, annotations: str | Path, images: str | Path, label_of: dict[int, int]) -> None:
        coco = json.loads(Path(annotations).read_text())
        self.images, self.root, self.label_of = coco["images"], Path(images), label_of
        self.anns = {im["id"]: [] for im in self.images}
        for a in coco["annotations"]:
            self.anns[a["image_id"]].append(a)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        im = self.images[i]
        image = decode_image(str(self.root / im["file_name"]), mode=ImageReadMode.RGB).float() / 255
        anns = self.anns[im["id"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)  # fmt: skip
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        return image, {"boxes": boxes, "labels": labels}


def collate_fn(batch):
    return tuple(zip(*batch))


def demo_inputs(folder: Path) -> tuple[str, Path, Path]:
    from detgraft.demo import DemoSize, demo_base, make_shapes
    from detgraft.demo_model import BASE_SHAPES

    make_shapes(folder, "base_train", 24, BASE_SHAPES, BASE_SHAPES, seed=1)
    make_shapes(folder, "new_train", 16, BASE_SHAPES + ("star", "cross"), ("star", "cross"), seed=2)
    base = demo_base(folder, folder / "cache", DemoSize.quick())
    return str(base), folder / "new_train.json", folder / "images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="the detector (what detgraft.load_model accepts); default: the demo base")
    parser.add_argument("--train", help="COCO json labelling only the new classes")
    parser.add_argument("--images", help="folder of the json's file_names")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default="runs/torchvision_loop")
    parser.add_argument("--old-images", help="optional: images of the old classes (none of the new; no labels)")
    args = parser.parse_args()
    if args.base is None:
        args.base, args.train, args.images = demo_inputs(Path(tempfile.mkdtemp(prefix="detgraft-loop-")))

    model = detgraft.load_model(args.base)
    categories = json.loads(Path(args.train).read_text())["categories"]
    new_names = [c["name"] for c in categories]
    first_new = detgraft.get_card(model).num_classes
    dataset = CocoDetection(args.train, args.images, {c["id"]: first_new + i for i, c in enumerate(categories)})
    data_loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True, collate_fn=collate_fn)

    detgraft.expand_predictor(model, new_names)  # detgraft line 1: labels first_new, first_new + 1, ...
    model = detgraft.incremental(model, "branch")  # detgraft line 2: the base stays as it was

    # --- the tutorial ---
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.005, momentum=0.9, weight_decay=0.0005)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.1)
    num_epochs = args.epochs
    for epoch in range(num_epochs):
        model.train()
        for images, targets in data_loader:
            images = [image.to(device) for image in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            loss_dict = model(images, targets)
            losses = sum(loss for loss in loss_dict.values())
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
        lr_scheduler.step()
        print(f"epoch {epoch}: " + " ".join(f"{k}={v.item():.3f}" for k, v in loss_dict.items()))
    model.eval()
    with torch.no_grad():
        prediction = model([dataset[0][0].to(device)])[0]
    print("detections on the first image:", prediction["labels"].tolist())
    # --- end of the tutorial ---

    # detgraft line 3: learn from the training images who owns an object the base and the branch both claim
    # (and from images of the old classes, if you have some: the old objects it must keep)
    detgraft.calibrate(model, dataset, old_images=old_class_images(args.old_images))

    detgraft.save_checkpoint(model, args.out)
    print("saved", args.out)


def old_class_images(folder: str | None, most: int = 300):
    """Up to ``most`` images of ``folder`` (``detgraft.data.images.find_images``) as float tensors in 0..1 (none without
    a folder)."""
    if folder is None:
        return []
    return (decode_image(str(p), mode=ImageReadMode.RGB).float() / 255 for p in find_images(folder)[:most])


if __name__ == "__main__":
    main()
