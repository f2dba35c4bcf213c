"""The known-answer benchmark: does an explanation of a model point at what decides its output?

A tiny classifier (a ViT or a CNN, ``TINY_CLASSIFIERS``) learns ``ObjectPositionImages`` in seconds on a CPU: the
position of a small red square among clutter decides the class, so a faithful explanation of the model's decision
peaks on the square. The same methods on the untrained classifier (random weights) must not: a method that points
at the square there reads the image, not the model. Each method is scored by the pointing game on held-out images
(the map's peak within ``tolerance`` pixels of the square: half a cell of the tiny models' 8 x 8 maps), with a
Wilson 95 % interval. ``benchmarks/known_answer.py`` prints the table; tests/test_known_answer.py holds the ViT's
acceptance figures.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from tame_lit import backbones, explainers
from tame_lit.data.images import collate
from tame_lit.data.synthetic import CLASSES, ObjectPositionImages
from tame_lit.explainers import HeadExplainer
from tame_lit.metrics.base import ScoredBatch
from tame_lit.metrics.pointing import PointingGame
from tame_lit.statistics import share_interval
from tame_lit.training import HeadTrainingModule

__all__ = [
    "TINY_CLASSIFIERS", "KnownAnswer", "Score", "backbone_config", "free_methods", "pointing_scores",
    "train_classifier", "train_head",
]  # fmt: skip

# Both give 8 x 8 maps at 64 px (ViT: 8-pixel patches; CNN: output stride 8). The images' statistics, not
# ImageNet's, normalise the input.
IMAGE_SIZE = 64
TINY_CLASSIFIERS: dict[str, dict[str, Any]] = {
    "vit": {"name": "test_vit", "img_size": IMAGE_SIZE, "patch_size": 8, "depth": 4},
    "cnn": {"name": "test_resnet", "output_stride": 8},
}
_COMMON = {"num_classes": len(CLASSES), "input_size": IMAGE_SIZE, "mean": (0.5,) * 3, "std": (0.25,) * 3}
# timm initialises position embeddings at std 0.02; from there this 0.3 M-parameter ViT had learned the quadrants
# of 45 % of held-out images after 8 epochs, 100 % from std 0.5 (which lets attention tell positions apart at once)
_POSITION_EMBEDDING_STD = 0.5


@dataclass(frozen=True)
class KnownAnswer:
    """The benchmark's settings, in one place: images, classifier training, head training, scoring."""

    train_images: int = 2048
    held_out_images: int = 200
    classifier_epochs: int = 8
    classifier_lr: float = 1e-3
    head_epochs: int = 3
    head_max_lr: float = 0.02
    batch_size: int = 64
    tolerance: float = 4.0
    seed: int = 0

    def training_set(self) -> ObjectPositionImages:
        return ObjectPositionImages(self.train_images, size=IMAGE_SIZE, seed=self.seed)

    def held_out_set(self) -> ObjectPositionImages:
        """Images the classifier and the heads never saw (another seed of the generator)."""
        return ObjectPositionImages(self.held_out_images, size=IMAGE_SIZE, seed=self.seed + 1)


@dataclass(frozen=True)
class Score:
    """A method's pointing-game share on the held-out images with an object, and its Wilson 95 % interval."""

    hits: float
    low: float
    high: float
    images: int


def backbone_config(kind: str, weights: str | Path | None) -> dict[str, Any]:
    """``backbones.create`` keyword arguments of the tiny ``kind`` classifier with ``weights`` (a file or None)."""
    if kind not in TINY_CLASSIFIERS:
        raise ValueError(f"tiny classifier must be one of {sorted(TINY_CLASSIFIERS)}, got {kind!r}")
    return {**TINY_CLASSIFIERS[kind], **_COMMON, "weights": None if weights is None else str(weights)}


def train_classifier(kind: str, settings: KnownAnswer, path: Path, epochs: int | None = None) -> float:
    """Train the tiny ``kind`` classifier on the training set (AdamW, one-cycle), save its weights to ``path``
    (safetensors) and return its accuracy on the held-out set. ``epochs=0`` saves the untrained network."""
    torch.manual_seed(settings.seed)
    backbone = backbones.create(**backbone_config(kind, None))
    model = backbone.model
    if getattr(model, "pos_embed", None) is not None:
        nn.init.normal_(model.pos_embed, std=_POSITION_EMBEDDING_STD)
    epochs = settings.classifier_epochs if epochs is None else epochs
    loader = DataLoader(settings.training_set(), settings.batch_size, shuffle=True, collate_fn=collate, drop_last=True)
    if epochs > 0:
        parameters = [p.requires_grad_(True) for p in model.parameters()]
        optimizer = torch.optim.AdamW(parameters, lr=settings.classifier_lr, weight_decay=0.05)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, settings.classifier_lr, total_steps=epochs * len(loader)
        )
        model.train()
        for _ in range(epochs):
            for batch in loader:
                loss = nn.functional.cross_entropy(model(backbone.normalize(batch["images"])), batch["labels"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        model.eval().requires_grad_(False)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    held_out = collate(list(settings.held_out_set()))
    with torch.no_grad():
        return float((backbone(held_out["images"]).argmax(dim=1) == held_out["labels"]).float().mean())


def train_head(
    kind: str, weights: Path, settings: KnownAnswer, root: Path, head: Mapping[str, Any] | None = None
) -> HeadExplainer:
    """A head (TAME with its default layers unless ``head`` says otherwise) trained by tame-lit's own training
    module on the training set, explaining the classifier whose weights are ``weights``."""
    torch.manual_seed(settings.seed)
    module = HeadTrainingModule(
        backbone_config(kind, weights), dict(head or {"name": "tame"}), optimizer={"max_lr": settings.head_max_lr}
    )
    loader = DataLoader(settings.training_set(), settings.batch_size // 2, shuffle=True, collate_fn=collate)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=settings.head_epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|val_dataloader|does not have many workers).*")
        trainer.fit(module, loader)
    return HeadExplainer(module.backbone, module.head)


def pointing_scores(
    backbone: backbones.Backbone, methods: Mapping[str, explainers.Explainer], settings: KnownAnswer
) -> dict[str, Score]:
    """Each method's pointing game on the held-out images that have an object, explaining their true class."""
    held_out = collate(list(settings.held_out_set()))
    scores = {}
    for name, method in methods.items():
        game = PointingGame(tolerance=settings.tolerance)
        for start in range(0, held_out["images"].shape[0], settings.batch_size):
            part = slice(start, start + settings.batch_size)
            images, targets = held_out["images"][part], held_out["labels"][part]
            maps = method(images, targets)
            game.update(
                ScoredBatch(backbone, images, maps, targets, held_out["indices"][part], held_out["boxes"][part])
            )
        values = game.per_image()["pointing_game"].numpy()
        low, high = share_interval(values) if values.size else (math.nan, math.nan)
        scores[name] = Score(float(np.mean(values)) if values.size else math.nan, low, high, int(values.size))
    return scores


def free_methods(
    backbone: backbones.Backbone,
    names: Iterable[str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[dict[str, explainers.Explainer], dict[str, str]]:
    """The registered methods defined for ``backbone``'s layout (or ``names``) with their default settings
    updated by ``options[name]``, and the reasons of those that refuse this model."""
    chosen = explainers.defined_for(backbone.layout.kind) if names is None else list(names)
    methods, refused = {}, {}
    for name in chosen:
        try:
            methods[name] = explainers.create(name, backbone, **dict((options or {}).get(name, {})))
        except ValueError as error:
            refused[name] = str(error)
    return methods, refused
