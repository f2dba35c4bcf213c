"""Lightning callbacks of tame-lit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from tame_lit.data import imagenet_class_names
from tame_lit.viz import overlay_grid, save_figure

__all__ = ["HeatmapGrid"]


class HeatmapGrid(L.Callback):
    """Each validation epoch, explain the first ``num_images`` validation images with the head being
    trained, save the overlay grid under ``<run>/heatmaps/`` and send it to the image-capable loggers
    (W&B, TensorBoard)."""

    def __init__(self, num_images: int = 8, columns: int = 4, dirname: str = "heatmaps") -> None:
        self.num_images = num_images
        self.columns = columns
        self.dirname = dirname
        self.last_path: Path | None = None

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        images = batch["images"][: self.num_images]
        if images.shape[0] == 0:
            return
        with torch.no_grad():
            maps = pl_module.explain(images)
            probs, classes = pl_module.backbone(images).float().softmax(dim=1).max(dim=1)
        names = imagenet_class_names() if pl_module.backbone.num_classes == 1000 else None
        titles = [f"{names[c] if names else c}: {p:.2f}" for c, p in zip(classes.tolist(), probs.tolist(), strict=True)]
        figure = overlay_grid(images.cpu(), maps.cpu(), titles, columns=self.columns)
        path = Path(trainer.default_root_dir) / self.dirname / f"epoch_{trainer.current_epoch:03d}.png"
        save_figure(figure, path)
        self.last_path = path
        for logger in trainer.loggers:
            if isinstance(logger, L.pytorch.loggers.WandbLogger):
                logger.log_image(key="val/heatmaps", images=[str(path)], step=trainer.global_step)
            elif isinstance(logger, L.pytorch.loggers.TensorBoardLogger):
                import numpy as np
                from PIL import Image

                pixels = np.asarray(Image.open(path).convert("RGB"))
                logger.experiment.add_image("val/heatmaps", pixels, trainer.global_step, dataformats="HWC")
