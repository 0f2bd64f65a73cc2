"""Object detection (``--masks``: + instance segmentation): torchvision's Faster / Mask R-CNN on the
``--model`` backbone + FPN, trained on the sum of torchvision's losses, evaluated with COCO box (and mask)
AP over the whole validation set."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..data.coco import DetectionSplits, load_coco
from ..models import create_detector, replace_convplus
from . import distributed, plots
from .config import TrainConfig
from .data import DataSplits, limited
from .dense import SHOWN, backbone_of, data_root
from .metrics import AP_NAMES, coco_ap, coco_results
from .tasks import CLASSIFICATION_ONLY, Task, refuse_settings

FORMS = "coco:PATH | synthetic:shapes"


def collate(batch: list) -> tuple[list, list]:
    """Images of different sizes stay a list (the detector batches them itself)."""
    return tuple(map(list, zip(*batch, strict=True)))


class DetectionTask(Task):
    name = "detection"
    val_keys = tuple(f"box_{n}" for n in AP_NAMES)
    best_key = "box_ap"
    curve = ("box_ap", "box AP (fraction)", (0.0, 1.0))
    collate = staticmethod(collate)

    def __init__(self, cfg: TrainConfig, data: DataSplits, device: torch.device):
        super().__init__(cfg, data, device)
        refuse_settings(cfg, *CLASSIFICATION_ONLY)
        losses = ["loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"]
        self.train_keys = ("loss", *losses, *(["loss_mask"] if cfg.masks else []))
        self.val_keys = DetectionTask.val_keys + (tuple(f"mask_{n}" for n in AP_NAMES) if cfg.masks else ())
        self.summary_keys = ("box_ap", "box_ap50", "box_ap75", *(["mask_ap"] if cfg.masks else []))

    @staticmethod
    def build_data(cfg: TrainConfig) -> DetectionSplits:
        return limited(
            load_coco(data_root(cfg, "coco", "coco", FORMS), cfg.masks), cfg.max_train_samples, cfg.max_val_samples
        )

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        kwargs = {"min_size": cfg.img_size, "max_size": round(cfg.img_size * 1333 / 800), **cfg.model_kwargs}
        if cfg.drop_path:
            kwargs["drop_path_rate"] = cfg.drop_path
        model = create_detector(cfg.model, self.data.num_classes, cfg.masks, cfg.pretrained_file, **kwargs)
        if cfg.replace_convplus:
            replace_convplus(backbone_of(model), stages=cfg.convplus_stages, **cfg.convplus_kwargs)
        return model

    def _to_device(self, images: list, targets: list) -> tuple[list, list]:
        images = [image.to(self.device) for image in images]
        targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        return images, targets

    def step(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        images, targets = self._to_device(*batch)
        with self.autocast():
            losses = model(images, targets)
        loss = sum(losses.values())
        n = len(images)
        return loss, {"loss": loss.item() * n, **{k: v.item() * n for k, v in losses.items()}, "n": n}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, ctx: distributed.Context) -> dict[str, float]:
        """COCO AP of the detections on every validation image (gathered from all ranks)."""
        model.eval()
        results, image_ids = [], []
        for batch in loader:
            images, targets = self._to_device(*batch)
            with self.autocast():
                outputs = model(images)
            for output, target in zip(outputs, targets, strict=True):
                output = {k: v.float() if v.is_floating_point() else v for k, v in output.items()}
                results += coco_results(output, target["image_id"], self.data.category_ids)
                image_ids.append(target["image_id"])
        gathered = distributed.all_gather_objects((results, image_ids), ctx)
        results = [r for rank_results, _ in gathered for r in rank_results]
        image_ids = [i for _, rank_ids in gathered for i in rank_ids]
        return coco_ap(self.data.val_coco, results, image_ids, self.cfg.masks)

    def inputs(self, count: int) -> list[torch.Tensor]:
        return [self.data.val[i][0].to(self.device) for i in range(min(count, len(self.data.val)))]

    @torch.no_grad()
    def plots(self, model: nn.Module, out: Path) -> dict[str, str]:
        """predictions.png: validation images with ground-truth boxes (and masks) beside the predicted ones
        (score >= 0.5)."""
        model.eval()
        names = ["background", *self.data.class_names]
        rows = []
        for image, prediction in zip(self.inputs(SHOWN), model(self.inputs(SHOWN)), strict=True):
            target = self.data.val[len(rows)][1]
            keep = prediction["scores"] >= 0.5
            shown = {k: v[keep] for k, v in prediction.items()}
            if "masks" in shown:
                shown["masks"] = shown["masks"][:, 0] > 0.5
            rows.append([_draw(image, target, names), _draw(image, shown, names)])
        path = plots.image_grid(rows, out / "predictions.png", ["ground truth", "prediction (score >= 0.5)"])
        return {"predictions": str(path)}


def _draw(image: torch.Tensor, target: dict, names: list[str]) -> torch.Tensor:
    """(3, H, W) uint8 image with the boxes (labelled) and masks of ``target``."""
    canvas = (image.cpu() * 255).to(torch.uint8)
    colors = [plots.palette(len(names))[int(label)] for label in target["labels"]]
    if len(colors) == 0:
        return canvas
    if "masks" in target:
        canvas = draw_segmentation_masks(canvas, target["masks"].cpu().bool(), 0.45, colors)
    labels = [names[int(label)] for label in target["labels"]]
    return draw_bounding_boxes(canvas, target["boxes"].cpu(), labels, colors, width=2)
