from __future__ import annotations

import hashlib
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tame_lit.data import (
    EmbeddedDataModule,
    ImageDataModule,
    ImageDataset,
    UnreadableImageWarning,
    collate,
    embedded_samples,
    eval_transform,
    folder_samples,
    list_samples,
    load_rgb,
)
from tame_lit.data.sources import first_per_class, holdout_split


def save_modes(folder) -> dict[str, object]:
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.new("RGB", (40, 30), (200, 40, 10))
    paths = {}
    for mode in ("L", "P", "CMYK", "1"):
        path = folder / f"{mode}.png" if mode != "CMYK" else folder / "cmyk.jpg"
        rgb.convert(mode).save(path)
        paths[mode] = path
    rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))  # fully transparent black
    rgba.save(folder / "rgba.png")
    paths["RGBA"] = folder / "rgba.png"
    Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16)).save(folder / "i16.png")
    paths["I;16"] = folder / "i16.png"
    return paths


def test_every_image_mode_becomes_8bit_rgb(tmp_path):
    paths = save_modes(tmp_path)
    for mode, path in paths.items():
        image = load_rgb(path)
        assert image.mode == "RGB" and image.size == (40, 30), mode
    assert load_rgb(paths["RGBA"]).getpixel((0, 0)) == (255, 255, 255)  # composited over white
    assert load_rgb(paths["I;16"]).getpixel((0, 0)) == (255, 255, 255)  # 16-bit scaled, not clipped
    gray = Image.new("RGB", (1, 1), (200, 40, 10)).convert("L").getpixel((0, 0))
    assert load_rgb(paths["L"]).getpixel((0, 0)) == (gray, gray, gray)


def make_folder(root, corrupt: bool = False):
    for wnid, colour in (("n01440764", (255, 0, 0)), ("n02102040", (0, 255, 0))):
        (root / wnid).mkdir(parents=True)
        for index in range(3):
            Image.new("RGB", (50, 40), colour).save(root / wnid / f"{index}.jpg")
    if corrupt:
        (root / "n01440764" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        truncated = (root / "n02102040" / "0.jpg").read_bytes()
        (root / "n02102040" / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])


def test_unreadable_files_are_skipped_with_a_warning_and_counted(tmp_path):
    make_folder(tmp_path, corrupt=True)
    samples, _ = folder_samples(tmp_path)
    dataset = ImageDataset(samples, eval_transform(32, 32))
    with pytest.warns(UnreadableImageWarning, match="broken.jpg"):
        items = [dataset[i] for i in range(len(dataset))]
    batch = collate(items)
    assert batch["images"].shape == (6, 3, 32, 32) and batch["skipped"] == 2
    assert set(batch["labels"].tolist()) == {0, 217}

    data = ImageDataModule(train_root=str(tmp_path), batch_size=4, num_workers=0, resize_size=32, crop_size=32)
    data.setup("fit")
    with pytest.warns(UnreadableImageWarning):
        batches = list(data.train_dataloader())
    assert sum(b["images"].shape[0] for b in batches) == 6
    assert sum(b["skipped"] for b in batches) == 2


def test_a_batch_of_only_unreadable_files_is_empty_not_an_error():
    batch = collate([None, None])
    assert batch["images"].shape[0] == 0 and batch["skipped"] == 2


def test_wordnet_folders_get_imagenet_indices_and_other_folders_their_order(tmp_path):
    make_folder(tmp_path / "wnids")
    samples, classes = folder_samples(tmp_path / "wnids")
    assert classes == ["n01440764", "n02102040"]
    assert sorted({label for _, label in samples}) == [0, 217]  # tench, English springer
    assert sorted({label for _, label in folder_samples(tmp_path / "wnids", "folder")[0]}) == [0, 1]
    (tmp_path / "named" / "cats").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "named" / "cats" / "a.png")
    assert folder_samples(tmp_path / "named")[0][0][1] == 0
    with pytest.raises(ValueError, match="not ImageNet WordNet ids"):
        folder_samples(tmp_path / "named", "imagenet")


def test_missing_or_empty_directories_fail_at_setup_naming_the_path(tmp_path):
    data = ImageDataModule(train_root=str(tmp_path / "absent"), num_workers=0)
    with pytest.raises(FileNotFoundError, match="absent"):
        data.setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        ImageDataModule(train_root=str(tmp_path / "empty"), num_workers=0).setup("fit")
    (tmp_path / "noimages" / "class_a").mkdir(parents=True)
    (tmp_path / "noimages" / "class_a" / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match="noimages"):
        ImageDataModule(train_root=str(tmp_path / "noimages"), num_workers=0).setup("fit")


def test_tame_list_files(tmp_path):
    make_folder(tmp_path / "images")
    listing = tmp_path / "val.txt"
    listing.write_text("n01440764/0.jpg 0\n\nn02102040/1.jpg 217\n")
    samples = list_samples(tmp_path / "images", listing)
    assert [label for _, label in samples] == [0, 217]
    assert samples[1][0].endswith("n02102040/1.jpg")
    listing.write_text("n01440764/0.jpg zero\n")
    with pytest.raises(ValueError, match=r"val.txt:1"):
        list_samples(tmp_path / "images", listing)
    data = ImageDataModule(train_root=str(tmp_path / "images"), train_list=str(tmp_path / "absent.txt"))
    with pytest.raises(FileNotFoundError, match=r"absent\.txt"):
        data.setup("fit")


def test_limit_keeps_the_first_images(tmp_path):
    make_folder(tmp_path)
    data = ImageDataModule(root=str(tmp_path), limit=4, num_workers=0, resize_size=16, crop_size=16)
    data.setup("validate")
    assert len(data.eval_dataset) == 4


def test_limit_per_class_keeps_a_class_balanced_subset(tmp_path):
    make_folder(tmp_path / "val")
    make_folder(tmp_path / "train")
    data = ImageDataModule(
        root=str(tmp_path / "val"), train_root=str(tmp_path / "train"), limit_per_class=2, limit=3,
        train_limit_per_class=1, num_workers=0, resize_size=16, crop_size=16,
    )  # fmt: skip
    data.setup("fit")
    eval_labels = [label for _, label in data.eval_dataset.samples]
    assert eval_labels == [0, 0, 217]  # two tench (index 0), then the limit of 3 cuts the springers (217)
    assert sorted(label for _, label in data.train_dataset.samples) == [0, 217]
    with pytest.raises(ValueError, match=r"data\.train_limit_per_class must be >= 1, got 0"):
        ImageDataModule(root=str(tmp_path / "val"), train_root=str(tmp_path / "train"), train_limit_per_class=0,
                        num_workers=0).setup("fit")  # fmt: skip


def test_embedded_default_photos_load_from_installed_packages():
    samples = embedded_samples()
    assert len(samples) >= 15
    assert any("skimage" in path for path, _ in samples) and any("matplotlib" in path for path, _ in samples)
    data = EmbeddedDataModule(repeats=3, batch_size=64, num_workers=0, resize_size=40, crop_size=32)
    data.setup("fit")
    assert len(data.train_dataset) == 3 * len(samples) and len(data.eval_dataset) == len(samples)
    batch = next(iter(data.val_dataloader()))
    assert batch["images"].shape == (len(samples), 3, 32, 32) and batch["skipped"] == 0
    assert batch["images"].min() >= 0 and batch["images"].max() <= 1
    assert (batch["labels"] == -1).all()
    assert batch["images"].dtype == torch.float32


HOLDOUT_CLASSES = {"n01440764": 7, "n02102040": 5, "n02979186": 9}  # tench, springer, cassette player


def make_classes(root, counts=HOLDOUT_CLASSES) -> None:
    for wnid, count in counts.items():
        (root / wnid).mkdir(parents=True)
        for index in range(count):
            Image.new("RGB", (8, 8), (index * 20, 0, 0)).save(root / wnid / f"img_{index:02d}.png")


def relative(samples, root) -> list[tuple[str, int]]:
    return [(Path(path).relative_to(root).as_posix(), label) for path, label in samples]


def test_holdout_split_is_disjoint_covers_every_image_and_holds_out_n_by_path_hash(tmp_path):
    make_classes(tmp_path)
    samples, _ = folder_samples(tmp_path)
    train, held = holdout_split(samples, 2, tmp_path)
    assert sorted(train + held) == sorted(samples) and not set(train) & set(held)
    assert train == [s for s in samples if s not in held]  # both sides keep the folder order
    labels = [label for _, label in held]
    assert sorted(labels) == [0, 0, 217, 217, 482, 482]
    for wnid in HOLDOUT_CLASSES:  # the first 2 of each class by the SHA-1 of the relative posix path
        names = sorted((f"{wnid}/{p.name}" for p in (tmp_path / wnid).iterdir()),
                       key=lambda name: hashlib.sha1(name.encode()).hexdigest())  # fmt: skip
        assert sorted(name for name, _ in relative(held, tmp_path) if name.startswith(wnid)) == sorted(names[:2])
    assert held != first_per_class(samples, 2)  # not simply the first files of each class


def test_holdout_split_ignores_listing_order_and_path_prefix(tmp_path):
    make_classes(tmp_path / "a" / "train")
    shutil.copytree(tmp_path / "a" / "train", tmp_path / "elsewhere" / "deeper" / "copy")
    samples, _ = folder_samples(tmp_path / "a" / "train")
    train, held = holdout_split(samples, 3, tmp_path / "a" / "train")
    moved, _ = folder_samples(tmp_path / "elsewhere" / "deeper" / "copy")
    random.Random(0).shuffle(moved)
    train2, held2 = holdout_split(moved, 3, tmp_path / "elsewhere" / "deeper" / "copy")
    assert sorted(relative(held, tmp_path / "a" / "train")) == sorted(
        relative(held2, tmp_path / "elsewhere" / "deeper" / "copy")
    )
    assert sorted(relative(train, tmp_path / "a" / "train")) == sorted(
        relative(train2, tmp_path / "elsewhere" / "deeper" / "copy")
    )


def test_holdout_module_trains_on_the_rest_and_evaluates_the_held_out_images(tmp_path, caplog):
    make_classes(tmp_path / "train")
    make_folder(tmp_path / "val")  # the reported images: never seen with a holdout
    options = dict(root=str(tmp_path / "val"), train_root=str(tmp_path / "train"), holdout_per_class=2,
                   num_workers=0, resize_size=8, crop_size=8)  # fmt: skip
    samples, classes = folder_samples(tmp_path / "train")
    train, held = holdout_split(samples, 2, tmp_path / "train")
    data = ImageDataModule(**options)
    with caplog.at_level(logging.INFO, logger="tame_lit.data.modules"):
        data.setup("fit")
    assert data.train_dataset.samples == train and data.eval_dataset.samples == held
    assert data.class_names == classes == sorted(HOLDOUT_CLASSES)
    assert "data.holdout_per_class=2" in caplog.text and "data.root ignored" in caplog.text
    assert [len(b["labels"]) for b in data.val_dataloader()] == [6]
    evaluation = ImageDataModule(**options)  # evaluate.py: the held-out side only, the same images
    evaluation.setup("test")
    assert evaluation.train_dataset is None and evaluation.eval_dataset.samples == held
    assert [len(b["labels"]) for b in evaluation.test_dataloader()] == [6]
    # the limits apply to each side after the split: per class first, then the total
    limited = ImageDataModule(**options, train_limit_per_class=1, limit_per_class=1, limit=2)
    limited.setup("fit")
    assert limited.train_dataset.samples == first_per_class(train, 1)
    assert limited.eval_dataset.samples == first_per_class(held, 1)[:2]


def test_holdout_errors_name_the_setting_the_class_and_what_is_valid(tmp_path):
    make_classes(tmp_path / "train")
    with pytest.raises(ValueError, match=r"data\.holdout_per_class must be >= 1, got 0"):
        ImageDataModule(train_root=str(tmp_path / "train"), holdout_per_class=0)
    with pytest.raises(ValueError, match=r"data\.holdout_per_class .*set data\.train_root"):
        ImageDataModule(root=str(tmp_path / "train"), holdout_per_class=2)
    with pytest.raises(ValueError, match=r"data=embedded has none"):
        EmbeddedDataModule(holdout_per_class=2)
    data = ImageDataModule(train_root=str(tmp_path / "train"), holdout_per_class=5, num_workers=0)
    with pytest.raises(ValueError, match=r"class n02102040 \(label 217\) has 5 image.*<= 4") as error:
        data.setup("fit")
    assert "n01440764" not in str(error.value)  # 7 images: enough
    with pytest.raises(ValueError, match=r"n02102040 \(label 217\) has 5; class n01440764 \(label 0\) has 7"):
        holdout_split(folder_samples(tmp_path / "train")[0], 8, tmp_path / "train")


def test_holdout_of_a_train_list_splits_the_listed_images_only(tmp_path):
    make_classes(tmp_path / "train")
    listing = tmp_path / "train.txt"
    lines = [
        f"{wnid}/img_{i:02d}.png {label}" for wnid, label in (("n01440764", 0), ("n02102040", 1)) for i in range(4)
    ]
    listing.write_text("\n".join([*lines, lines[0]]) + "\n")  # one image listed twice
    data = ImageDataModule(train_root=str(tmp_path / "train"), train_list=str(listing), holdout_per_class=2,
                           num_workers=0, resize_size=8, crop_size=8)  # fmt: skip
    data.setup("fit")
    train = relative(data.train_dataset.samples, tmp_path / "train")
    held = relative(data.eval_dataset.samples, tmp_path / "train")
    assert not set(train) & set(held) and len(set(held)) == 4 and len(train) + len(held) == 9
    assert sorted(label for _, label in set(held)) == [0, 0, 1, 1]
    assert all(name.startswith(("n01440764/img_0", "n02102040/img_0")) for name, _ in train + held)


def test_loader_settings_reach_the_loaders(tmp_path):
    make_folder(tmp_path)
    data = ImageDataModule(root=str(tmp_path), train_root=str(tmp_path), num_workers=1, persistent_workers=False,
                           prefetch_factor=4, resize_size=16, crop_size=16)  # fmt: skip
    data.setup("fit")
    for loader in (data.train_dataloader(), data.val_dataloader()):
        assert loader.prefetch_factor == 4 and not loader.persistent_workers and loader.num_workers == 1
    default = ImageDataModule(root=str(tmp_path), num_workers=2, resize_size=16, crop_size=16)
    default.setup("validate")
    assert default.val_dataloader().persistent_workers and default.val_dataloader().prefetch_factor == 2
    with pytest.raises(ValueError, match=r"data\.prefetch_factor must be >= 1, got 0"):
        ImageDataModule(root=str(tmp_path), prefetch_factor=0)


def test_augment_false_trains_on_the_centre_crop_every_epoch(tmp_path):
    generator = torch.Generator().manual_seed(0)
    for wnid in ("n01440764", "n02102040"):
        (tmp_path / wnid).mkdir()
        for index in range(2):  # noise: every crop and flip of it differs
            pixels = (torch.rand(40, 50, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / wnid / f"{index}.png")
    options = dict(root=str(tmp_path), train_root=str(tmp_path), num_workers=0, resize_size=20, crop_size=16)
    plain = ImageDataModule(augment=False, **options)
    plain.setup("fit")
    for index in range(len(plain.train_dataset)):
        first, second = plain.train_dataset[index][0], plain.train_dataset[index][0]
        assert torch.equal(first, second) and torch.equal(first, plain.eval_dataset[index][0])
    augmented = ImageDataModule(**options)
    augmented.setup("fit")
    torch.manual_seed(0)
    draws = [augmented.train_dataset[0][0] for _ in range(8)]
    assert any(not torch.equal(draw, draws[0]) for draw in draws)  # random crops and flips
