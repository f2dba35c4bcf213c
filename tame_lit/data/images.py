"""Decoding and transforming images: robust RGB loading, TAME's train/eval transforms, the dataset of
``(path, label)`` samples (optionally with their bounding boxes) and the collate that builds batches.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from tame_lit.data.imagenet import BoxSource, visible_boxes
from tame_lit.data.sources import Sample

# The largest image decoded by default (``data.max_image_pixels``, ``tame-explain --max-pixels``): PIL's own
# decompression-bomb threshold, about 9,459 x 9,459 pixels (a 14k x 14k PNG needs 590 MB as RGB).
PIXEL_LIMIT = Image.MAX_IMAGE_PIXELS


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded (or was too large, or failed its transform) and was skipped."""


class ImageTooLargeError(ValueError):
    """An image has more pixels than the configured limit (a decompression bomb, or a scan far too large)."""


def load_rgb(path: str | os.PathLike, draft_size: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Open an image as 8-bit RGB, upright (its EXIF orientation applied): grayscale, palette, CMYK and 16-bit
    images are converted, and transparent images are composited over white (not over whatever colour hides
    under alpha = 0). ``max_pixels``: refuse larger images before decoding them (``ImageTooLargeError``);
    ``None``: no limit (PIL's own bomb check is replaced by this one)."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        image = Image.open(path)  # reads the header only
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    with image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError(
                f"{width} x {height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
                "(data.max_image_pixels / tame-explain --max-pixels)"
            )
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))  # decode at a reduced scale when much larger
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            array = np.asarray(image, dtype=np.float32)
            peak = 65535.0 if image.mode.startswith("I") and array.max() > 255 else max(float(array.max()), 1.0)
            image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")


def resize_stage(resize_size: int = 256) -> v2.Compose:
    """The first stage of every transform: the decoded image as a uint8 tensor, its shorter side at
    ``resize_size``. ``data.image_cache`` stores its output, so a cached image gets only the second stage."""
    return v2.Compose([v2.ToImage(), v2.Resize(resize_size, antialias=True)])


class ImageTransform(v2.Compose):
    """``resize_stage`` then ``crop_stage``: a transform whose first stage can be cached (``data.image_cache``)."""

    def __init__(self, resize_size: int, crop_stage: v2.Transform) -> None:
        super().__init__([resize_stage(resize_size), crop_stage])
        self.resize_size = resize_size

    @property
    def crop_stage(self) -> v2.Transform:
        return self.transforms[1]


def train_transform(resize_size: int = 256, crop_size: int = 224) -> ImageTransform:
    """TAME's training transform: Resize(256), RandomCrop(224), RandomHorizontalFlip, to [0, 1]."""
    crop = v2.Compose(
        [
            v2.RandomCrop(crop_size, pad_if_needed=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    return ImageTransform(resize_size, crop)


def eval_transform(resize_size: int = 256, crop_size: int = 224) -> ImageTransform:
    """TAME's evaluation transform: Resize(256), CenterCrop(224), to [0, 1]."""
    return ImageTransform(resize_size, v2.Compose([v2.CenterCrop(crop_size), v2.ToDtype(torch.float32, scale=True)]))


class ImageDataset(Dataset):
    """``(path, label)`` samples, decoded robustly: a file that fails (unreadable, over ``max_pixels``, or its
    transform raising) yields ``None`` and a warning naming it; ``collate`` counts it as skipped.

    Items are ``(image, label, index)``, or ``(image, label, index, boxes)`` with ``boxes`` (a
    ``BoxSource``): the image's bounding boxes ``[n, 5]`` (class, x0, y0, x1, y1), moved by the same
    resize and crop as the image. ``index`` is the sample's position, or with ``indices`` (one per sample)
    the index it has in a larger list (a shard's images keep their indices in the whole evaluated set).
    ``decoded``: the same images already through ``transform``'s resize stage (``data.image_cache``: uint8
    tensors, or the error of an unusable image), so only its crop stage runs; not with ``boxes``.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable,
        draft_size: int | None = None,
        boxes: BoxSource | None = None,
        indices: Sequence[int] | None = None,
        max_pixels: int | None = PIXEL_LIMIT,
        decoded: Sequence[Tensor | str] | None = None,
    ) -> None:
        self.samples = list(samples)
        if decoded is not None:
            if boxes is not None or not isinstance(transform, ImageTransform):
                raise ValueError("pre-decoded images need an ImageTransform (its crop stage is applied) and no boxes")
            if len(decoded) != len(self.samples):
                raise ValueError(f"{len(decoded)} pre-decoded images for {len(self.samples)} samples")
        self.decoded = decoded
        self.max_pixels = max_pixels
        if indices is not None and len(indices) != len(self.samples):
            raise ValueError(f"{len(indices)} indices for {len(self.samples)} samples: give one index per sample")
        self.indices = None if indices is None else [int(index) for index in indices]
        self.transform = transform
        self.draft_size = draft_size
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple | None:
        path, label = self.samples[index]
        reported = index if self.indices is None else self.indices[index]
        # any failure of one image (a bomb, a broken file, a transform error) is named and counted, never fatal
        if self.decoded is not None:
            pixels = self.decoded[index]
            if isinstance(pixels, str):
                return _skip(path, pixels)
            try:
                return self.transform.crop_stage(tv_tensors.Image(pixels)), label, reported
            except Exception as error:
                return _skip(path, error)
        try:
            image = load_rgb(path, self.draft_size, self.max_pixels)
        except Exception as error:
            return _skip(path, error)
        if self.boxes is not None:
            classes, boxes = self.boxes.for_image(path, image.size)  # a missing box file is the user's to fix
        try:
            if self.boxes is None:
                return self.transform(image), label, reported
            tensor, moved = self.transform(image, boxes)
        except Exception as error:
            return _skip(path, error)
        return tensor, label, reported, visible_boxes(classes, moved)


def _skip(path: str, error: Exception | str) -> None:
    reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    warnings.warn(f"skipping unreadable image {path}: {reason}", UnreadableImageWarning, stacklevel=3)


def collate(items: Sequence[tuple | None]) -> dict[str, object]:
    """Stack readable items; count the unreadable ones so the training loop can log them."""
    kept = [item for item in items if item is not None]
    if not kept:
        return {
            "images": torch.zeros(0, 3, 1, 1),
            "labels": torch.zeros(0, dtype=torch.long),
            "indices": torch.zeros(0, dtype=torch.long),
            "skipped": len(items),
        }
    columns = list(zip(*kept, strict=True))
    batch = {
        "images": torch.stack(columns[0]),
        "labels": torch.tensor(columns[1], dtype=torch.long),
        "indices": torch.tensor(columns[2], dtype=torch.long),
        "skipped": len(items) - len(kept),
    }
    if len(columns) > 3:
        batch["boxes"] = list(columns[3])
    return batch
