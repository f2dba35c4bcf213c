"""The caches of issue #15: pre-decoded images (``data.image_cache``) and the clean pass (``clean_pass_cache``)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tame_lit.data import ImageDataModule, ImageDataset, UnreadableImageWarning, folder_samples, train_transform
from tame_lit.data.cache import build_decoded_images, decoded_images_key, open_decoded_images


def make_photos(root, sizes=((50, 40), (37, 61), (64, 64)), classes=("n01440764", "n02102040")) -> None:
    """Small JPEGs of noise (so that resizing and cropping change every pixel), in WordNet-id folders."""
    rng = np.random.default_rng(0)
    for wnid in classes:
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for index, (width, height) in enumerate(sizes):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / wnid / f"{index}.jpg", quality=90)


def test_cached_images_equal_decoded_ones_crop_for_crop_and_keep_unreadable_ones_skipped(tmp_path):
    make_photos(tmp_path / "photos")
    (tmp_path / "photos" / "n01440764" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    samples, _ = folder_samples(tmp_path / "photos")
    build_decoded_images(tmp_path / "cache", samples, resize_size=36, max_pixels=None)
    decoded = open_decoded_images(tmp_path / "cache", samples, 36, None)
    assert decoded is not None and len(decoded) == len(samples) == 7
    transform = train_transform(36, 32)
    plain = ImageDataset(samples, transform, 36, max_pixels=None)
    cached = ImageDataset(samples, transform, 36, max_pixels=None, decoded=decoded)
    broken = next(i for i, (path, _) in enumerate(samples) if path.endswith("broken.jpg"))
    for index in range(len(samples)):
        for seed in (0, 1, 2):  # random crops and flips: the same draw gives the same pixels
            torch.manual_seed(seed)
            with warnings.catch_warnings(record=True) as plain_warnings:
                warnings.simplefilter("always")
                expected = plain[index]
            torch.manual_seed(seed)
            with warnings.catch_warnings(record=True) as cached_warnings:
                warnings.simplefilter("always")
                got = cached[index]
            if index == broken:
                assert expected is None and got is None
                assert [w.category for w in cached_warnings] == [UnreadableImageWarning]
                assert "broken.jpg" in str(cached_warnings[0].message)
                continue
            assert got[0].dtype == torch.float32 and torch.equal(got[0], expected[0]), (index, seed)
            assert got[1:] == expected[1:]


def test_a_changed_image_or_setting_gets_a_new_cache_and_a_half_written_one_is_not_read(tmp_path):
    make_photos(tmp_path / "photos")
    samples, _ = folder_samples(tmp_path / "photos")
    index_path = build_decoded_images(tmp_path / "cache", samples, 36, None)
    key = decoded_images_key(samples, 36, None)
    assert decoded_images_key(samples, 40, None) != key  # another resize
    assert decoded_images_key(samples, 36, 1000) != key  # another pixel limit
    assert decoded_images_key(samples[:-1], 36, None) != key  # another image list
    assert open_decoded_images(tmp_path / "cache", samples, 40, None) is None
    first = samples[0][0]
    Image.new("RGB", (50, 40), (1, 2, 3)).save(first)  # the same file name, new pixels
    os.utime(first, ns=(0, os.stat(first).st_mtime_ns + 10**9))  # a later time, even on a coarse clock
    assert decoded_images_key(samples, 36, None) != key
    assert open_decoded_images(tmp_path / "cache", samples, 36, None) is None
    rebuilt = build_decoded_images(tmp_path / "cache", samples, 36, None)
    decoded = open_decoded_images(tmp_path / "cache", samples, 36, None)
    assert decoded[0].int().sub(torch.tensor([1, 2, 3]).view(3, 1, 1)).abs().max() <= 3  # the new pixels (JPEG)
    pixels = rebuilt.with_suffix(".u8")
    pixels.write_bytes(pixels.read_bytes()[:-5])  # cut short, as a copy interrupted mid-way
    assert open_decoded_images(tmp_path / "cache", samples, 36, None) is None
    assert index_path != rebuilt


def test_data_module_builds_the_cache_once_and_trains_and_validates_from_it(tmp_path, monkeypatch):
    make_photos(tmp_path / "train")
    make_photos(tmp_path / "val", sizes=((45, 45),))
    options = {"root": str(tmp_path / "val"), "train_root": str(tmp_path / "train"), "resize_size": 36}
    options |= {"crop_size": 32, "batch_size": 4, "num_workers": 0, "image_cache": str(tmp_path / "cache")}
    module = ImageDataModule(**options)
    module.setup("fit")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # the training and the validation images
    assert module.train_dataset.decoded is not None and module.eval_dataset.decoded is not None
    plain = ImageDataModule(**(options | {"image_cache": None}))
    plain.setup("fit")
    assert torch.equal(next(iter(module.val_dataloader()))["images"], next(iter(plain.val_dataloader()))["images"])

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached image was decoded again")

    monkeypatch.setattr("tame_lit.data.cache.build_decoded_images", no_decoding)
    monkeypatch.setattr("tame_lit.data.modules.build_decoded_images", no_decoding)
    again = ImageDataModule(**options)
    again.setup("fit")  # opens the caches the first module built
    assert again.train_dataset.decoded is not None
    assert sum(batch["images"].shape[0] for batch in again.train_dataloader()) == 6


def test_an_unwritable_cache_folder_is_refused_naming_the_key(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"data\.image_cache=.*file: is a file"):
        ImageDataModule(train_root=str(tmp_path), image_cache=str(tmp_path / "file"))
