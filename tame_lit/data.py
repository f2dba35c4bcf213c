"""Image data for training and evaluating explainers: folders, TAME's list files, and an embedded sample.

Images come out in [0, 1] (no normalisation: the backbone normalises, the masks act on the raw image).
Batches are dicts ``{"images", "labels", "indices", "skipped"}``; ``labels`` are class indices in the
model's index space (ImageNet's when the folders are named by WordNet id) or -1 when unknown, and
``skipped`` counts unreadable files dropped from the batch.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import v2

__all__ = [
    "EmbeddedDataModule",
    "ImageDataModule",
    "ImageDataset",
    "UnreadableImageWarning",
    "collate",
    "embedded_samples",
    "eval_transform",
    "folder_samples",
    "imagenet_class_names",
    "list_samples",
    "load_rgb",
    "train_transform",
]

Sample = tuple[str, int]


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded and was skipped."""


def load_rgb(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Open an image as 8-bit RGB: grayscale, palette, CMYK and 16-bit images are converted, and
    transparent images are composited over white (not over whatever colour hides under alpha = 0)."""
    with Image.open(path) as image:
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))  # decode at a reduced scale when much larger
        image.load()
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


def train_transform(resize_size: int = 256, crop_size: int = 224) -> Callable:
    """TAME's training transform: Resize(256), RandomCrop(224), RandomHorizontalFlip, to [0, 1]."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize_size, antialias=True),
            v2.RandomCrop(crop_size, pad_if_needed=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def eval_transform(resize_size: int = 256, crop_size: int = 224) -> Callable:
    """TAME's evaluation transform: Resize(256), CenterCrop(224), to [0, 1]."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize_size, antialias=True),
            v2.CenterCrop(crop_size),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


class ImageDataset(Dataset):
    """``(path, label)`` samples, decoded robustly: an unreadable file yields ``None`` and a warning."""

    def __init__(self, samples: Sequence[Sample], transform: Callable, draft_size: int | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int] | None:
        path, label = self.samples[index]
        try:
            image = load_rgb(path, self.draft_size)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
            warnings.warn(f"skipping unreadable image {path}: {error}", UnreadableImageWarning, stacklevel=2)
            return None
        return self.transform(image), label, index


def collate(items: Sequence[tuple[torch.Tensor, int, int] | None]) -> dict[str, object]:
    """Stack readable items; count the unreadable ones so the training loop can log them."""
    kept = [item for item in items if item is not None]
    if not kept:
        return {
            "images": torch.zeros(0, 3, 1, 1),
            "labels": torch.zeros(0, dtype=torch.long),
            "indices": torch.zeros(0, dtype=torch.long),
            "skipped": len(items),
        }
    images, labels, indices = zip(*kept, strict=True)
    return {
        "images": torch.stack(images),
        "labels": torch.tensor(labels, dtype=torch.long),
        "indices": torch.tensor(indices, dtype=torch.long),
        "skipped": len(items) - len(kept),
    }


@cache
def _imagenet_info() -> tuple[dict[str, int], list[str]]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    wnids = list(info.label_names())
    names = [info.index_to_description(i).split(",")[0] for i in range(len(wnids))]
    return {wnid: index for index, wnid in enumerate(wnids)}, names


def imagenet_class_names() -> list[str]:
    """Short names of the 1,000 ImageNet classes, by class index (from timm's metadata)."""
    return list(_imagenet_info()[1])


def _check_dir(root: str | os.PathLike, what: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {path.resolve()}")
    return path


def folder_samples(root: str | os.PathLike, class_index: str = "auto") -> tuple[list[Sample], list[str]]:
    """Samples of an ImageFolder tree (``root/<class>/<image>``) and its class names.

    ``class_index``: ``"folder"`` numbers classes by sorted folder name (torchvision's ImageFolder);
    ``"imagenet"`` maps WordNet-id folders (``n01440764``) to ImageNet class indices; ``"auto"`` does the
    latter when every folder is an ImageNet WordNet id.
    """
    path = _check_dir(root, "image")
    try:
        classes, folder_index = find_classes(str(path))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"no class folders in {path.resolve()} (expected {path}/<class>/<image>)") from error
    wnid_index, _ = _imagenet_info()
    if class_index not in ("auto", "imagenet", "folder"):
        raise ValueError(f"data.class_index must be 'auto', 'imagenet' or 'folder', got {class_index!r}")
    use_imagenet = class_index == "imagenet" or (class_index == "auto" and all(name in wnid_index for name in classes))
    if use_imagenet:
        unknown = [name for name in classes if name not in wnid_index]
        if unknown:
            raise ValueError(f"folders {unknown[:5]} in {path} are not ImageNet WordNet ids")
        mapping = {name: wnid_index[name] for name in classes}
    else:
        mapping = folder_index
    try:
        samples = make_dataset(str(path), mapping, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"no images found in {path.resolve()}: {error}") from error
    return samples, classes


def list_samples(root: str | os.PathLike, list_file: str | os.PathLike) -> list[Sample]:
    """Samples of a TAME/L-CAM list file: one ``relative/path label`` per line, paths under ``root``."""
    base = _check_dir(root, "image")
    list_path = Path(list_file).expanduser()
    if not list_path.is_file():
        raise FileNotFoundError(f"list file not found: {list_path.resolve()}")
    samples = []
    for number, line in enumerate(list_path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        relative, _, label = line.strip().rpartition(" ")
        if not relative:
            relative, label = label, "-1"
        try:
            samples.append((str(base / relative.strip()), int(label)))
        except ValueError as error:
            raise ValueError(f"{list_path}:{number}: expected 'path label', got {line.strip()!r}") from error
    if not samples:
        raise ValueError(f"list file {list_path.resolve()} has no entries")
    return samples


# Photos that ship inside scikit-image and matplotlib: the data of the default run, no download needed.
_EMBEDDED = {
    "skimage": [
        "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
        "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png",
        "coins.png", "moon.png", "horse.png", "page.png", "brick.png", "grass.png", "gravel.png",
        "logo.png", "color.png",
    ],
    "matplotlib": ["grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"],
}  # fmt: skip


def embedded_samples() -> list[Sample]:
    """The embedded sample photos (label -1: no ground truth; training uses the model's predictions)."""
    import matplotlib
    import skimage

    folders = {
        "skimage": Path(skimage.__file__).parent / "data",
        "matplotlib": Path(matplotlib.get_data_path()) / "sample_data",
    }
    samples = [
        (str(folders[package] / name), -1)
        for package, names in _EMBEDDED.items()
        for name in names
        if (folders[package] / name).is_file()
    ]
    if len(samples) < 8:
        raise FileNotFoundError(f"only {len(samples)} embedded sample images found in {list(folders.values())}")
    return samples


class ImageDataModule(L.LightningDataModule):
    """Train/val images from ImageFolder trees or TAME list files.

    ``train_dir``/``val_dir``: folders in ImageFolder layout (ImageNet's ``train/``, ``val/`` after the
    usual class-folder arrangement), or image roots for ``train_list``/``val_list`` ("path label" files).
    ``limit_train``/``limit_val`` keep the first N images (in folder/list order).
    """

    def __init__(
        self,
        train_dir: str | None = None,
        val_dir: str | None = None,
        train_list: str | None = None,
        val_list: str | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        resize_size: int = 256,
        crop_size: int = 224,
        limit_train: int | None = None,
        limit_val: int | None = None,
        class_index: str = "auto",
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    def _samples(self, split: str) -> list[Sample] | None:
        folder, list_file = getattr(self.hparams, f"{split}_dir"), getattr(self.hparams, f"{split}_list")
        if folder is None:
            if list_file is not None:
                raise ValueError(f"data.{split}_list needs data.{split}_dir, the folder its paths are relative to")
            return None
        if list_file is not None:
            return list_samples(folder, list_file)
        return folder_samples(folder, self.hparams.class_index)[0]

    def _dataset(self, split: str, transform: Callable) -> Dataset | None:
        samples = self._samples(split)
        if samples is None:
            return None
        dataset: Dataset = ImageDataset(samples, transform, draft_size=self.hparams.resize_size)
        limit = getattr(self.hparams, f"limit_{split}")
        if limit is not None:
            dataset = Subset(dataset, range(min(int(limit), len(samples))))
        return dataset

    def setup(self, stage: str | None = None) -> None:
        size = (self.hparams.resize_size, self.hparams.crop_size)
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._dataset("train", train_transform(*size))
            if self.train_dataset is None:
                raise ValueError("training needs data.train_dir (a folder of images)")
        if self.val_dataset is None:
            self.val_dataset = self._dataset("val", eval_transform(*size))

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.hparams.val_batch_size or self.hparams.batch_size, shuffle=False)


class EmbeddedDataModule(ImageDataModule):
    """The photos shipped with scikit-image and matplotlib, for a first run on a fresh machine.

    The same photos serve for training (augmented, repeated ``repeats`` times per epoch) and validation
    (center crop): a smoke test of the whole pipeline, not a benchmark.
    """

    def __init__(self, repeats: int = 4, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.repeats = int(repeats)

    def _samples(self, split: str) -> list[Sample]:
        return embedded_samples()

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage in (None, "fit") and not isinstance(self.train_dataset, ConcatDataset) and self.repeats > 1:
            self.train_dataset = ConcatDataset([self.train_dataset] * self.repeats)
