"""``coco:PATH``: object detection / instance segmentation data in the COCO 2017 layout.

``PATH/annotations/instances_{train,val}2017.json`` and ``PATH/{train,val}2017/<file_name>``, read with
``torchvision.datasets.CocoDetection`` wrapped for transforms v2, so boxes and masks follow every flip.
Category ids (COCO's have gaps: 1..90 for 80 classes) become contiguous labels 1..C (0 is the detector's
background); ``DetectionSplits.category_ids`` maps them back for evaluation. Images without annotations stay
as negatives; crowd regions are left out of the training targets (COCOeval still reads them).

Checked before training, each error naming the file: a missing or unreadable annotation file, an image it
lists that is missing, a box with w <= 0 or h <= 0 (x2 <= x1 or y2 <= y1), an unknown category id. Images
that do not decode are skipped, counted and reported (as for classification folders).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import datasets, tv_tensors
from torchvision.transforms import v2

from ..train.data import DataSplits, _readable

SPLITS = ("train", "val")


@dataclass
class DetectionSplits(DataSplits):
    """``DataSplits`` + what evaluation needs: the validation ground truth (a pycocotools ``COCO``), and the
    category id of each label (``category_ids[label - 1]``) and its name."""

    val_coco: COCO | None = None
    category_ids: list[int] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)


class CocoInstances(Dataset):
    """(image (3, H, W) float in [0, 1], target) with target ``boxes`` (N, 4) xyxy ``BoundingBoxes``,
    ``labels`` (N,) contiguous 1..C, ``image_id``, and ``masks`` (N, H, W) uint8 when ``masks``."""

    def __init__(self, base: datasets.CocoDetection, masks: bool, train: bool):
        coco = base.coco
        keys = {"boxes", "labels", "image_id", "iscrowd", *(["masks"] if masks else [])}
        self.wrapped = datasets.wrap_dataset_for_transforms_v2(base, target_keys=keys)
        self.masks = masks
        self.label_of = {cat: i + 1 for i, cat in enumerate(sorted(coco.getCatIds()))}
        steps = [v2.ToImage(), *([v2.RandomHorizontalFlip()] if train else []), v2.ToDtype(torch.float32, scale=True)]
        self.transforms = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.wrapped)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image, target = self.wrapped[index]
        height, width = image.height, image.width
        if "boxes" not in target:  # an image without annotations: a negative
            target["boxes"] = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width))
            target["labels"] = torch.zeros(0, dtype=torch.int64)
            target["iscrowd"] = []
            if self.masks:
                target["masks"] = tv_tensors.Mask(torch.zeros(0, height, width, dtype=torch.uint8))
        keep = torch.tensor([not crowd for crowd in target.pop("iscrowd")], dtype=torch.bool)
        out = {"boxes": tv_tensors.wrap(target["boxes"][keep], like=target["boxes"]), "image_id": target["image_id"]}
        out["labels"] = torch.tensor([self.label_of[int(c)] for c in target["labels"][keep]], dtype=torch.int64)
        if self.masks:
            out["masks"] = tv_tensors.Mask(target["masks"][keep])
        return self.transforms(image, out)


def read_annotations(path: Path, images: Path) -> datasets.CocoDetection:
    """``CocoDetection`` over the annotation file (pycocotools' prints silenced); a clear error if absent."""
    if not path.is_file():
        raise ValueError(f"{path}: missing annotation file (expected the COCO 2017 layout)")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return datasets.CocoDetection(str(images), str(path))
    except Exception as error:  # json or structure errors: not a COCO annotation file
        raise ValueError(f"{path}: not a readable COCO annotation file ({type(error).__name__}: {error})") from error


def check_annotations(coco: COCO, path: Path, images: Path) -> tuple[list[int], int]:
    """(ids of the readable images, number of corrupt images); raises ``ValueError`` naming the file for a
    missing image, a malformed box or an unknown category."""
    categories = set(coco.getCatIds())
    for annotation in coco.dataset.get("annotations", []):
        w, h = annotation["bbox"][2:]
        name = coco.imgs.get(annotation["image_id"], {}).get("file_name", f"image id {annotation['image_id']}")
        if w <= 0 or h <= 0:
            raise ValueError(
                f"{path}: annotation {annotation['id']} of {name} has a malformed box [x, y, w, h] = "
                f"{annotation['bbox']} (x2 <= x1 or y2 <= y1)"
            )
        if annotation["category_id"] not in categories:
            raise ValueError(
                f"{path}: annotation {annotation['id']} of {name} has unknown category id "
                f"{annotation['category_id']} (categories: {sorted(categories)})"
            )
    good, corrupt = [], []
    for image_id in sorted(coco.imgs):
        file = images / coco.imgs[image_id]["file_name"]
        if not file.is_file():
            raise ValueError(f"{path}: lists image {file}, which is missing")
        (good if _readable(str(file)) else corrupt).append(image_id)
    if corrupt:
        names = [coco.imgs[i]["file_name"] for i in corrupt]
        warnings.warn(f"skipping {len(corrupt)} corrupt image(s) in {images}: {names[:3]}", stacklevel=2)
    if not good:
        raise ValueError(f"{path}: no readable images in {images}")
    return good, len(corrupt)


def load_coco(root: Path, masks: bool) -> DetectionSplits:
    """Train and validation splits of the COCO folder ``root`` (see the module docstring)."""
    if not root.is_dir():
        raise ValueError(f"coco:{root}: data folder does not exist")
    splits, corrupt, cocos = {}, 0, {}
    for split in SPLITS:
        annotations, images = root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017"
        base = read_annotations(annotations, images)
        base.ids, bad = check_annotations(base.coco, annotations, images)  # without corrupt images
        corrupt += bad
        cocos[split] = base.coco
        splits[split] = CocoInstances(base, masks, train=split == "train")
    category_ids = sorted(cocos["train"].getCatIds())
    if category_ids != sorted(cocos["val"].getCatIds()):
        raise ValueError(f"coco:{root}: train and val annotation files have different categories")
    names = [cocos["train"].cats[c]["name"] for c in category_ids]
    return DetectionSplits(
        splits["train"], splits["val"], len(category_ids), 3, corrupt, cocos["val"], category_ids, names
    )
