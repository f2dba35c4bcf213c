"""Relevance mass, relevance rank accuracy and box IoU (issue #17): formulas on a hand-made map, the images they
count, and agreement with Quantus 0.6.0 (optional test dependency: skipped without it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tame_lit.metrics import BoxIoU, PointingGame, RelevanceMass, RelevanceRank, ScoredBatch, create


def scored(maps: torch.Tensor, targets: list[int], boxes: list[torch.Tensor]) -> ScoredBatch:
    count = maps.shape[0]
    images = torch.rand(count, 3, *maps.shape[-2:])
    return ScoredBatch(lambda x: x.mean(dim=(2, 3)), images, maps, torch.tensor(targets), torch.arange(count), boxes)


def hand_made() -> ScoredBatch:
    """A 4 x 4 map whose box (class 2) covers the top-left 2 x 2 pixels; a second image has only a box of another
    class (not counted), a third a box of its class and a blank map."""
    image_map = torch.tensor(
        [[0.9, 0.1, 0.0, 0.0], [0.8, 0.0, 0.0, 0.7], [0.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]
    )  # total 3.0; inside the box: 0.9 + 0.1 + 0.8 + 0.0 = 1.8
    box = torch.tensor([[2, 0, 0, 2, 2]], dtype=torch.float32)
    maps = torch.stack([image_map, image_map, torch.zeros(4, 4)])
    return scored(maps, [2, 5, 2], [box, box, box])


def test_the_three_follow_their_formulas_on_a_hand_made_map_and_count_images_with_a_box_of_their_class():
    batch = hand_made()
    mass, rank, iou = RelevanceMass(), RelevanceRank(), BoxIoU(top=0.25)
    for metric in (mass, rank, iou):
        metric.update(batch)
    values = {name: metric.per_image() for name, metric in (("mass", mass), ("rank", rank), ("iou", iou))}
    assert all(v["index"].tolist() == [0, 2] for v in values.values())  # image 1's box is of another class
    # mass: 1.8 / 3.0 inside; a blank map: 0
    torch.testing.assert_close(values["mass"]["relevance_mass"], torch.tensor([0.6, 0.0], dtype=torch.float64))
    # rank: K = 4 box pixels; the 4 highest are 0.9, 0.8 (inside), 0.7, 0.5 (outside) -> 1/2; a blank map ranks
    # pixels by position: (0,0), (0,1) inside, (0,2), (0,3) outside -> 1/2
    torch.testing.assert_close(values["rank"]["relevance_rank"], torch.tensor([0.5, 0.5], dtype=torch.float64))
    # IoU: top 25 % = 4 pixels (0.9, 0.8, 0.7, 0.5), 2 inside the 4-pixel box: 2 / (4 + 4 - 2) (a blank map's
    # top pixels are those AD/IC keeps, whichever topk picks among ties)
    assert values["iou"]["box_iou"][0].item() == pytest.approx(2 / 6)
    assert mass.compute() == {"relevance_mass": pytest.approx(0.3)}


def test_relevance_mass_is_the_energy_pointing_game_and_nothing_is_reported_without_boxes():
    batch = hand_made()
    game, mass = PointingGame(tolerance=0), RelevanceMass()
    game.update(batch)
    mass.update(batch)
    assert game.compute()["energy_pointing_game"] == pytest.approx(mass.compute()["relevance_mass"])
    empty = RelevanceRank()
    empty.update(scored(torch.rand(2, 4, 4), [0, 1], [torch.zeros(0, 5), torch.zeros(0, 5)]))
    assert empty.compute() == {} and empty.per_image()["relevance_rank"].numel() == 0
    with pytest.raises(ValueError, match=r"box_iou\.top"):
        create("box_iou", top=0.0)


def test_relevance_mass_and_rank_agree_with_quantus():
    """Quantus's RelevanceMassAccuracy and RelevanceRankAccuracy on the same maps (no ties: continuous random
    values, where the two rankings agree) and masks (the boxes drawn as masks), abs and normalisation off: equal
    within 1e-6 (tame-lit sums the map in float32, Quantus in float64: 1.3e-7 apart here)."""
    quantus = pytest.importorskip("quantus")
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 16, 16, generator=generator) ** 2
    boxes = [torch.tensor([[1, x, y, x + w, y + h]], dtype=torch.float32) for x, y, w, h in
             [(0, 0, 4, 4), (3, 5, 8, 6), (10, 2, 6, 14), (1, 1, 15, 15), (7, 7, 1, 1), (0, 8, 16, 8)]]  # fmt: skip
    batch = scored(maps, [1] * 6, boxes)
    masks = np.zeros((6, 1, 16, 16))
    for row, box in enumerate(boxes):
        x0, y0, x1, y1 = box[0, 1:].int().tolist()
        masks[row, 0, y0:y1, x0:x1] = 1
    images = np.random.default_rng(0).random((6, 3, 16, 16), dtype=np.float32)
    options = {"abs": False, "normalise": False, "disable_warnings": True}
    for ours, theirs in (
        (RelevanceMass(), quantus.RelevanceMassAccuracy),
        (RelevanceRank(), quantus.RelevanceRankAccuracy),
    ):
        ours.update(batch)
        expected = theirs(**options)(
            model=None, x_batch=images, y_batch=np.ones(6, dtype=int), a_batch=maps[:, None].double().numpy(),
            s_batch=masks,
        )  # fmt: skip
        np.testing.assert_allclose(ours.per_image()[ours.key].numpy(), expected, atol=1e-6, rtol=0)
