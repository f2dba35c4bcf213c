"""Image data for training and evaluating explainers: folders, TAME's list files, and an embedded sample.

Images come out in [0, 1] (no normalisation: the backbone normalises, the masks act on the raw image).
Batches are dicts ``{"images", "labels", "indices", "skipped"}``; ``labels`` are class indices in the
model's index space (ImageNet's when the folders are named by WordNet id) or -1 when unknown, and
``skipped`` counts unreadable files dropped from the batch.

Layout: ``images`` (decoding, transforms, dataset, collate), ``imagenet`` (class names, XML boxes),
``sources`` (where samples come from), ``sampler`` (the evaluation's split, the resumable training
order), ``modules`` (the DataModules).
"""

from tame_lit.data.imagenet import BoxSource, imagenet_class_names, visible_boxes
from tame_lit.data.images import (
    PIXEL_LIMIT,
    ImageDataset,
    ImageTooLargeError,
    UnreadableImageWarning,
    collate,
    eval_transform,
    load_rgb,
    train_transform,
)
from tame_lit.data.modules import EmbeddedDataModule, ImageDataModule, UnusableDataError
from tame_lit.data.sampler import EvenlySplitSampler, ResumableLoader, SeededItems, ShuffledSampler
from tame_lit.data.sources import embedded_samples, first_per_class, folder_samples, list_samples

__all__ = [
    "PIXEL_LIMIT",
    "BoxSource",
    "EmbeddedDataModule",
    "EvenlySplitSampler",
    "ImageDataModule",
    "ImageDataset",
    "ImageTooLargeError",
    "ResumableLoader",
    "SeededItems",
    "ShuffledSampler",
    "UnreadableImageWarning",
    "UnusableDataError",
    "collate",
    "embedded_samples",
    "eval_transform",
    "first_per_class",
    "folder_samples",
    "imagenet_class_names",
    "list_samples",
    "load_rgb",
    "train_transform",
    "visible_boxes",
]
