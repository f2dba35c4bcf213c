"""The clean-pass cache (``clean_pass_cache``): the hooked features of the head's layers (float16) and the
backbone's top-1 class of every training image, kept in memory-mapped files, so that a training step on a cached
image is the head, the masked pass and the backward only, not a second forward of the clean image.

It holds only when every epoch sees the same pixels (``data.augment=false``). The first epoch (of the first run)
fills it as it trains; later epochs, resumed runs and other runs on the same images (hyperparameter trials)
read it. A batch is read from the cache when all its images are there, else computed (and stored). Whether read
or computed, the step uses the stored float16 values, so cached and uncached epochs train on the same inputs.

The cache is a folder ``clean-pass-<key>`` named by the SHA-256 of the backbone (name and every weight), the
layers and the images (files, list, resize, crop, pixel limit): another backbone, weight file, layer set, image
list or transform gets another folder, never stale features. Its files: ``meta.json`` (what it holds),
``layer<i>.npy`` (``[images, C, H, W]`` float16 each), ``top1.npy`` and ``stored.npy`` (which images are
there; set after their features). Processes write disjoint images (DDP), each image's row at most once per
epoch; the folder appears whole (built aside, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from tame_lit.io import create_beside

__all__ = ["CleanPassCache", "weights_digest"]

FORMAT_VERSION = 1
FLOAT16_MAX = float(torch.finfo(torch.float16).max)


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer of ``module`` (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        value = value.detach().cpu().contiguous()
        digest.update(f"{name}\0{tuple(value.shape)}\0{value.dtype}\n".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class CleanPassCache:
    """The clean pass of ``count`` training images through ``backbone`` name/weights at ``layers``, in ``folder``.

    ``images_key``: what identifies the images as the backbone sees them (the data module's
    ``train_images_key``); ``backbone``: its name, ``weights``: ``weights_digest`` of it."""

    def __init__(
        self, folder: str | os.PathLike, backbone: str, weights: str, layers: Sequence[str], images_key: str, count: int
    ) -> None:
        self.description = {
            "format": FORMAT_VERSION,
            "backbone": backbone,
            "weights_sha256": weights,
            "layers": list(layers),
            "images_key": images_key,
            "images": int(count),
        }
        key = hashlib.sha256(json.dumps(self.description, sort_keys=True).encode()).hexdigest()[:24]
        self.folder = Path(folder) / f"clean-pass-{key}"
        self.layers = list(layers)
        self.count = int(count)
        self._arrays: dict[str, np.ndarray] | None = None

    def _open(self) -> bool:
        """Map the folder's files when the folder exists (made by this or another process or run)."""
        if self._arrays is None and (self.folder / "meta.json").is_file():
            meta = json.loads((self.folder / "meta.json").read_text())
            if meta.get("description") != self.description:
                raise ValueError(
                    f"clean_pass_cache: {self.folder} holds {meta.get('description')}, not {self.description}: "
                    "it was changed by hand; delete it and it is rebuilt"
                )
            arrays = {
                f"layer{i}": np.load(self.folder / f"layer{i}.npy", mmap_mode="r+") for i in range(len(self.layers))
            }
            for name in ("top1", "stored"):
                arrays[name] = np.load(self.folder / f"{name}.npy", mmap_mode="r+")
            self._arrays = arrays
        return self._arrays is not None

    def _create(self, features: dict[str, Tensor]) -> None:
        """Make the folder with room for every image (sparse files of zeros), aside then renamed; when another
        process made it first, use theirs."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        aside = create_beside(self.folder, directory=True)
        try:
            for i, layer in enumerate(self.layers):
                shape = (self.count, *features[layer].shape[1:])
                np.lib.format.open_memmap(aside / f"layer{i}.npy", mode="w+", dtype=np.float16, shape=shape).flush()
            np.save(aside / "top1.npy", np.full(self.count, -1, dtype=np.int64))
            np.save(aside / "stored.npy", np.zeros(self.count, dtype=np.uint8))
            shapes = {layer: list(features[layer].shape[1:]) for layer in self.layers}
            meta = {"description": self.description, "shapes": shapes}
            (aside / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            os.rename(aside, self.folder)
        except OSError:
            if not (self.folder / "meta.json").is_file():  # not a lost race with another process: a real failure
                raise
        finally:
            shutil.rmtree(aside, ignore_errors=True)
        self._open()

    def read(self, indices: Tensor, device: torch.device) -> tuple[dict[str, Tensor], Tensor] | None:
        """The stored features (float32, on ``device``) and top-1 classes of images ``indices``, or None unless
        every one of them is stored."""
        if not self._open():
            return None
        rows = indices.cpu().numpy()
        if not self._arrays["stored"][rows].all():
            return None
        features = {
            layer: torch.from_numpy(self._arrays[f"layer{i}"][rows]).to(device, non_blocking=True).float()
            for i, layer in enumerate(self.layers)
        }
        return features, torch.from_numpy(self._arrays["top1"][rows]).to(device)

    def write(self, indices: Tensor, features: dict[str, Tensor], top1: Tensor) -> dict[str, Tensor]:
        """Store the clean pass of images ``indices``; returns the features as stored (float16 values as float32,
        on their device): what the step trains on, as a later read would give it."""
        stored = {}
        for layer in self.layers:
            value = features[layer].detach()
            if value.isfinite().all() and value.abs().max() > FLOAT16_MAX:
                raise ValueError(
                    f"clean_pass_cache stores float16 features, and layer {layer!r} has values beyond "
                    f"{FLOAT16_MAX:g} (max {float(value.abs().max()):g}): train this layer set without the cache "
                    "(clean_pass_cache=null)"
                )
            stored[layer] = value.to(torch.float16)
        if not self._open():
            self._create(stored)
        rows = indices.cpu().numpy()
        for i, layer in enumerate(self.layers):
            self._arrays[f"layer{i}"][rows] = stored[layer].cpu().contiguous().numpy()
        self._arrays["top1"][rows] = top1.cpu().numpy()
        self._arrays["stored"][rows] = 1  # after the features: a stored image is whole
        return {layer: value.float() for layer, value in stored.items()}
