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
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import v2

__all__ = [
    "BoxSource",
    "EmbeddedDataModule",
    "EvenlySplitSampler",
    "ImageDataModule",
    "ImageDataset",
    "UnreadableImageWarning",
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
    """``(path, label)`` samples, decoded robustly: an unreadable file yields ``None`` and a warning.

    Items are ``(image, label, index)``, or ``(image, label, index, boxes)`` with ``boxes`` (a
    ``BoxSource``): the image's bounding boxes ``[n, 5]`` (class, x0, y0, x1, y1), moved by the same
    resize and crop as the image.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable,
        draft_size: int | None = None,
        boxes: BoxSource | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.draft_size = draft_size
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple | None:
        path, label = self.samples[index]
        try:
            image = load_rgb(path, self.draft_size)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
            warnings.warn(f"skipping unreadable image {path}: {error}", UnreadableImageWarning, stacklevel=2)
            return None
        if self.boxes is None:
            return self.transform(image), label, index
        classes, boxes = self.boxes.for_image(path, image.size)
        tensor, moved = self.transform(image, boxes)
        return tensor, label, index, visible_boxes(classes, moved)


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


class BoxSource:
    """Bounding boxes in ImageNet's validation XML format (PASCAL VOC): one ``<image stem>.xml`` per image
    in ``root`` (as ``LOC_val``/``Annotations/CLS-LOC/val``) or in ``root/<class folder>/``.

    Object names that are WordNet ids get ImageNet class indices; other names the index ``class_index``
    gives them (e.g. the dataset's folder order), else -1. Boxes are scaled to the decoded image's size,
    so images stored smaller than the annotated originals (Imagenette, JPEG draft decoding) still fit.
    """

    def __init__(self, root: str | os.PathLike, class_index: dict[str, int] | None = None) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.boxes_dir: box directory not found: {self.root.resolve()}")
        self.class_index = {**(class_index or {}), **_imagenet_info()[0]}

    def path_for(self, image_path: str | os.PathLike) -> Path:
        image_path = Path(image_path)
        for candidate in (
            self.root / f"{image_path.stem}.xml",
            self.root / image_path.parent.name / f"{image_path.stem}.xml",
        ):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"no box file for {image_path}: expected {self.root / (image_path.stem + '.xml')} "
            f"or {self.root / image_path.parent.name / (image_path.stem + '.xml')}"
        )

    def check(self, image_paths: Sequence[str]) -> None:
        """Fail before any work when images lack a box file, naming the first few."""
        missing = []
        for path in image_paths:
            try:
                self.path_for(path)
            except FileNotFoundError:
                missing.append(str(path))
        if missing:
            raise FileNotFoundError(
                f"data.boxes_dir={self.root}: no <image stem>.xml box file for {len(missing)} of {len(image_paths)} "
                f"images, e.g. {missing[:3]}; point data.boxes_dir at the XML folder or set it to null"
            )

    def for_image(self, image_path: str | os.PathLike, size: tuple[int, int]) -> tuple[torch.Tensor, object]:
        """Class indices ``[n]`` and ``tv_tensors.BoundingBoxes`` (XYXY, continuous pixel edges) on an image
        of ``size`` = (width, height)."""
        import xml.etree.ElementTree as ElementTree

        from torchvision import tv_tensors

        xml_path = self.path_for(image_path)
        try:
            root = ElementTree.parse(xml_path).getroot()
            width = float(root.findtext("size/width") or size[0])
            height = float(root.findtext("size/height") or size[1])
            classes, coordinates = [], []
            for obj in root.iter("object"):
                box = obj.find("bndbox")
                x0, y0, x1, y1 = (float(box.findtext(key)) for key in ("xmin", "ymin", "xmax", "ymax"))
                classes.append(self.class_index.get((obj.findtext("name") or "").strip(), -1))
                coordinates.append([x0 - 1, y0 - 1, x1, y1])  # 1-based inclusive pixels -> pixel edges
        except (ElementTree.ParseError, AttributeError, TypeError, ValueError) as error:
            raise ValueError(f"{xml_path}: not a PASCAL VOC / ImageNet box file ({error})") from error
        scale = torch.tensor([size[0] / width, size[1] / height] * 2)
        boxes = torch.tensor(coordinates, dtype=torch.float32).view(-1, 4) * scale
        return torch.tensor(classes, dtype=torch.long), tv_tensors.BoundingBoxes(
            boxes, format="XYXY", canvas_size=(size[1], size[0])
        )


def visible_boxes(classes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``[n, 5]`` (class, x0, y0, x1, y1) clipped to the (cropped) canvas; boxes cropped away are dropped."""
    height, width = boxes.canvas_size
    xyxy = boxes.as_subclass(torch.Tensor).float().clone()
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    return torch.cat([classes[keep, None].float(), xyxy[keep]], dim=1)


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


class EvenlySplitSampler(DistributedSampler):
    """Each process gets indices ``rank::world_size`` of the dataset, in order, none repeated.

    torch's ``DistributedSampler`` pads the last round with repeated images so every process has as many;
    evaluation then counts those images twice. Metrics with sum states need every image exactly once.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


def first_per_class(samples: Sequence[Sample], count: int) -> list[Sample]:
    """The first ``count`` samples of each label, in the original order."""
    seen: dict[int, int] = {}
    kept = []
    for path, label in samples:
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= count:
            kept.append((path, label))
    return kept


def _at_least_one(value: object, key: str) -> int:
    if int(value) < 1:
        raise ValueError(f"{key} must be >= 1, got {value}")
    return int(value)


class ImageDataModule(L.LightningDataModule):
    """Images from ImageFolder trees or TAME list files.

    ``root``: the images to evaluate on (validation during training, the set ``evaluate.py`` scores), an
    ImageFolder tree (``root/<class>/<image>``, ImageNet's ``val/`` after the usual class-folder
    arrangement) or, with ``list_file``, the folder its ``path label`` lines are relative to; ``limit`` keeps
    the first N images in folder/list order, ``limit_per_class`` the first N of each class (a class-balanced
    subset; applied before ``limit``). ``train_root``/``train_list``/``train_limit``/``train_limit_per_class``:
    the same for the training images. ``boxes_dir``: bounding boxes of the ``root`` images (ImageNet
    validation XML), for the pointing games. ``eval_batch_size`` defaults to ``batch_size``.
    """

    def __init__(
        self,
        root: str | None = None,
        train_root: str | None = None,
        list_file: str | None = None,
        train_list: str | None = None,
        limit: int | None = None,
        train_limit: int | None = None,
        limit_per_class: int | None = None,
        train_limit_per_class: int | None = None,
        boxes_dir: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        resize_size: int = 256,
        crop_size: int = 224,
        class_index: str = "auto",
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.train_dataset: Dataset | None = None
        self.eval_dataset: Dataset | None = None
        self.class_names: list[str] | None = None

    def _samples(self, split: str) -> list[Sample] | None:
        train = split == "train"
        folder = self.hparams.train_root if train else self.hparams.root
        list_file = self.hparams.train_list if train else self.hparams.list_file
        if folder is None:
            if list_file is not None:
                keys = ("train_list", "train_root") if train else ("list_file", "root")
                raise ValueError(f"data.{keys[0]} needs data.{keys[1]}, the folder its paths are relative to")
            return None
        if list_file is not None:
            return list_samples(folder, list_file)
        samples, classes = folder_samples(folder, self.hparams.class_index)
        if not train:
            self.class_names = classes
        return samples

    def _dataset(self, split: str, transform: Callable) -> Dataset | None:
        samples = self._samples(split)
        if samples is None:
            return None
        prefix = "train_" if split == "train" else ""
        per_class = self.hparams[f"{prefix}limit_per_class"]
        if per_class is not None:
            samples = first_per_class(samples, _at_least_one(per_class, f"data.{prefix}limit_per_class"))
        limit = self.hparams[f"{prefix}limit"]
        if limit is not None:
            samples = samples[: _at_least_one(limit, f"data.{prefix}limit")]
        boxes = None
        if split == "eval" and self.hparams.boxes_dir:
            folder_index = {name: index for index, name in enumerate(self.class_names or [])}
            boxes = BoxSource(self.hparams.boxes_dir, folder_index)
            boxes.check([path for path, _ in samples])
        return ImageDataset(samples, transform, draft_size=self.hparams.resize_size, boxes=boxes)

    def setup(self, stage: str | None = None) -> None:
        size = (self.hparams.resize_size, self.hparams.crop_size)
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._dataset("train", train_transform(*size))
            if self.train_dataset is None:
                raise ValueError("training needs data.train_root (a folder of images)")
        if self.eval_dataset is None:
            self.eval_dataset = self._dataset("eval", eval_transform(*size))
            if self.eval_dataset is None and stage in ("test", "predict"):
                raise ValueError("evaluation needs data.root (a folder of images)")

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, sampler: Sampler | None = None) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )

    @property
    def eval_batch_size(self) -> int:
        return self.hparams.eval_batch_size or self.hparams.batch_size

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.eval_dataset is None:
            return []
        return self._loader(self.eval_dataset, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Every image exactly once, also across processes (see ``EvenlySplitSampler``)."""
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sampler = EvenlySplitSampler(self.eval_dataset)
        return self._loader(self.eval_dataset, self.eval_batch_size, shuffle=False, sampler=sampler)


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
