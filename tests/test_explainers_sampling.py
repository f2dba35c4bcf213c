"""RISE and SISE: formulas on hand-built networks, the official mask recipe, Otsu, and the guarantees every
explainer gives (seeded, batch-independent, no state or hooks left behind, any grad mode)."""

from __future__ import annotations

import math

import numpy
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tame_lit import backbones, explainers
from tame_lit.backbones import Backbone
from tame_lit.explainers.rise import RISE
from tame_lit.explainers.sise import SISE, otsu_threshold
from tame_lit.features import count_hooks
from tame_lit.maps import normalize
from tests.helpers import CountBackward, Probe

MEAN, STD = (0.2, 0.5, 0.7), (0.5, 0.5, 0.5)  # removed pixels differ between the two baselines


class Counter(nn.Module):
    """Identity that records the batch size of every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return x


def linear_toy() -> tuple[Backbone, torch.Tensor, Counter]:
    """x -> counter -> flatten -> linear with logits (w . x, 0): p_0 = sigmoid(w . x), p_1 = sigmoid(-w . x)."""
    torch.manual_seed(0)
    counter, linear = Counter(), nn.Linear(3 * 8 * 8, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(2, 3 * 8 * 8) * 0.3)
        linear.weight[1] = 0
        linear.bias.zero_()
    model = nn.Sequential(counter, nn.Flatten(), linear)
    backbone = Backbone(model, name="toy", mean=MEAN, std=STD, default_layers=["0"], cam_layer="0", input_size=8)
    assert backbone.num_classes == 2  # its dry run (cached) is not counted below
    counter.batches.clear()
    return backbone, linear.weight[0].detach().double(), counter


W0 = (1.0, -1.0, 0.5, -0.2, 0.0)  # linear weights of class 0: the sign of each channel's gradient


def conv_toy() -> tuple[Backbone, nn.Conv2d, Counter]:
    """x -> probe -> 2x2/2 conv (layer "1": 5 channels at 4x4) -> counter -> average pool -> linear.

    Logits are (sum_k W0_k mean(A_k), 0), so d p_c / d A_k(ij) = +-p_0 p_1 W0_k / 16: the channels kept
    for class 0 are those with W0_k > 0, for class 1 those with W0_k < 0 (channel 4, with a zero gradient,
    for neither). Channel 2 is constant (a zero mask).
    """
    torch.manual_seed(0)
    conv, counter, linear = nn.Conv2d(3, 5, 2, stride=2), Counter(), nn.Linear(5, 2)
    with torch.no_grad():
        conv.weight[2] = 0
        conv.bias[2] = 1.0
        linear.weight.copy_(torch.tensor([W0, (0.0,) * 5]))
        linear.bias.zero_()
    model = nn.Sequential(Probe(), conv, counter, nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear)
    backbone = Backbone(model, name="toy", mean=MEAN, std=STD, default_layers=["1"], cam_layer="1", input_size=8)
    assert backbone.num_classes == 2  # its dry run (cached) is not counted below
    counter.batches.clear()
    return backbone, conv, counter


def masked_input(backbone: Backbone, images: torch.Tensor, masks: torch.Tensor, baseline: str) -> torch.Tensor:
    """What the network sees for ``images`` [B, 3, H, W] under ``masks`` [..., H, W] (spec: 'mean' multiplies
    the normalised image, 'black' the [0, 1] image)."""
    if baseline == "mean":
        return (images - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1) * masks
    return (images * masks - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


# ---------------------------------------------------------------------------------------------- RISE


@pytest.mark.parametrize("baseline", ["mean", "black"])
@pytest.mark.parametrize("center_scores", [False, True])
def test_rise_matches_its_formula_and_batches_its_forward_passes(baseline, center_scores):
    backbone, w, counter = linear_toy()
    rise = RISE(backbone, num_masks=30, cell_size=3, probability=0.4, seed=5, batch_size=7, baseline=baseline,
                center_scores=center_scores)  # fmt: skip
    images, targets = torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 0])
    masks = rise.masks(8, 8).double()  # [N, 8, 8]
    seen = masked_input(backbone, images.double()[:, None], masks[None, :, None], baseline)  # [B, N, 3, 8, 8]
    logit = seen.flatten(2) @ w  # [B, N]
    score = torch.sigmoid(torch.where(targets[:, None] == 0, logit, -logit))
    if center_scores:  # p - mean(p): the same map up to a constant, without the masks' coverage noise
        score = score - score.mean(dim=1, keepdim=True)
    expected = torch.einsum("bn,nhw->bhw", score, masks) / (30 * 0.4)

    with torch.no_grad():
        torch.testing.assert_close(rise.saliency(images, targets), expected.float(), rtol=1e-5, atol=1e-6)
    counter.batches.clear()
    maps = rise(images, targets)
    torch.testing.assert_close(maps, normalize(expected).float(), rtol=1e-5, atol=1e-5)
    assert counter.batches == [7] * 12 + [6]  # 3 images x 30 masks in chunks of at most 7 masked images


def test_rise_masks_follow_the_official_recipe():
    skimage = pytest.importorskip("skimage.transform")
    backbone, _, _ = linear_toy()
    for cells, height, width in [(7, 64, 64), (5, 30, 17), (3, 8, 8)]:
        rise = RISE(backbone, num_masks=10, cell_size=cells, seed=1)
        grids, shifts = rise.draw(height, width)
        cell = (math.ceil(height / cells), math.ceil(width / cells))
        assert set(grids.unique().tolist()) <= {0.0, 1.0} and grids.shape == (10, cells, cells)
        assert (shifts >= 0).all() and (shifts < torch.tensor(cell)).all()
        up = ((cells + 1) * cell[0], (cells + 1) * cell[1])
        expected = [
            skimage.resize(grid.numpy(), up, order=1, mode="reflect", anti_aliasing=False)[y:][:height, x:][:, :width]
            for grid, (y, x) in zip(grids, shifts.tolist(), strict=True)
        ]
        masks = rise.masks(height, width)
        assert masks.dtype == torch.float32 and masks.shape == (10, height, width)
        torch.testing.assert_close(masks, torch.from_numpy(numpy.stack(expected)).float(), rtol=0, atol=1e-5)


def test_rise_masks_keep_a_fraction_p_of_the_image():
    backbone, _, _ = linear_toy()
    masks = RISE(backbone, num_masks=2000, probability=0.3).masks(32, 32)
    assert abs(masks.mean().item() - 0.3) < 0.02
    assert masks.min() >= 0 and masks.max() <= 1


def test_rise_is_seeded_and_independent_of_batch_size(tiny_backbone):
    images = torch.rand(2, 3, 32, 32)
    maps = RISE(tiny_backbone, num_masks=12, seed=3, batch_size=64)(images)
    torch.testing.assert_close(RISE(tiny_backbone, num_masks=12, seed=3, batch_size=5)(images), maps)
    assert torch.equal(RISE(tiny_backbone, num_masks=12, seed=3)(images), maps)
    assert not torch.allclose(RISE(tiny_backbone, num_masks=12, seed=4)(images), maps, atol=1e-3)
    rise = RISE(tiny_backbone, num_masks=12, seed=3)
    assert torch.equal(rise.masks(32, 32), RISE(tiny_backbone, num_masks=12, seed=3).masks(32, 32))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_masks": 0}, "num_masks must be an integer >= 1"),
        ({"cell_size": 2.5}, "cell_size must be an integer >= 1"),
        ({"probability": 0.0}, r"probability .* must be in \(0, 1\]"),
        ({"probability": 1.5}, r"probability .* must be in \(0, 1\]"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"seed": 0.5}, "seed must be an integer"),
        ({"baseline": "grey"}, r"baseline must be one of \('mean', 'black'\), got 'grey'"),
    ],
)
def test_rise_rejects_bad_options(options, message):
    backbone, _, _ = linear_toy()
    with pytest.raises(ValueError, match=message):
        RISE(backbone, **options)


# ---------------------------------------------------------------------------------------------- SISE


def test_sise_keeps_the_positive_gradient_channels_and_stops_backward_at_the_layer():
    backbone, conv, _ = conv_toy()
    images, targets = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    CountBackward.calls = 0
    with torch.enable_grad():
        chosen, selected = SISE(backbone, layers=["1"]).select(images, targets)
        _, strict = SISE(backbone, layers=["1"], mu=0.6).select(images, targets)
        _, top1 = SISE(backbone, layers=["1"]).select(images, None)
    assert CountBackward.calls == 0  # the probe before the layer never ran backward
    assert torch.equal(chosen, targets)
    activations, keep = selected["1"]
    torch.testing.assert_close(activations, conv(backbone.normalize(images)).detach())
    assert keep.tolist() == [[True, False, True, False, False], [False, True, False, True, False]]
    # mu = 0.6: class 0 keeps alpha_k > 0.6 * max alpha = W0_k > 0.6; class 1 keeps -W0_k > 0.6 * 1.0
    assert strict["1"][1].tolist() == [[True, False, False, False, False], [False, True, False, False, False]]
    assert torch.equal(top1["1"][1][0], keep[0]) == (backbone(images[:1]).argmax().item() == 0)
    assert all(p.grad is None for p in backbone.parameters())


def expected_sise_map(backbone: Backbone, conv: nn.Conv2d, images, targets, baseline: str) -> torch.Tensor:
    """Phase 2-3 by hand: kept channels from the sign of W0, masks min-max(Up(A_k)), V = sum s m / sum m."""
    activations = F.interpolate(conv(backbone.normalize(images)), size=(8, 8), mode="bilinear", align_corners=False)
    maps = []
    for image, activation, target in zip(images, activations, targets.tolist(), strict=True):
        total = torch.zeros(8, 8)
        for k, weight in enumerate(W0):
            span = activation[k].max() - activation[k].min()
            kept = weight > 0 if target == 0 else weight < 0
            if not kept or span == 0:  # dropped channel, or zero mask (adds nothing)
                continue
            mask = (activation[k] - activation[k].min()) / span
            logits = backbone.model(masked_input(backbone, image[None], mask, baseline))
            total += logits.softmax(dim=1)[0, target] * mask / mask.sum()
        maps.append(total)
    return normalize(torch.stack(maps)).detach()


@pytest.mark.parametrize("baseline", ["mean", "black"])
def test_sise_layer_map_matches_its_formula_and_batches_the_masks(baseline):
    backbone, conv, counter = conv_toy()
    images, targets = torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 1])
    with torch.no_grad():
        expected = expected_sise_map(backbone, conv, images, targets, baseline)
    counter.batches.clear()
    maps = SISE(backbone, layers=["1"], batch_size=3, baseline=baseline)(images, targets)
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-5)  # one layer: SISE's map is V itself
    # one pass for the gradients, then 1 + 2 + 2 non-constant kept masks, at most 3 per pass
    assert counter.batches == [3, 3, 2]


def test_sise_cascade_fusion_on_hand_made_maps():
    backbone, _, _ = conv_toy()
    ramp = torch.arange(16.0).view(1, 4, 4) / 15
    left = torch.zeros(1, 4, 4)
    left[..., :2] = 1
    top = torch.zeros(1, 4, 4)
    top[:, :2] = 0.9
    top[:, 2:] = 0.2  # two levels: Otsu separates them
    fused = SISE(backbone, layers=["1"]).fuse([ramp, left, top])
    # E = ramp; E = (E + left) * [left on]; E = (E + top) * [top high]
    expected = torch.zeros(1, 4, 4)
    expected[:, :2, :2] = ramp[:, :2, :2] + 1 + 0.9
    expected[:, :2, 2:] = 0.9
    torch.testing.assert_close(fused, normalize(expected))
    simple = SISE(backbone, layers=["1"], fusion="simple").fuse([ramp, left, top])
    torch.testing.assert_close(simple, normalize(((ramp + left) * left + top) * top))
    assert not torch.allclose(simple, fused)


def test_otsu_threshold_on_known_and_random_maps():
    two_levels = torch.full((1, 6, 6), 0.2)
    two_levels[:, :, 3:] = 0.8
    constant = torch.full((1, 6, 6), 0.4)
    scaled = two_levels * 10
    thresholds = otsu_threshold(torch.cat([two_levels, constant, scaled]))
    # skimage's answer: the centre of the first bin (all splits between the two levels tie)
    torch.testing.assert_close(thresholds, torch.tensor([0.2 + 0.6 / 512, 0.4, 2.0 + 6.0 / 512]))
    assert ((two_levels > thresholds[0]) == (two_levels == 0.8)).all()

    filters = pytest.importorskip("skimage.filters")
    generator = torch.Generator().manual_seed(0)
    low = torch.randn(6, 500, generator=generator) * 0.1 + 0.3
    high = torch.randn(6, 300, generator=generator) * 0.05 + torch.linspace(0.6, 0.9, 6)[:, None]
    maps = torch.cat([low, high], dim=1).view(6, 20, 40)
    expected = torch.tensor([filters.threshold_otsu(m.numpy(), nbins=256) for m in maps]).float()
    bin_width = (maps.flatten(1).amax(1) - maps.flatten(1).amin(1)) / 256
    assert ((otsu_threshold(maps) - expected).abs() <= bin_width).all()


def test_sise_layers_default_to_the_block_outputs_and_run_shallow_to_deep(tiny_backbone):
    sise = SISE(tiny_backbone)
    assert sise.layers == ("act1", "layer1", "layer2", "layer3", "layer4")
    assert SISE(tiny_backbone, layers=["layer4", "layer2"]).layers == ("layer2", "layer4")
    assert SISE(tiny_backbone, layers="layer3").layers == ("layer3",)
    maps = sise(torch.rand(1, 3, 64, 64))
    assert maps.shape == (1, 64, 64) and maps.max() == 1 and maps.min() == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mu": -0.1}, "mu .* must be >= 0"),
        ({"fusion": "max"}, r"fusion must be one of \('otsu', 'simple'\)"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"baseline": "grey"}, "baseline must be one of"),
        ({"layers": ["9"]}, r"unknown layer name\(s\) \['9'\]"),
    ],
)
def test_sise_rejects_bad_options(options, message):
    backbone, _, _ = conv_toy()
    with pytest.raises(ValueError, match=message):
        SISE(backbone, **{"layers": ["1"], **options})


# ------------------------------------------------------------------------------------ both methods


def make(name: str, backbone: Backbone, **options) -> RISE | SISE:
    """Cheap settings on the tiny ResNet with 32 x 32 images (SISE: two layers, 4 x 4 and 2 x 2, and
    mu = 0.3 keeps a few channels per layer)."""
    if name == "rise":
        return explainers.create("rise", backbone, num_masks=10, batch_size=16, **options)
    return explainers.create("sise", backbone, layers=["layer2", "layer3"], mu=0.3, **options)


def test_registry_builds_both():
    backbone, _, _ = conv_toy()
    assert type(explainers.create("rise", backbone)) is RISE
    assert type(explainers.create("sise", backbone, layers=["1"])) is SISE
    assert SISE.needs_gradients and not RISE.needs_gradients


@pytest.mark.parametrize("name", ["rise", "sise"])
def test_maps_do_not_depend_on_the_batch(name, tiny_backbone):
    images = torch.rand(8, 3, 32, 32)
    targets = torch.arange(8) % 3
    explainer = make(name, tiny_backbone, **({"fusion": "simple"} if name == "sise" else {}))
    maps = explainer(images, targets)
    assert maps.shape == (8, 32, 32) and maps.dtype == torch.float32
    assert (maps.amax(dim=(1, 2)) == 1).all()
    alone = torch.cat([explainer(images[i : i + 1], targets[i : i + 1]) for i in range(8)])
    torch.testing.assert_close(alone, maps, rtol=1e-4, atol=1e-5)
    assert torch.equal(explainer(images, targets), maps)  # deterministic
    assert not torch.allclose(explainer(images, (targets + 1) % 10), maps, atol=1e-3)  # the target matters


def test_sise_otsu_maps_do_not_depend_on_the_batch_up_to_threshold_ties(tiny_backbone):
    """Hard Otsu gating is discontinuous: float noise (1e-6) between batched and single convolutions can
    move a threshold by one bin, so a few pixels may flip; everything else must agree."""
    images = torch.rand(8, 3, 32, 32)
    sise = make("sise", tiny_backbone)
    maps = sise(images)
    alone = torch.cat([sise(images[i : i + 1]) for i in range(8)])
    assert ((alone - maps).abs() > 1e-4).float().mean() < 0.005


@pytest.mark.parametrize("name", ["rise", "sise"])
def test_state_and_hooks_are_restored_also_after_an_error(name, monkeypatch):
    torch.manual_seed(0)
    backbone = backbones.create("test_resnet", weights=None, num_classes=10, input_size=64, train_mode=True)
    images = torch.rand(2, 3, 32, 32)
    reference = make(name, backbone)(images)  # backbone in eval mode
    backbone.train()
    backbone.model.fc.weight.requires_grad_(True)
    modes = [m.training for m in backbone.modules()]
    flags = [p.requires_grad for p in backbone.parameters()]
    explainer = make(name, backbone)
    torch.testing.assert_close(explainer(images), reference)  # batch-norm ran in eval mode all the same
    assert backbone.model.fc.weight.grad is None

    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(backbone.model.layer4, "forward", boom)  # fails while SISE's hooks are attached
    with pytest.raises(RuntimeError, match="boom"):
        explainer(images)
    for _ in range(2):
        assert [m.training for m in backbone.modules()] == modes
        assert [p.requires_grad for p in backbone.parameters()] == flags
        assert count_hooks(backbone) == 0
        monkeypatch.undo()
        explainer(images)


@pytest.mark.parametrize("name", ["rise", "sise"])
def test_works_in_inference_mode_no_grad_and_autocast(name, tiny_backbone):
    images = torch.rand(2, 3, 32, 32)
    explainer = make(name, tiny_backbone)
    maps = explainer(images)
    with torch.inference_mode():
        torch.testing.assert_close(explainer(images), maps)
        torch.testing.assert_close(explainer(torch.rand(2, 3, 32, 32) * 0 + images), maps)  # inference tensors
    with torch.no_grad():
        torch.testing.assert_close(explainer(images), maps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = explainer(images)
    assert low.dtype == torch.float32 and low.shape == maps.shape
    assert low.isfinite().all() and low.min() >= 0 and low.max() == 1
