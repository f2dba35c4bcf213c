"""Pre-decoded images (``data.image_cache``): every image decoded and resized once, kept as uint8 in one
memory-mapped file, so that later epochs (and validations) skip the JPEG decode and the resize, the costly part
of a CPU-bound loader, and only crop, flip and scale to [0, 1].

A cache is named by a key: the SHA-256 of the image list (each file's path, size and modification time), the
resize, the pixel limit and this format's version, so a changed image, list or setting gets a new cache and
never reads a stale one. Files, in the cache folder: ``images-<key>.u8`` (all images' pixels, one after the
other, CHW) and ``images-<key>.npz`` (offsets, shapes, and the error of each image that could not be used),
each written to a temporary name and moved into place, the index last: a cache without its index is rebuilt.
The index is read without pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from tame_lit.data.images import load_rgb, resize_stage
from tame_lit.data.sources import Sample
from tame_lit.io import atomic_path

__all__ = ["DecodedImages", "build_decoded_images", "images_key", "open_decoded_images"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def images_key(samples: Sequence[Sample], resize_size: int, max_pixels: int | None) -> str:
    """The cache key of these images decoded at this resize: changes when any file, the list or a setting does."""
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, resize_size, max_pixels]).encode())
    for path, _ in samples:
        try:
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError as error:  # decoding will fail and name it; the key still reflects the missing file
            digest.update(f"{path}\0{type(error).__name__}\n".encode())
    return digest.hexdigest()[:24]


def _files(folder: str | os.PathLike, key: str) -> tuple[Path, Path]:
    folder = Path(folder)
    return folder / f"images-{key}.u8", folder / f"images-{key}.npz"


class DecodedImages:
    """A built cache: ``images[i]`` is image ``i`` as a uint8 ``[3, H, W]`` tensor (its shorter side resized as
    ``data.resize_size`` says), or the error message of an image that could not be used. The pixel file is mapped
    on first use in each process, so that loader workers receive its path, never a copy of its contents."""

    def __init__(self, pixels_path: Path, offsets: np.ndarray, shapes: np.ndarray, errors: dict[int, str]) -> None:
        self.pixels_path = pixels_path
        self.offsets = offsets  # int64 [N + 1]
        self.shapes = shapes  # int64 [N, 3]
        self.errors = errors
        self._pixels: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> Tensor | str:
        if index in self.errors:
            return self.errors[index]
        if self._pixels is None:
            self._pixels = np.memmap(self.pixels_path, dtype=np.uint8, mode="r")
        start, end = self.offsets[index], self.offsets[index + 1]
        # a copy: the map is read-only and tensors made from it must be writable for the transforms
        return torch.from_numpy(np.array(self._pixels[start:end]).reshape(self.shapes[index]))


class _Decoder(Dataset):
    """Decodes and resizes image ``i`` as the loader would, for the build (run in the loader's workers)."""

    def __init__(self, samples: Sequence[Sample], resize_size: int, max_pixels: int | None) -> None:
        self.paths = [path for path, _ in samples]
        self.resize = resize_stage(resize_size)
        self.resize_size = resize_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray | str:
        path = self.paths[index]
        try:
            return self.resize(load_rgb(path, self.resize_size, self.max_pixels)).numpy()
        except Exception as error:  # named and counted at every use, as an unreadable image is without a cache
            return f"{type(error).__name__}: {error}"


def build_decoded_images(
    folder: str | os.PathLike,
    samples: Sequence[Sample],
    resize_size: int,
    max_pixels: int | None,
    num_workers: int = 0,
) -> Path:
    """Decode and resize every image of ``samples`` into the cache ``folder`` (``num_workers`` processes);
    returns the index's path. Written under temporary names, moved into place when whole."""
    key = images_key(samples, resize_size, max_pixels)
    pixels_path, index_path = _files(folder, key)
    started = time.perf_counter()
    loader = DataLoader(
        _Decoder(samples, resize_size, max_pixels), batch_size=None, num_workers=num_workers, collate_fn=_identity
    )
    offsets, shapes, error_indices, error_texts = [0], [], [], []
    with atomic_path(pixels_path) as temporary, open(temporary, "wb") as out:
        for index, item in enumerate(loader):
            if isinstance(item, str):
                error_indices.append(index)
                error_texts.append(item)
                shapes.append((0, 0, 0))
            else:
                out.write(np.ascontiguousarray(item, dtype=np.uint8).tobytes())
                shapes.append(item.shape)
            offsets.append(offsets[-1] + int(np.prod(shapes[-1])))
            if (index + 1) % 5000 == 0:
                log.info("data.image_cache: %d of %d images decoded", index + 1, len(samples))
    with atomic_path(index_path) as temporary, open(temporary, "wb") as out:  # savez would add .npz to a name
        np.savez(
            out,
            offsets=np.asarray(offsets, dtype=np.int64),
            shapes=np.asarray(shapes, dtype=np.int64).reshape(-1, 3),
            error_indices=np.asarray(error_indices, dtype=np.int64),
            error_texts=np.asarray(error_texts, dtype=np.str_),
        )
    log.info(
        "data.image_cache: %d images (%d unusable) decoded at %d px into %s (%.1f GB) in %.0f s",
        len(samples), len(error_indices), resize_size, pixels_path, offsets[-1] / 1e9, time.perf_counter() - started,
    )  # fmt: skip
    return index_path


def _identity(item: object) -> object:
    return item


def open_decoded_images(
    folder: str | os.PathLike, samples: Sequence[Sample], resize_size: int, max_pixels: int | None
) -> DecodedImages | None:
    """The cache of exactly these images and settings in ``folder``, or None when it is not there (or was left
    half-written: its pixel file is not the size its index says)."""
    pixels_path, index_path = _files(folder, images_key(samples, resize_size, max_pixels))
    if not (index_path.is_file() and pixels_path.is_file()):
        return None
    with np.load(index_path, allow_pickle=False) as index:
        offsets, shapes = index["offsets"], index["shapes"]
        errors = dict(zip(index["error_indices"].tolist(), index["error_texts"].tolist(), strict=True))
    if len(shapes) != len(samples) or pixels_path.stat().st_size != offsets[-1]:
        return None
    return DecodedImages(pixels_path, offsets, shapes, errors)
