from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2.functional import gaussian_blur

from tame_lit.maps import keep_top, normalize, smooth, upsample
from tame_lit.metrics import AverageDropIncrease, ScoredBatch, masked_probability


def test_keep_top_keeps_exactly_ceil_p_hw_pixels_with_soft_values():
    torch.manual_seed(0)
    maps = torch.rand(3, 224, 224)
    for fraction in (0.5, 0.15):
        kept = keep_top(maps, fraction)
        count = math.ceil(fraction * 224 * 224)
        assert ((kept > 0).flatten(1).sum(dim=1) == count).all()
        assert torch.equal(kept[kept > 0], maps[kept > 0])  # soft values, not binarised
        assert (maps[kept == 0] <= kept.flatten(1).amax(1).min()).all()
    assert count == 7527
    assert torch.equal(keep_top(maps, 1.0), maps)


def test_keep_top_breaks_ties_to_an_exact_count():
    maps = torch.ones(2, 10, 10)
    assert ((keep_top(maps, 0.15) > 0).flatten(1).sum(dim=1) == 15).all()
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        keep_top(maps, 0.0)


def test_normalize_is_per_map_and_never_nan():
    ramp, constant = torch.arange(4.0).view(2, 2), torch.full((2, 2), 3.0)
    maps = torch.stack([ramp, constant, torch.tensor([[1.0, float("nan")], [2, 3]])])
    out = normalize(maps)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))
    assert torch.equal(out[1], torch.zeros(2, 2))
    assert torch.isfinite(out).all() and out.dtype == torch.float32


def test_upsample_is_bilinear_without_aligned_corners():
    maps = torch.tensor([[[0.0, 1.0]]])
    torch.testing.assert_close(upsample(maps, (1, 4)), torch.tensor([[[0.0, 0.25, 0.75, 1.0]]]))


class MeanIsProbability(torch.nn.Module):
    """Two classes; p(class 1) = the image's mean value (logit(mean) against 0)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.mean(dim=(1, 2, 3)).double()
        return torch.stack([torch.zeros_like(mean), torch.log(mean / (1 - mean))], dim=1)


def test_smooth_is_torchvisions_gaussian_blur_one_axis_at_a_time():
    torch.manual_seed(0)
    maps = torch.rand(3, 40, 30)
    taps_h, taps_w = 2 * math.ceil(3 * 3.0) + 1, 2 * math.ceil(3 * 1.5) + 1
    expected = gaussian_blur(maps[:, None], [taps_w, taps_h], [1.5, 3.0])[:, 0]  # one 2-D kernel, (x, y) order
    torch.testing.assert_close(smooth(maps, (3.0, 1.5)), expected, rtol=0, atol=1e-6)
    assert torch.equal(smooth(maps, (0.0, 0.0)), maps)
    along_w = smooth(maps, (0.0, 1.5))  # one axis only: rows are blurred independently
    torch.testing.assert_close(along_w[:, :1], smooth(maps[:, :1], (0.0, 1.5)), rtol=0, atol=1e-6)
    # a kernel wider than the map is cut to what reflected borders allow, and still blurs
    tiny = torch.rand(2, 4, 4)
    assert smooth(tiny, (8.0, 8.0)).std() < 0.5 * tiny.std()
    with pytest.raises(ValueError, match=r"smoothing sigma must be >= 0 pixels, got \(-1.0, 1.0\)"):
        smooth(maps, (-1.0, 1.0))


def test_average_drop_and_increase_by_hand():
    metric = AverageDropIncrease(keep=[1.0], ranked=[1.0])
    model, one = MeanIsProbability(), torch.ones(1, 3, 2, 2)
    # clean probabilities 0.8, 0.5, 0.2; the maps (all kept at 100 %) scale them to 0.4, 0.6, 0.2
    images, maps = torch.cat([0.8 * one, 0.5 * one]), torch.stack([torch.full((2, 2), 0.5), torch.full((2, 2), 1.2)])
    metric.update(ScoredBatch(model, images, maps, torch.tensor([1, 1]), torch.tensor([0, 1])))
    metric.update(ScoredBatch(model, 0.2 * one, torch.ones(1, 2, 2), torch.tensor([1]), torch.tensor([2])))
    values = metric.compute()
    # drops: (0.8-0.4)/0.8 = 0.5, 0, 0 -> AD = 100 * 0.5 / 3; increases: only 0.6 > 0.5 -> IC = 100 / 3
    assert values == {"AD@100": pytest.approx(100 * 0.5 / 3), "IC@100": pytest.approx(100 / 3)}
    per_image = metric.per_image()
    assert per_image["index"].tolist() == [0, 1, 2]
    assert per_image["AD@100"].tolist() == pytest.approx([50.0, 0.0, 0.0])
    assert per_image["IC@100"].tolist() == [0.0, 100.0, 0.0]
    assert [c.key for c in metric.columns()] == ["AD@100", "IC@100"]
    assert [c.primary for c in metric.columns()] == [True, True]


def test_ad_ic_does_not_depend_on_the_batch_size(tiny_backbone):
    torch.manual_seed(1)
    images, maps = torch.rand(7, 3, 64, 64), torch.rand(7, 64, 64)
    targets = torch.randint(0, 10, (7,))
    with torch.no_grad():
        batched = masked_probability(tiny_backbone, images, maps, targets, 0.15)
        one_by_one = [
            masked_probability(tiny_backbone, images[i, None], maps[i, None], targets[i, None], 0.15) for i in range(7)
        ]
    single = torch.cat(one_by_one)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


class BrightnessModel(torch.nn.Module):
    """Two classes; logit of class 1 = 4 x (mean of the image's left half) (class 0: logit 0)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        left = images[..., : images.shape[-1] // 2].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(left), 4 * left], dim=1)


def test_ad_ic_on_a_toy_model_by_hand():
    images = torch.ones(2, 3, 4, 4)  # white: p(class 1) = sigmoid(4)
    left_map = torch.zeros(4, 4)
    left_map[:, :2] = torch.tensor([1.0, 0.5])  # left half: columns 1.0 and 0.5
    right_map = torch.zeros(4, 4)
    right_map[:, 2:] = 1.0
    maps, targets = torch.stack([left_map, right_map]), torch.tensor([1, 1])
    clean = torch.sigmoid(torch.tensor(4.0))
    # 50 % kept = the 8 highest pixels: image 0 keeps its left half at soft values (mean 0.75); image 1 its
    # right half (left half black, mean 0)
    masked = masked_probability(BrightnessModel(), images, maps, targets, 0.5)
    expected = torch.sigmoid(torch.tensor([4 * 0.75, 0.0]))
    torch.testing.assert_close(masked, expected)
    metric = AverageDropIncrease(keep=[0.5])
    metric.update(ScoredBatch(BrightnessModel(), images, maps, targets))  # runs the masked pass itself
    values = metric.compute()
    drops = (clean - expected).clamp_min(0) / clean
    assert values["AD@50"] == pytest.approx(100 * drops.mean().item())
    assert values["IC@50"] == 0.0 and int(metric.count) == 2
    # 25 % kept: image 0 keeps only its 1.0 column (left-half mean 0.5)
    masked = masked_probability(BrightnessModel(), images, maps, targets, 0.25)
    torch.testing.assert_close(masked[0], torch.sigmoid(torch.tensor(2.0)))
