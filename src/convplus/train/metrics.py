"""Dense-task metrics: COCO box / mask AP (pycocotools' ``COCOeval``) and semantic-segmentation mIoU.

All values are fractions in [0, 1]. Both are computed over the whole validation set: detections are
gathered from every rank (``all_gather_object``), confusion matrices summed (``all_reduce``).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

AP_NAMES = ("ap", "ap50", "ap75", "aps", "apm", "apl")
"""The first six numbers of ``COCOeval.stats``: AP at IoU .50:.95, .50, .75; small, medium, large."""


def coco_results(output: dict[str, torch.Tensor], image_id: int, category_ids: list[int]) -> list[dict]:
    """One image's detections (torchvision format: ``boxes`` (N, 4) xyxy, ``labels`` (N,) 1..C, ``scores``,
    optionally ``masks`` (N, 1, H, W) probabilities) as COCO result dicts (xywh boxes, category ids,
    RLE masks of probability > 0.5)."""
    boxes = output["boxes"].detach().cpu().double()
    boxes[:, 2:] -= boxes[:, :2]
    results = [
        {"image_id": int(image_id), "category_id": category_ids[int(label) - 1], "bbox": box, "score": float(s)}
        for box, label, s in zip(boxes.tolist(), output["labels"].tolist(), output["scores"].tolist(), strict=True)
    ]
    if "masks" in output and len(results):
        binary = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for result, rle in zip(results, rles, strict=True):
            result["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    return results


def coco_ap(ground_truth: COCO, results: list[dict], image_ids: list[int], masks: bool = False) -> dict[str, float]:
    """``box_ap``, ``box_ap50``, ``box_ap75``, ``box_aps``, ``box_apm``, ``box_apl`` (and the same with
    ``mask_`` when ``masks``) of ``results`` on the images ``image_ids`` of ``ground_truth``. A size range
    without ground truth gives nan (COCOeval's -1); no detections at all give 0."""
    metrics = {}
    for kind in ("bbox", "segm") if masks else ("bbox",):
        prefix = "box" if kind == "bbox" else "mask"
        if not results:
            metrics.update({f"{prefix}_{name}": 0.0 for name in AP_NAMES})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = COCOeval(ground_truth, ground_truth.loadRes(results), kind)
            evaluator.params.imgIds = sorted(set(image_ids))
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for name, value in zip(AP_NAMES, evaluator.stats[:6], strict=True):
            metrics[f"{prefix}_{name}"] = float(value) if value >= 0 else float("nan")
    return metrics


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore: int = 255) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = true class, columns = predicted, over the pixels of
    ``pred`` / ``target`` (same shape, class indices) whose target is not ``ignore``."""
    valid = target != ignore
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_scores(matrix: torch.Tensor) -> dict[str, float | list[float]]:
    """``miou``: mean over classes present in labels or predictions (nan-mean, as mmsegmentation) of
    IoU = TP / (TP + FP + FN); ``pixel_acc``; ``iou``: per class (nan where a class never occurs)."""
    matrix = matrix.double()
    hits = matrix.diagonal()
    union = matrix.sum(0) + matrix.sum(1) - hits
    iou = torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, float("nan")))
    return {
        "miou": float(iou.nanmean()),
        "pixel_acc": float(hits.sum() / matrix.sum().clamp(min=1)),
        "iou": iou.tolist(),
    }
