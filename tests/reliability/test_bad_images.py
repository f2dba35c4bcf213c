"""Issue #14, finding 4: one huge image (a decompression bomb) or any other per-image failure is skipped,
named and counted, never fatal; the pixel limit is configurable; EXIF orientation is applied."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tame_lit import explainers
from tame_lit.cli.explain import explain_files
from tame_lit.data import PIXEL_LIMIT, ImageDataModule, ImageDataset, UnreadableImageWarning, collate, load_rgb
from tame_lit.data.images import eval_transform


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A 100-byte PNG whose header claims ``width x height`` pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    )
    return path


def good_images(root: Path, count: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"good{index}.png" for index in range(count)]
    for index, path in enumerate(paths):
        Image.new("RGB", (72, 72), (60 * index, 120, 200)).save(path)
    return paths


def test_a_decompression_bomb_is_skipped_unread_and_named(tmp_path):
    bomb = png_claiming(tmp_path / "bomb.png", 14_000, 14_000)
    good = good_images(tmp_path, 2)
    dataset = ImageDataset([(str(p), 0) for p in [good[0], bomb, good[1]]], eval_transform(64, 64))
    with pytest.warns(UnreadableImageWarning) as caught:
        batch = collate([dataset[i] for i in range(3)])
    assert batch["images"].shape[0] == 2 and batch["skipped"] == 1 and batch["indices"].tolist() == [0, 2]
    message = str(caught[0].message)
    assert (
        f"{bomb}: ImageTooLargeError: 14000 x 14000 = 196,000,000 pixels, over the limit of {PIXEL_LIMIT:,}" in message
    )


def test_the_pixel_limit_is_configurable(tmp_path):
    good = good_images(tmp_path / "a", 2)
    data = ImageDataModule(root=str(tmp_path), batch_size=4, num_workers=0, resize_size=64, crop_size=64,
                           max_image_pixels=72 * 72 - 1)  # fmt: skip
    data.setup("test")
    with pytest.warns(UnreadableImageWarning, match="over the limit of 5,183"):
        batch = next(iter(data.test_dataloader()))
    assert batch["skipped"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnreadableImageWarning)
        assert load_rgb(good[0], max_pixels=None).size == (72, 72)  # no limit
    with pytest.raises(OSError, match="truncated"):  # past the (absent) limit, into decoding the fake pixels
        load_rgb(png_claiming(tmp_path / "huge.png", 20_000, 20_000), max_pixels=None)


def test_tame_explain_explains_the_good_images_beside_a_bomb(tmp_path, tiny_backbone):
    files = [*good_images(tmp_path / "in", 2), png_claiming(tmp_path / "in" / "bomb.png", 30_000, 30_000)]
    explainer = explainers.create("gradcam", tiny_backbone)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        rows, failed = explain_files(files, explainer, tmp_path / "out", batch_size=4)
    assert len(rows) == 2 and failed == [str(files[2])]


def test_exif_orientation_is_applied(tmp_path):
    """A photo stored sideways with orientation 6 (rotate 90 degrees clockwise to view) comes out upright."""
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # left half red as stored: the top half once upright
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.jpg"
    stored.save(path, exif=exif, quality=95)
    upright = load_rgb(path)
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]
