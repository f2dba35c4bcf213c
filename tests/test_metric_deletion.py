"""Deletion / Insertion (RISE): hand-computed curves on a toy model, batch invariance, substrates, validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torchvision.transforms.v2.functional import gaussian_blur

from tame_lit.metrics.base import ScoredBatch, probabilities
from tame_lit.metrics.deletion import (
    DeletionInsertion,
    curve_auc,
    deletion_insertion_curves,
    fractions,
    pixel_ranks,
    resolve_step,
)

KEYS = ("deletion_auc", "insertion_auc", "deletion_auc_first20", "insertion_auc_first20")


class RegionModel(nn.Module):
    """Two classes with P(class 1) = sum_p w_p * mean_c image[c, p] exactly (logits are log-probabilities).

    The weights are non-negative and sum to 1 over a region, so the probability is known in closed form.
    """

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", weights / weights.sum())

    def forward(self, images: Tensor) -> Tensor:
        s = (images.float().mean(dim=1) * self.weights).flatten(1).sum(dim=1)
        return torch.stack([(1 - s).clamp_min(1e-30).log(), s.clamp_min(1e-30).log()], dim=1)


class Recorder(nn.Module):
    """Wraps a model and keeps every image it is shown."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, images: Tensor) -> Tensor:
        self.seen.extend(images.detach().clone())
        return self.model(images)


def tiny_cnn(classes: int = 5) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, classes)
    ).eval()


def region_weights(size: int = 8, seed: int = 0) -> Tensor:
    """Random positive weights on the top-left 4x4 block of a size x size image, zero elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.zeros(size, size)
    weights[:4, :4] = torch.rand(4, 4, generator=generator) + 0.1
    return weights


def reference_curves(image: Tensor, saliency: Tensor, weights: Tensor, step: int) -> tuple[list[float], list[float]]:
    """The two curves of one image with explicit Python arithmetic (only the blur comes from torchvision)."""
    _, height, width = image.shape
    pixels = height * width
    values = image.mean(dim=0).flatten().double().tolist()  # the model only sees the channel mean
    blur = gaussian_blur(image[None], [11, 11], [5.0, 5.0])[0].mean(dim=0).flatten().double().tolist()
    w = (weights / weights.sum()).flatten().double().tolist()
    m = saliency.flatten().tolist()
    order = sorted(range(pixels), key=lambda p: (-m[p], p))  # descending, ties by position
    deletion, insertion = [], []
    for k in range(math.ceil(pixels / step) + 1):
        changed = set(order[: min(k * step, pixels)])
        deletion.append(sum(w[p] * (0.0 if p in changed else values[p]) for p in range(pixels)))
        insertion.append(sum(w[p] * (values[p] if p in changed else blur[p]) for p in range(pixels)))
    return deletion, insertion


def points(metric: DeletionInsertion) -> dict[str, list[float]]:
    """The metric's two mean curves as ``{"fraction": x, "deletion": y, "insertion": y}``."""
    curves = metric.curves()
    assert curves["deletion"].x == curves["insertion"].x
    return {"fraction": curves["deletion"].x, "deletion": curves["deletion"].y, "insertion": curves["insertion"].y}


def trapezoid(x: list[float], y: list[float]) -> float:
    return sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1))


def first20(x: list[float], y: list[float]) -> float:
    """Area over [0, 0.2] / 0.2, with y linearly interpolated at 0.2."""
    right = next(i for i, value in enumerate(x) if value >= 0.2)
    y02 = y[right - 1] + (0.2 - x[right - 1]) / (x[right] - x[right - 1]) * (y[right] - y[right - 1])
    return trapezoid([*x[:right], 0.2], [*y[:right], y02]) / 0.2


def test_fully_hand_computed_short_last_step():
    # 8x8 white image; P(class 1) = fraction of the top two rows (pixels 0..15) still white.
    # Map ranks pixels in index order; step 24 -> n = 3 steps, x = 0, 24/64, 48/64, 1 (short last step).
    weights = torch.zeros(8, 8)
    weights[:2] = 1
    model = RegionModel(weights)
    images, maps = torch.ones(1, 3, 8, 8), -torch.arange(64.0).view(1, 8, 8)
    metric = DeletionInsertion(step=24)
    metric.update(ScoredBatch(model, images, maps, torch.tensor([1])))
    curves = points(metric)
    assert curves["fraction"] == pytest.approx([0, 0.375, 0.75, 1.0], abs=1e-12)
    assert curves["deletion"] == pytest.approx([1, 0, 0, 0], abs=1e-6)
    assert curves["insertion"] == pytest.approx([1, 1, 1, 1], abs=1e-6)  # the blur of a constant image is itself
    out = metric.compute()
    assert out["deletion_auc"] == pytest.approx(0.375 / 2, abs=1e-6)
    # y(0.2) = 1 - 0.2 / 0.375 = 7/15; area over [0, 0.2] / 0.2 = (1 + 7/15) / 2 = 11/15
    assert out["deletion_auc_first20"] == pytest.approx(11 / 15, abs=1e-6)
    assert out["insertion_auc"] == pytest.approx(1.0, abs=1e-6)
    assert out["insertion_auc_first20"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("step", [24, 10, 7])  # 64 px: short last steps of 16, 4 and 1 pixels
def test_curves_and_aucs_match_a_python_reference(step: int):
    generator = torch.Generator().manual_seed(step)
    images = torch.rand(3, 3, 8, 8, generator=generator)
    maps = torch.randint(0, 6, (3, 8, 8), generator=generator).float()  # many ties: position breaks them
    weights = region_weights()
    targets = torch.tensor([1, 1, 1])
    metric = DeletionInsertion(step=step, chunk_size=4)
    metric.update(ScoredBatch(RegionModel(weights), images, maps, targets))

    n = math.ceil(64 / step)
    x = [min(k * step, 64) / 64 for k in range(n + 1)]
    per_image = [reference_curves(images[i], maps[i], weights, step) for i in range(3)]
    deletion = [sum(curve[0][k] for curve in per_image) / 3 for k in range(n + 1)]
    insertion = [sum(curve[1][k] for curve in per_image) / 3 for k in range(n + 1)]
    curves = points(metric)
    assert curves["fraction"] == pytest.approx(x, abs=1e-12)
    assert curves["deletion"] == pytest.approx(deletion, abs=1e-6)
    assert curves["insertion"] == pytest.approx(insertion, abs=1e-6)
    out = metric.compute()
    assert out["deletion_auc"] == pytest.approx(trapezoid(x, deletion), abs=1e-6)
    assert out["insertion_auc"] == pytest.approx(trapezoid(x, insertion), abs=1e-6)
    assert 0.2 not in x  # the first-20 % value needs the interpolation
    assert out["deletion_auc_first20"] == pytest.approx(first20(x, deletion), abs=1e-6)
    assert out["insertion_auc_first20"] == pytest.approx(first20(x, insertion), abs=1e-6)
    # AUC of the mean curve = mean of the per-image AUCs
    mean_auc = sum(trapezoid(x, curve[0]) for curve in per_image) / 3
    assert out["deletion_auc"] == pytest.approx(mean_auc, abs=1e-6)


def test_auc_equals_rise_normalised_auc_when_step_divides_the_image():
    generator = torch.Generator().manual_seed(3)
    images, maps = torch.rand(2, 3, 8, 8, generator=generator), torch.rand(2, 8, 8, generator=generator)
    metric = DeletionInsertion(step=16)
    metric.update(ScoredBatch(tiny_cnn(), images, maps, torch.tensor([0, 3])))
    curves, out = points(metric), metric.compute()
    assert len(curves["deletion"]) == 5

    def rise_auc(arr: list[float]) -> float:  # eclique/RISE evaluation.py: auc()
        return (sum(arr) - arr[0] / 2 - arr[-1] / 2) / (len(arr) - 1)

    assert out["deletion_auc"] == pytest.approx(rise_auc(curves["deletion"]), abs=1e-9)
    assert out["insertion_auc"] == pytest.approx(rise_auc(curves["insertion"]), abs=1e-9)
    # 0.2 is not on the grid 0, .25, ...: interpolated between the first two points
    y0, y1 = curves["deletion"][:2]
    assert out["deletion_auc_first20"] == pytest.approx((y0 + y0 + 0.8 * (y1 - y0)) / 2, abs=1e-9)


def test_steps_sets_the_step_from_the_image_size():
    assert resolve_step(64, None, 4) == 16
    assert resolve_step(100, None, 30) == 4  # ceil(100 / 30): 25 steps, not 30
    metric = DeletionInsertion(step=None, steps=4)
    metric.update(ScoredBatch(tiny_cnn(), torch.rand(1, 3, 8, 8), torch.rand(1, 8, 8), torch.tensor([2])))
    assert points(metric)["fraction"] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert metric.settings() == {"image_size": [8, 8], "step": 16, "steps": 4}  # what the report prints
    uneven = DeletionInsertion(step=None, steps=30)
    assert uneven.settings() == {}  # the step depends on the image size, unknown before the first update
    uneven.update(ScoredBatch(tiny_cnn(), torch.rand(1, 3, 10, 10), torch.rand(1, 10, 10), torch.tensor([2])))
    assert uneven.settings() == {"image_size": [10, 10], "step": 4, "steps": 25}


def test_perfect_map_beats_reversed_map():
    weights = region_weights()
    model = RegionModel(weights)
    # a bright region on a dark image: the blur dims the region, so putting it back first raises P at once
    images = 0.2 * torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(5)) + 0.8 * (weights > 0)
    perfect = weights.expand(4, 8, 8)  # the pixels that matter most, first
    results = {}
    for name, maps in (("perfect", perfect), ("reversed", -perfect)):
        metric = DeletionInsertion(step=4)
        metric.update(ScoredBatch(model, images, maps, torch.ones(4, dtype=torch.long)))
        results[name] = metric.compute()
    assert results["perfect"]["deletion_auc"] < results["reversed"]["deletion_auc"] - 0.1
    assert results["perfect"]["insertion_auc"] > results["reversed"]["insertion_auc"] + 0.1
    assert results["perfect"]["deletion_auc_first20"] < results["reversed"]["deletion_auc_first20"]
    assert results["perfect"]["insertion_auc_first20"] > results["reversed"]["insertion_auc_first20"]


def test_batch_size_and_chunking_do_not_change_the_result():
    model = tiny_cnn()
    generator = torch.Generator().manual_seed(7)
    images, maps = torch.rand(7, 3, 12, 12, generator=generator), torch.rand(7, 12, 12, generator=generator)
    maps[2] = 0.5  # a constant map: ranking by position only
    targets = torch.randint(0, 5, (7,), generator=generator)
    one_by_one, together = DeletionInsertion(step=10, chunk_size=5), DeletionInsertion(step=10, chunk_size=5)
    for i in range(7):
        one_by_one.update(ScoredBatch(model, images[i : i + 1], maps[i : i + 1], targets[i : i + 1]))
    together.update(ScoredBatch(model, images, maps, targets))
    first, second = one_by_one.compute(), together.compute()
    for key in KEYS:
        torch.testing.assert_close(first[key], second[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(
        torch.tensor(points(one_by_one)["deletion"]), torch.tensor(points(together)["deletion"]), atol=1e-6, rtol=0
    )


def test_the_clean_pass_of_the_batch_is_reused_and_changes_nothing():
    model = Recorder(RegionModel(region_weights()))
    generator = torch.Generator().manual_seed(9)
    images, maps = torch.rand(3, 3, 8, 8, generator=generator), torch.rand(3, 8, 8, generator=generator)
    targets = torch.tensor([1, 0, 1])
    deletion, insertion = deletion_insertion_curves(model, images, maps, targets, step=16, chunk_size=6)
    assert len(model.seen) == 3 * 2 * 5  # without the clean probabilities: every point is a forward pass
    with torch.no_grad():
        logits = model.model(images)
    model.seen.clear()
    metric = DeletionInsertion(step=16, chunk_size=6)
    metric.update(ScoredBatch(model, images, maps, targets, clean_logits=logits))
    assert len(model.seen) == 3 * 2 * 4  # deletion's first and insertion's last point are the clean images
    curves = points(metric)
    assert curves["deletion"] == pytest.approx(deletion.mean(0).tolist(), abs=1e-7)
    assert curves["insertion"] == pytest.approx(insertion.mean(0).tolist(), abs=1e-7)
    per_image = metric.per_image()
    x = fractions(64, 16)
    for i in range(3):  # each image's AUC is the AUC of its own curve
        assert per_image["deletion_auc"][i].item() == pytest.approx(curve_auc(x, deletion[i]).item(), abs=1e-7)
        assert per_image["insertion_auc_first20"][i].item() == pytest.approx(
            curve_auc(x, insertion[i], 0.2).item(), abs=1e-7
        )
    assert per_image["deletion_auc"].mean().item() == pytest.approx(metric.compute()["deletion_auc"], abs=1e-9)


def test_substrates_are_the_blurred_image_and_black():
    model = Recorder(tiny_cnn())
    generator = torch.Generator().manual_seed(11)
    images, maps = torch.rand(2, 3, 10, 10, generator=generator), torch.rand(2, 10, 10, generator=generator)
    targets = torch.tensor([1, 4])
    deletion, insertion = deletion_insertion_curves(model, images, maps, targets, step=30)
    assert deletion.shape == insertion.shape == (2, 5)
    blur = gaussian_blur(images, [11, 11], [5.0, 5.0])
    seen = torch.stack(model.seen)
    assert any(torch.equal(image, blur[0]) for image in seen)
    assert any(torch.equal(image, torch.zeros(3, 10, 10)) for image in seen)
    torch.testing.assert_close(insertion[:, 0], probabilities(model.model, blur, targets), atol=0, rtol=0)
    torch.testing.assert_close(deletion[:, -1], probabilities(model.model, torch.zeros_like(images), targets))
    torch.testing.assert_close(deletion[:, 0], probabilities(model.model, images, targets))
    torch.testing.assert_close(insertion[:, -1], probabilities(model.model, images, targets))
    # after one step exactly the 30 most salient pixels of each image are black
    order = pixel_ranks(maps)
    expected = images.clone()
    for i in range(2):
        expected[i].flatten(1)[:, order[i, :30]] = 0
    torch.testing.assert_close(deletion[:, 1], probabilities(model.model, expected, targets))


def test_blur_ignores_autocast_and_forward_passes_follow_it():
    model = Recorder(tiny_cnn())
    images, maps = torch.rand(1, 3, 8, 8), torch.rand(1, 8, 8)
    metric = DeletionInsertion(step=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        metric.update(ScoredBatch(model, images, maps, torch.tensor([0])))
    blur = gaussian_blur(images, [11, 11], [5.0, 5.0])[0]
    assert any(torch.equal(image, blur) for image in model.seen)
    out = metric.compute()
    assert all(isinstance(out[key], float) and math.isfinite(out[key]) for key in KEYS)


def test_pixel_ranks_is_a_stable_descending_sort():
    maps = torch.tensor([[[0.5, 1.0], [0.5, float("nan")]], [[0.0, 0.0], [0.0, 0.0]]])
    assert pixel_ranks(maps).tolist() == [[1, 0, 2, 3], [0, 1, 2, 3]]


def test_curve_auc_and_fractions():
    x = fractions(10, 4)  # 0, .4, .8, 1
    assert x.tolist() == pytest.approx([0, 0.4, 0.8, 1.0])
    y = torch.tensor([1.0, 0.6, 0.2, 0.0])
    assert curve_auc(x, y).item() == pytest.approx(0.4 * 0.8 + 0.4 * 0.4 + 0.2 * 0.1)
    # y(0.2) = 0.8: (1 + 0.8) / 2
    assert curve_auc(x, y, upto=0.2).item() == pytest.approx(0.9)
    assert curve_auc(x, y, upto=0.4).item() == pytest.approx(0.8)  # on the grid: no interpolation
    with pytest.raises(ValueError, match="upto"):
        curve_auc(x, y, upto=1.5)


def test_forward_accumulates_like_update():
    model = tiny_cnn()
    generator = torch.Generator().manual_seed(13)
    images, maps = torch.rand(4, 3, 8, 8, generator=generator), torch.rand(4, 8, 8, generator=generator)
    targets = torch.tensor([0, 1, 2, 3])
    by_forward, by_update, half = (DeletionInsertion(step=16) for _ in range(3))
    batch_value = by_forward(ScoredBatch(model, images[:2], maps[:2], targets[:2]))
    by_forward(ScoredBatch(model, images[2:], maps[2:], targets[2:]))
    by_update.update(ScoredBatch(model, images, maps, targets))
    half.update(ScoredBatch(model, images[:2], maps[:2], targets[:2]))
    for key in KEYS:
        torch.testing.assert_close(batch_value[key], half.compute()[key])
        torch.testing.assert_close(by_forward.compute()[key], by_update.compute()[key])


def test_image_size_is_fixed_until_reset():
    model = tiny_cnn()
    metric = DeletionInsertion(step=16)
    metric.update(ScoredBatch(model, torch.rand(1, 3, 8, 8), torch.rand(1, 8, 8), torch.tensor([0])))
    with pytest.raises(ValueError, match=r"10x10.*8x8"):
        metric.update(ScoredBatch(model, torch.rand(1, 3, 10, 10), torch.rand(1, 10, 10), torch.tensor([0])))
    metric.reset()
    metric.update(ScoredBatch(model, torch.rand(1, 3, 10, 10), torch.rand(1, 10, 10), torch.tensor([0])))
    assert len(points(metric)["fraction"]) == 8  # ceil(100 / 16) + 1


def test_invalid_arguments_name_the_values():
    assert DeletionInsertion(steps=10).step is None  # a number of steps replaces the default step
    with pytest.raises(ValueError, match=r"steps=0"):
        DeletionInsertion(steps=0)
    with pytest.raises(ValueError, match=r"step=None, steps=None"):
        DeletionInsertion(step=None)
    with pytest.raises(ValueError, match=r"step=0"):
        DeletionInsertion(step=0)
    metric = DeletionInsertion(step=16)
    with pytest.raises(ValueError, match=r"\(1, 8, 8\).*\(1, 4, 4\)"):
        metric.update(ScoredBatch(tiny_cnn(), torch.rand(1, 3, 8, 8), torch.rand(1, 4, 4), torch.tensor([0])))
    with pytest.raises(RuntimeError, match="no images"):
        points(metric)
