"""The caches of issue #15: pre-decoded images (``data.image_cache``) and the clean pass (``clean_pass_cache``)."""

from __future__ import annotations

import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tame_lit.data import ImageDataModule, ImageDataset, UnreadableImageWarning, folder_samples, train_transform
from tame_lit.data.cache import build_decoded_images, images_key, open_decoded_images


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
            with warnings.catch_warnings(record=True):
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
    # loader workers get the cache's path, not its pixels, and map the file themselves
    copy = pickle.loads(pickle.dumps(decoded))
    assert decoded._pixels is not None and copy._pixels is None and len(pickle.dumps(decoded)) < 1000
    assert torch.equal(copy[0], decoded[0])


def test_a_changed_image_or_setting_gets_a_new_cache_and_a_half_written_one_is_not_read(tmp_path):
    make_photos(tmp_path / "photos")
    samples, _ = folder_samples(tmp_path / "photos")
    index_path = build_decoded_images(tmp_path / "cache", samples, 36, None)
    key = images_key(samples, 36, None)
    assert images_key(samples, 40, None) != key  # another resize
    assert images_key(samples, 36, 1000) != key  # another pixel limit
    assert images_key(samples[:-1], 36, None) != key  # another image list
    assert open_decoded_images(tmp_path / "cache", samples, 40, None) is None
    first = samples[0][0]
    Image.new("RGB", (50, 40), (1, 2, 3)).save(first)  # the same file name, new pixels
    os.utime(first, ns=(0, os.stat(first).st_mtime_ns + 10**9))  # a later time, even on a coarse clock
    assert images_key(samples, 36, None) != key
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


# ---- the clean-pass cache -------------------------------------------------------------------------------------


def clean_pass_run(tmp_path, cache, epochs=2, seed=0, layers=None, **data):
    """A tiny TAME head trained ``epochs`` epochs on 6 noise photos (batch 4: a full and a partial batch), with
    ``clean_pass_cache=cache``; returns the module and the number of clean training forwards each epoch made."""
    import lightning as L

    from tame_lit.training import HeadTrainingModule
    from tests.helpers import TINY_BACKBONE

    if not (tmp_path / "photos").is_dir():
        make_photos(tmp_path / "photos")
    options = {"root": str(tmp_path / "photos"), "train_root": str(tmp_path / "photos"), "resize_size": 72}
    options |= {"crop_size": 64, "batch_size": 4, "num_workers": 0, "augment": False} | data
    torch.manual_seed(seed)
    head = {"name": "tame"} | ({"layers": layers} if layers else {})
    module = HeadTrainingModule(backbone=TINY_BACKBONE, head=head, clean_pass_cache=cache)
    clean_forwards: list[int] = []
    features = module.backbone.features

    def counted(images, layers, *args, **kwargs):
        if module.training:
            clean_forwards[-1] += 1
        return features(images, layers, *args, **kwargs)

    module.backbone.features = counted

    class PerEpoch(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            clean_forwards.append(0)

    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[PerEpoch()], num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=ImageDataModule(**options))
    return module, clean_forwards


def test_the_first_epoch_fills_the_cache_and_later_epochs_skip_the_clean_pass(tmp_path):
    module, clean_forwards = clean_pass_run(tmp_path, str(tmp_path / "cache"), epochs=3)
    assert clean_forwards == [2, 0, 0]  # 2 batches of clean passes, then none
    (folder,) = (tmp_path / "cache").glob("clean-pass-*")
    assert np.load(folder / "stored.npy").tolist() == [1] * 6
    # what is stored is the backbone's clean pass of the centre crops, in float16, and its top-1
    dataset = module.trainer.datamodule.train_dataset
    images = torch.stack([dataset[i][0] for i in range(6)])
    module.eval()
    with torch.no_grad():
        logits, features = module.backbone.features(images, module.head.layers)
    assert np.load(folder / "top1.npy").tolist() == logits.argmax(dim=1).tolist()
    for i, layer in enumerate(module.head.layers):
        stored = torch.from_numpy(np.load(folder / f"layer{i}.npy")).float()
        assert torch.equal(stored, features[layer].half().float()), layer


def test_a_cached_step_has_the_loss_of_an_uncached_one_on_the_same_images(tmp_path):
    module, _ = clean_pass_run(tmp_path, str(tmp_path / "cache"), epochs=1)
    module.eval()  # batch-norm statistics fixed: the two steps differ only by where the clean pass came from
    batch = next(iter(module.trainer.datamodule.train_dataloader()))
    images, indices = batch["images"], batch["indices"]
    original = module.backbone.features
    module.backbone.features = lambda *args, **kwargs: pytest.fail("a cached batch ran the clean pass")
    with torch.no_grad():
        top1, cached = module.clean_pass(images, indices)
        cached_terms, _ = module.masking_pass(images, cached, top1)
    module.backbone.features = original
    with torch.no_grad():
        logits, features = module.backbone.features(images, module.head.layers)
        terms, _ = module.masking_pass(images, features, logits.argmax(dim=1))
    assert torch.equal(top1, logits.argmax(dim=1))
    for name, value in terms.items():  # float16 features: within 0.1 % of the float32 ones' loss
        assert torch.allclose(cached_terms[name], value, rtol=1e-3, atol=1e-5), name


def test_another_backbone_weight_layer_set_image_list_or_crop_gets_another_cache(tmp_path):
    cache = str(tmp_path / "cache")
    clean_pass_run(tmp_path, cache, epochs=1)
    clean_pass_run(tmp_path, cache, epochs=1, seed=1)  # other random weights
    clean_pass_run(tmp_path, cache, epochs=1, layers=["layer4"])
    clean_pass_run(tmp_path, cache, epochs=1, train_limit=5)
    clean_pass_run(tmp_path, cache, epochs=1, crop_size=56)
    folders = list((tmp_path / "cache").glob("clean-pass-*"))
    assert len(folders) == 5
    _, clean_forwards = clean_pass_run(tmp_path, cache, epochs=1)  # the first run's settings again: all cached
    assert clean_forwards == [0] and len(list((tmp_path / "cache").glob("clean-pass-*"))) == 5
    photo = next((tmp_path / "photos").rglob("*.jpg"))
    os.utime(photo, ns=(0, os.stat(photo).st_mtime_ns + 10**9))  # an image changed
    _, clean_forwards = clean_pass_run(tmp_path, cache, epochs=1)
    assert clean_forwards == [2] and len(list((tmp_path / "cache").glob("clean-pass-*"))) == 6


def test_random_augmentation_is_refused_before_training_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"data\.augment=false"):
        clean_pass_run(tmp_path, str(tmp_path / "cache"), epochs=1, augment=True)
    assert not (tmp_path / "cache").exists()
