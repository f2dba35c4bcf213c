from __future__ import annotations

import pytest
import torch
from PIL import Image

from tame_lit.data import BoxSource, EvenlySplitSampler, ImageDataset, collate, eval_transform
from tame_lit.metrics import ScoredBatch
from tame_lit.metrics.pointing import PointingGame, box_mask


def pointed(maps: torch.Tensor, targets: torch.Tensor, boxes: list[torch.Tensor] | None) -> ScoredBatch:
    """A scored batch for the pointing game: only the maps, targets and boxes matter (no model call)."""
    images = torch.zeros(maps.shape[0], 3, *maps.shape[-2:])
    return ScoredBatch(lambda x: torch.zeros(x.shape[0], 10), images, maps, targets, boxes=boxes)


def peak_map(y: int, x: int, size: int = 20) -> torch.Tensor:
    image_map = torch.zeros(size, size)
    image_map[y, x] = 1.0
    return image_map


def test_pointing_game_by_hand():
    metric = PointingGame(tolerance=2)
    maps = torch.stack([peak_map(5, 5), peak_map(5, 12), peak_map(5, 9), peak_map(0, 0)])
    box = torch.tensor([[3.0, 2, 2, 8, 8]])  # class 3, x and y in [2, 8]
    other_class = torch.tensor([[4.0, 2, 2, 8, 8]])
    targets = torch.tensor([3, 3, 3, 3])
    # inside: hit; 12.5 - 8 = 4.5 px away: miss; 9.5 - 8 = 1.5 px: hit within 2 px; no box of class 3: not counted
    metric.update(pointed(maps, targets, [box, box, box, other_class]))
    values = metric.compute()
    assert values["pointing_images"] == 3
    assert values["pointing_game"] == pytest.approx(2 / 3)
    # all the map's mass sits on one pixel: inside the box (1), outside (0), outside (0)
    assert values["energy_pointing_game"] == pytest.approx(1 / 3)
    per_image = metric.per_image()  # the counted images only
    assert per_image["index"].tolist() == [0, 1, 2] and per_image["pointing_game"].tolist() == [1.0, 0.0, 1.0]
    assert per_image["energy_pointing_game"].tolist() == [1.0, 0.0, 0.0]


def test_pointing_without_boxes_counts_nothing_and_shows_no_value():
    metric = PointingGame()
    metric.update(pointed(torch.rand(2, 8, 8), torch.tensor([1, 2]), None))
    assert metric.compute() == {} and metric.per_image()["index"].numel() == 0


def test_energy_pointing_game_is_the_share_of_mass_in_the_union_of_boxes():
    image_map = torch.zeros(10, 10)
    image_map[1, 1] = 3.0  # in box A
    image_map[8, 8] = 1.0  # in box B (same class)
    image_map[1, 8] = 4.0  # outside both
    boxes = torch.tensor([[7.0, 0, 0, 3, 3], [7.0, 7, 7, 10, 10], [2.0, 7, 0, 10, 3]])  # last: another class
    metric = PointingGame(tolerance=0)
    metric.update(pointed(image_map[None], torch.tensor([7]), [boxes]))
    values = metric.compute()
    assert values["energy_pointing_game"] == pytest.approx(4 / 8)
    assert values["pointing_game"] == 0.0  # the peak (1, 8) is in the other class's box only
    assert box_mask(boxes[:2, 1:], 10, 10).sum() == 9 + 9


def test_pointing_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match=r"one tensor per image \(2\), got 1"):
        PointingGame().update(pointed(torch.zeros(2, 4, 4), torch.zeros(2, dtype=torch.long), [torch.zeros(0, 5)]))
    with pytest.raises(ValueError, match="tolerance"):
        PointingGame(tolerance=-1)


def write_xml(path, width: int, height: int, objects: list[tuple[str, int, int, int, int]]) -> None:
    parts = [f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, x0, y0, x1, y1 in objects:
        parts.append(f"<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
                     f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")  # fmt: skip
    path.write_text("".join(parts) + "</annotation>")


def test_imagenet_xml_boxes_follow_the_resize_and_crop(tmp_path):
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    (tmp_path / "boxes").mkdir()
    image_path = tmp_path / "val" / "n01440764" / "ILSVRC2012_val_00000001.JPEG"
    Image.new("RGB", (100, 50)).save(image_path, format="JPEG")
    # annotated on a 200 x 100 original: the stored image is half that size, so boxes scale by 1/2
    write_xml(tmp_path / "boxes" / "ILSVRC2012_val_00000001.xml", 200, 100,
              [("n01440764", 81, 21, 120, 60), ("n01440764", 1, 1, 10, 10)])  # fmt: skip
    source = BoxSource(tmp_path / "boxes")
    dataset = ImageDataset([(str(image_path), 0)], eval_transform(50, 40), boxes=source)
    image, _, _, boxes = dataset[0]
    assert image.shape == (3, 40, 40)
    # 100 x 50 -> resize(50) keeps it; center crop 40 x 40 starts at x = 30, y = 5
    # box 1: pixels 81..120 x 21..60 of 200 x 100 -> edges [40, 120] x [10, 60] / 2 = [40, 60] x [10, 30]
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 10, 5, 30, 25]]))  # the second box is cropped away
    batch = collate([dataset[0], dataset[0]])
    assert len(batch["boxes"]) == 2 and torch.equal(batch["boxes"][1], boxes)


def test_missing_box_files_are_named_before_any_work(tmp_path):
    (tmp_path / "boxes").mkdir()
    with pytest.raises(FileNotFoundError, match=r"2 of 2 images.*a\.JPEG"):
        BoxSource(tmp_path / "boxes").check([str(tmp_path / "a.JPEG"), str(tmp_path / "b.JPEG")])
    with pytest.raises(FileNotFoundError, match="box directory not found"):
        BoxSource(tmp_path / "absent")
    (tmp_path / "boxes" / "a.xml").write_text("<annotation><object><name>x</name></object>")
    with pytest.raises(ValueError, match=r"a\.xml"):
        BoxSource(tmp_path / "boxes").for_image(tmp_path / "a.JPEG", (10, 10))


def test_evenly_split_sampler_gives_every_index_once():
    dataset = list(range(7))
    parts = [list(EvenlySplitSampler(dataset, num_replicas=3, rank=rank)) for rank in range(3)]
    assert sorted(index for part in parts for index in part) == list(
        range(7)
    )  # torch's DistributedSampler would repeat 2 images
    assert [len(EvenlySplitSampler(dataset, num_replicas=3, rank=rank)) for rank in range(3)] == [3, 2, 2]
