"""The Lightning DataModules the Hydra configs instantiate (``conf/data/*.yaml``): images from folders or
TAME list files, and the embedded sample photos for a first run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from tame_lit.data.cache import DecodedImages, build_decoded_images, images_key, open_decoded_images
from tame_lit.data.imagenet import BoxSource
from tame_lit.data.images import PIXEL_LIMIT, ImageDataset, collate, eval_transform, train_transform
from tame_lit.data.sampler import EvenlySplitSampler, ResumableLoader, SeededItems, ShuffledSampler
from tame_lit.data.sources import (
    Sample,
    embedded_samples,
    first_per_class,
    first_per_class_indices,
    folder_samples,
    holdout_split,
    imagenet_indexed,
    list_samples,
)
from tame_lit.io import output_folder_problem

log = logging.getLogger(__name__)


def _at_least_one(value: object, key: str) -> int:
    if int(value) < 1:
        raise ValueError(f"{key} must be >= 1, got {value}")
    return int(value)


class UnusableDataError(RuntimeError):
    """Too many of the training images could not be used: the run would learn from too little, or nothing."""


class ImageDataModule(L.LightningDataModule):
    """Images from ImageFolder trees or TAME list files.

    ``root``: the images to evaluate on (validation during training, the set ``evaluate.py`` scores), an
    ImageFolder tree (``root/<class>/<image>``, ImageNet's ``val/`` after the usual class-folder
    arrangement) or, with ``list_file``, the folder its ``path label`` lines are relative to; ``limit`` keeps
    the first N images in folder/list order, ``limit_per_class`` the first N of each class (a class-balanced
    subset; applied before ``limit``). ``train_root``/``train_list``/``train_limit``/``train_limit_per_class``:
    the same for the training images. ``holdout_per_class``: N images of each class of ``train_root`` (or
    ``train_list``) held out of training and evaluated on instead of ``root``/``list_file`` (then ignored): a
    validation split for hyperparameter search that never sees the images finally reported on; the N are
    chosen by a hash of each path relative to ``train_root`` (``sources.holdout_split``). The split comes
    first, then each side's ``*limit_per_class``, then its ``*limit``. ``boxes_dir``: bounding boxes of the
    evaluated images (ImageNet validation XML), for the pointing games. ``eval_batch_size`` defaults to
    ``batch_size``. ``num_shards`` / ``shard``: evaluate only every ``num_shards``-th of the evaluated images
    (after the limits), starting at position ``shard``, each keeping its index in the whole set, so that
    ``tame-merge`` can join the shards' runs into the run of the whole set (an evaluation too long for one
    sitting, or spread over machines). Under ``train.py`` they would shard the validation images: leave them.
    ``max_image_pixels``: larger images are skipped unread, named and counted like unreadable ones (a
    decompression bomb never stops a run); null: no limit. Loader settings: ``num_workers`` decoding processes,
    ``pin_memory`` (page-locked batches for faster copies to a CUDA device; ignored without one),
    ``persistent_workers`` (keep the workers between epochs and validations instead of restarting them),
    ``prefetch_factor`` (batches each worker prepares ahead; null: torch's 2). ``augment``: the training images
    get TAME's random crop and flip (true) or the evaluation's centre crop (false: every epoch sees the same
    pixels). ``image_cache``: a folder where each image is kept decoded and resized (uint8, memory-mapped,
    built once by the first run that needs it, ``tame_lit.data.cache``), so that epochs and validations skip the
    JPEG decode; about 0.25 MB per image at resize 256 (ImageNet's training set: about 330 GB); not for images
    with boxes; null: decode every time. ``max_bad_fraction``: training stops, naming the folder and the count, as
    soon as more than this share of an epoch's training images were unusable (a wrong folder or a broken copy, not
    a few bad files); evaluation reports its skipped images.
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
        holdout_per_class: int | None = None,
        boxes_dir: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        resize_size: int = 256,
        crop_size: int = 224,
        class_index: str = "auto",
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int | None = None,
        augment: bool = True,
        num_shards: int = 1,
        shard: int = 0,
        max_image_pixels: int | None = PIXEL_LIMIT,
        image_cache: str | None = None,
        max_bad_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        problem = None if image_cache is None else output_folder_problem(image_cache)
        if problem:
            raise ValueError(f"data.image_cache={image_cache}: {problem}; give a writable folder, or null")
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        _at_least_one(num_shards, "data.num_shards")
        if prefetch_factor is not None:
            _at_least_one(prefetch_factor, "data.prefetch_factor")
        if not 0 <= shard < num_shards:
            raise ValueError(f"data.shard must be in 0 .. data.num_shards - 1 = {num_shards - 1}, got {shard}")
        if holdout_per_class is not None:
            _at_least_one(holdout_per_class, "data.holdout_per_class")
            if train_root is None:
                raise ValueError(
                    "data.holdout_per_class holds images out of the training folder: set data.train_root "
                    "(and data.train_list for a list file)"
                )
        self.save_hyperparameters(logger=False)
        self._split: tuple[list[Sample], list[Sample]] | None = None
        self.train_dataset: Dataset | None = None
        self.eval_dataset: Dataset | None = None
        self.class_names: list[str] | None = None
        self.eval_labels: list[int] = []  # the labels of every evaluated image, in order (all shards)
        self._unusable = (-1, 0, 0)  # (epoch, unusable training images, usable ones) seen by this process
        self._train_samples: list[Sample] | None = None  # the training images, in dataset order
        self._train_classes: list[str] | None = None  # the training folder's class folders (not from a list file)
        self._train_loader: ResumableLoader | None = None
        self._resume_at: dict[str, int] | None = None  # a resumed checkpoint's training position

    def check_ground_truth(self, num_classes: int) -> None:
        """For training toward the dataset's labels (``labels=ground_truth``): refuse, before any step, labels
        that are not the model's class indices. WordNet-id folders map to ImageNet's indices and a list file's
        labels are taken as given; other folders are numbered 0..K-1 by name, which are the model's classes
        only when it has exactly those K classes."""
        classes = self._train_classes
        if classes is None or imagenet_indexed(classes, self.hparams.class_index) or len(classes) == num_classes:
            return
        raise ValueError(
            f"labels=ground_truth: the {len(classes)} class folders of {self.source('train')} ({', '.join(classes[:3])}"
            f"{', ...' if len(classes) > 3 else ''}) are not ImageNet WordNet ids, so they would be numbered 0.."
            f"{len(classes) - 1} and trained toward the model's classes of those indices (it has {num_classes}). "
            "Name the folders by WordNet id (n01440764), give a list file of the model's class indices "
            "(data.train_list), or use labels=model"
        )

    def train_images_key(self) -> tuple[str, int]:
        """What identifies the training images as a model sees them (the files, their list, resize, crop and
        pixel limit) and how many there are: the key of ``clean_pass_cache``, which holds only when every epoch
        sees the same pixels."""
        if self.hparams.augment:
            raise ValueError(
                "clean_pass_cache stores each training image's clean pass once, so every epoch must see the same "
                "pixels: set data.augment=false (the centre crop, no random crop or flip), or clean_pass_cache=null"
            )
        if self._train_samples is None:
            self.setup("fit")
        settings = self.hparams.resize_size, self.hparams.max_image_pixels
        images = images_key(self._train_samples, *settings)
        return f"{images}-crop{self.hparams.crop_size}-centre", len(self._train_samples)

    def source(self, split: str) -> str:
        """Where the ``train`` or ``eval`` images come from (a folder or list file), for messages."""
        if split == "train" or self.hparams.holdout_per_class is not None:
            return str(self.hparams.train_list or self.hparams.train_root)
        return str(self.hparams.list_file or self.hparams.root)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and isinstance(batch, dict) and "skipped" in batch:
            self._count_unusable(trainer, int(batch["skipped"]), int(batch["images"].shape[0]))
        return batch

    def _count_unusable(self, trainer: L.Trainer, skipped: int, usable: int) -> None:
        """Stop training once this epoch's unusable images exceed ``max_bad_fraction`` of its images (decided
        on all processes together, so that they stop at the same batch)."""
        epoch, unusable, seen = self._unusable
        if epoch != trainer.current_epoch:
            unusable, seen = 0, 0
        unusable, seen = unusable + skipped, seen + usable
        self._unusable = (trainer.current_epoch, unusable, seen)
        allowed = self.hparams.max_bad_fraction * len(self.train_dataset) / max(trainer.world_size, 1)
        if not trainer.strategy.reduce_boolean_decision(unusable > allowed, all=False):
            return
        raise UnusableDataError(
            f"{self.source('train')}: {unusable} of the {unusable + seen} training images read so far in epoch "
            f"{trainer.current_epoch}{' (this process)' if trainer.world_size > 1 else ''} could not be used "
            f"(unreadable, too large or failing the transform; the warnings name them), more than "
            f"data.max_bad_fraction={self.hparams.max_bad_fraction} of the {len(self.train_dataset)} training images: "
            "stopped before training on what is left. Fix or remove those files, or raise data.max_bad_fraction"
        )

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
        if train:
            self._train_classes = classes
        if not train or self.hparams.holdout_per_class is not None:
            self.class_names = classes  # the evaluated images' classes: the training folder's with a holdout
        return samples

    def _holdout(self) -> tuple[list[Sample], list[Sample]]:
        """``(train, held_out)`` of the training images (``data.holdout_per_class``), computed once."""
        if self._split is None:
            per_class, root = self.hparams.holdout_per_class, self.hparams.train_root
            self._split = holdout_split(self._samples("train"), per_class, root)
            ignored = [f"data.{key}" for key in ("root", "list_file") if self.hparams[key] is not None]
            log.info(
                "data.holdout_per_class=%d: %d images held out of %s to evaluate on, the other %d to train on (before "
                "the limits)%s",
                per_class, len(self._split[1]), self.hparams.train_list or root, len(self._split[0]),
                f" ({' and '.join(ignored)} ignored)" if ignored else "",
            )  # fmt: skip
        return self._split

    def _dataset(self, split: str, transform: Callable) -> Dataset | None:
        if self.hparams.holdout_per_class is not None:
            samples = self._holdout()[0 if split == "train" else 1]
        else:
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
        if split != "eval":
            self._train_samples = samples
            return ImageDataset(
                samples,
                transform,
                self.hparams.resize_size,
                max_pixels=self.hparams.max_image_pixels,
                decoded=self._decoded(samples),
            )
        self.eval_labels = [label for _, label in samples]  # of the whole set, also when one shard is evaluated
        indices = range(self.hparams.shard, len(samples), self.hparams.num_shards)
        samples = [samples[index] for index in indices]
        boxes = None
        if self.hparams.boxes_dir:
            folder_index = {name: index for index, name in enumerate(self.class_names or [])}
            boxes = BoxSource(self.hparams.boxes_dir, folder_index)
            boxes.check([path for path, _ in samples])
        return ImageDataset(
            samples,
            transform,
            self.hparams.resize_size,
            boxes,
            indices,
            max_pixels=self.hparams.max_image_pixels,
            decoded=None if boxes is not None else self._decoded(samples),
        )

    def _decoded(self, samples: list[Sample]) -> DecodedImages | None:
        """``data.image_cache``'s decoded images of ``samples``, built first when missing (under a trainer by the
        first process of each node while the others wait: every process calls this at set-up)."""
        if self.hparams.image_cache is None:
            return None
        args = (self.hparams.image_cache, samples, self.hparams.resize_size, self.hparams.max_image_pixels)
        decoded = open_decoded_images(*args)
        trainer = self.trainer
        if decoded is None and (trainer is None or trainer.local_rank == 0):
            build_decoded_images(*args, num_workers=self.hparams.num_workers)
        if trainer is not None:
            trainer.strategy.barrier("data.image_cache")
        return decoded or open_decoded_images(*args)

    def setup(self, stage: str | None = None) -> None:
        size = (self.hparams.resize_size, self.hparams.crop_size)
        if stage in (None, "fit") and self.train_dataset is None:
            transform = train_transform(*size) if self.hparams.augment else eval_transform(*size)
            self.train_dataset = self._dataset("train", transform)
            if self.train_dataset is None:
                raise ValueError("training needs data.train_root (a folder of images)")
        if self.eval_dataset is None:
            self.eval_dataset = self._dataset("eval", eval_transform(*size))
            if self.eval_dataset is None and stage in ("test", "predict"):
                raise ValueError("evaluation needs data.root (a folder of images)")

    def eval_indices_per_class(self, count: int, key: str = "count") -> list[int]:
        """Dataset indices of the first ``count`` evaluated images of each class, in loading order: a
        class-balanced subset of the evaluated set, the same on every process (``key`` names the setting in
        errors)."""
        self.setup("test")
        return first_per_class_indices(self.eval_labels, _at_least_one(count, key))

    def _loader(
        self, dataset: Dataset, batch_size: int, sampler: Sampler | None = None, loader: type[DataLoader] = DataLoader
    ) -> DataLoader:
        workers = self.hparams.num_workers
        return loader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.hparams.persistent_workers and workers > 0,
            prefetch_factor=self.hparams.prefetch_factor if workers > 0 else None,
        )

    @property
    def eval_batch_size(self) -> int:
        return self.hparams.eval_batch_size or self.hparams.batch_size

    def train_dataloader(self) -> DataLoader:
        """Shuffled by the run's seed and resumable mid-epoch in the same order and augmentations (see
        ``ResumableLoader``); under DDP each process gets its share of each epoch's permutation."""
        sampler = ShuffledSampler(self.train_dataset)
        loader = self._loader(SeededItems(self.train_dataset), self.hparams.batch_size, sampler, ResumableLoader)
        if self._resume_at is not None:
            loader.resume_from(self._resume_at)
            self._resume_at = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the training loader's position (epoch, batches done, seed)."""
        return {} if self._train_loader is None else {"train_position": self._train_loader.position()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning restores this before it builds the loaders (unlike its own loader states, which it skips
        when the loader was built early, e.g. to count the schedule's steps): the next training loader
        continues from the saved position."""
        self._resume_at = state_dict.get("train_position")

    def val_dataloader(self) -> DataLoader | list:
        """Every image exactly once, also across processes: the validation's metrics are sums over images."""
        if self.eval_dataset is None:
            return []
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        """Every image exactly once, also across processes (see ``EvenlySplitSampler``)."""
        return self._eval_loader()

    def _eval_loader(self) -> DataLoader:
        sampler = None  # one process: in order; several: each its share, none padded (Lightning's would be)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sampler = EvenlySplitSampler(self.eval_dataset)
        return self._loader(self.eval_dataset, self.eval_batch_size, sampler)


class EmbeddedDataModule(ImageDataModule):
    """The photos shipped with scikit-image and matplotlib, for a first run on a fresh machine.

    The same photos serve for training (augmented, repeated ``repeats`` times per epoch) and validation
    (center crop): a smoke test of the whole pipeline, not a benchmark.
    """

    def __init__(self, repeats: int = 4, **kwargs: object) -> None:
        if kwargs.get("holdout_per_class") is not None:
            raise ValueError(
                "data.holdout_per_class needs a training folder to hold images out of; data=embedded has none "
                "(use data=folder with data.train_root, or data=imagenette)"
            )
        super().__init__(**kwargs)
        self.repeats = int(repeats)

    def check_ground_truth(self, num_classes: int) -> None:
        raise ValueError(
            "labels=ground_truth: the embedded sample photos have no labels; train on labelled images "
            "(data=folder with data.train_root, or data=imagenette) or use labels=model"
        )

    def _samples(self, split: str) -> list[Sample]:
        return embedded_samples()

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if stage in (None, "fit") and not isinstance(self.train_dataset, ConcatDataset) and self.repeats > 1:
            self.train_dataset = ConcatDataset([self.train_dataset] * self.repeats)
