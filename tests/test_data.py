from __future__ import annotations

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
