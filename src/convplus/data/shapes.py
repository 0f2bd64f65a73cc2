"""``synthetic:shapes``: generated scenes of coloured shapes on textured backgrounds, written to disk in the
COCO 2017 and ADEChallengeData2016 layouts, so the real COCO / ADE20K loaders read them.

Each 128x128 RGB scene holds 2-6 shapes of 5 classes (circle, square, triangle, star, hexagon), 10-56 px
across, rotated, in random colours, painted in order so later shapes occlude earlier ones; an instance is
its visible part (kept if >= 40 px and >= 25% of the shape shows). Backgrounds are a colour gradient, a
sinusoidal grating of random orientation and period, and pixel noise. Deterministic per seed.

Layout under ``shapes_root(seed)`` (a cache folder, written once, atomically):

- ``coco/{train2017,val2017}/*.jpg`` and ``coco/annotations/instances_{train,val}2017.json`` (RLE masks
  from pycocotools, category ids 1..5);
- ``ade/images/{training,validation}/*.jpg`` and ``ade/annotations/{training,validation}/*.png`` (0 is
  unused, 1 = background, 2..6 = the shape classes in the order above).

Card: docs/datasets/shapes.md.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

CLASSES = ("circle", "square", "triangle", "star", "hexagon")
IMAGE_SIZE = 128
SIZES = {"train": 400, "val": 100}
SPLITS = {"train": ("train2017", "training"), "val": ("val2017", "validation")}
VERSION = 1  # bump when the generator changes: the cache folder name carries it


def _polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a regular shape (a star alternates outer and inner radius)."""
    corners = {"square": 4, "triangle": 3, "star": 10, "hexagon": 6}[kind]
    points = []
    for i in range(corners):
        r = radius * (0.45 if kind == "star" and i % 2 else 1.0)
        theta = angle + 2 * np.pi * i / corners
        points.append((cx + r * np.cos(theta), cy + r * np.sin(theta)))
    return points


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float in [0, 255]: gradient + grating + noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = rng.uniform(0, 255, (2, 3))
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(direction) * xx + np.sin(direction) * yy)[..., None]
    image = a + (b - a) * (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
    theta, period = rng.uniform(0, np.pi), rng.uniform(4, 16)
    grating = np.sin(2 * np.pi * (np.cos(theta) * xx + np.sin(theta) * yy) * size / period)
    image += rng.uniform(10, 40) * grating[..., None] + rng.normal(0, 8, (size, size, 3))
    return image


def render_scene(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One scene: (size, size, 3) uint8 image and its instances [(class index, (size, size) bool visible mask)]."""
    image = _background(rng, size)
    shapes = []
    for _ in range(rng.integers(2, 7)):
        label = int(rng.integers(len(CLASSES)))
        radius = rng.uniform(5, 28)
        cx, cy = rng.uniform(radius * 0.5, size - radius * 0.5, 2)
        canvas = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        if CLASSES[label] == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=1)
        else:
            draw.polygon(_polygon(CLASSES[label], cx, cy, radius, rng.uniform(0, 2 * np.pi)), fill=1)
        full = np.asarray(canvas, dtype=bool)
        colour = rng.uniform(0, 255, 3)
        image[full] = colour + rng.normal(0, 6, (full.sum(), 3))
        shapes.append((label, full))
    instances, covered = [], np.zeros((size, size), dtype=bool)
    for label, full in reversed(shapes):  # from the top: what later shapes cover is hidden
        visible = full & ~covered
        covered |= full
        if visible.sum() >= 40 and visible.sum() >= 0.25 * full.sum():
            instances.append((label, visible))
    return np.clip(image, 0, 255).astype(np.uint8), instances[::-1]


def _annotation(index: int, image_id: int, label: int, visible: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    ys, xs = np.nonzero(visible)
    x0, y0 = int(xs.min()), int(ys.min())
    return {
        "id": index,
        "image_id": image_id,
        "category_id": label + 1,
        "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
        "area": int(visible.sum()),
        "iscrowd": 0,
        "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
    }


def write_shapes(root: Path, seed: int, sizes: dict[str, int] = SIZES, size: int = IMAGE_SIZE) -> Path:
    """Generate the dataset into ``root`` (both layouts, see the module docstring); returns ``root``."""
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    annotation_id = 1
    for split, count in sizes.items():
        coco_folder, ade_folder = SPLITS[split]
        rng = np.random.default_rng([seed, list(SPLITS).index(split), 7])
        folders = [root / "coco" / coco_folder, root / "ade" / "images" / ade_folder]
        labels_folder = root / "ade" / "annotations" / ade_folder
        for folder in [*folders, labels_folder, root / "coco" / "annotations"]:
            folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            image, instances = render_scene(rng, size)
            name = f"{image_id:08d}"
            for folder in folders:
                Image.fromarray(image).save(folder / f"{name}.jpg", quality=95)
            semantic = np.ones((size, size), dtype=np.uint8)  # 1 = background
            for label, visible in instances:
                semantic[visible] = label + 2
                annotations.append(_annotation(annotation_id, image_id, label, visible))
                annotation_id += 1
            Image.fromarray(semantic).save(labels_folder / f"{name}.png")
            images.append({"id": image_id, "file_name": f"{name}.jpg", "width": size, "height": size})
        document = {"images": images, "annotations": annotations, "categories": categories}
        (root / "coco" / "annotations" / f"instances_{coco_folder}.json").write_text(json.dumps(document))
    return root


def cache_folder() -> Path:
    """Where generated datasets live: ``$CONVPLUS_CACHE`` or ``$XDG_CACHE_HOME/convplus`` (~/.cache/convplus)."""
    if os.environ.get("CONVPLUS_CACHE"):
        return Path(os.environ["CONVPLUS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "convplus"


def shapes_root(seed: int = 0) -> Path:
    """The dataset for ``seed``, generated on first use (in a temporary folder renamed into place, so
    concurrent processes never see half a dataset)."""
    root = cache_folder() / f"shapes-v{VERSION}-seed{seed}"
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        write_shapes(tmp, seed)
        tmp.rename(root)
    except OSError:
        if not root.is_dir():  # not another process that finished first: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
