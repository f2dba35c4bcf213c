"""Score-CAM and Ablation-CAM against maps computed by hand, and ``features.model_tail``."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from tame_lit import backbones
from tame_lit.backbones import Backbone
from tame_lit.explainers import ablationcam, create
from tame_lit.explainers.ablationcam import AblationCAM
from tame_lit.explainers.scorecam import ScoreCAM
from tame_lit.features import capture, count_hooks, model_tail
from tests.helpers import TINY_BACKBONE

# ----------------------------------------------------------------------------------------------------------
# a toy network whose maps can be computed by hand


def toy_backbone(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), after_target: nn.Module | None = None) -> Backbone:
    """conv (the target layer, 4 x 4 maps of mixed sign) -> ReLU -> mean pool -> linear, fixed weights.

    Channel 2 is the constant 0.7, channel 3 is all zero, and class 2 has all-zero weights and bias (its logit
    is exactly 0).
    """
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 4, kernel_size=2, stride=2)
    linear = nn.Linear(4, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        conv.weight[2:] = 0
        conv.bias.copy_(torch.tensor([0.1, -0.2, 0.7, 0.0]))
        linear.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.5, 0.5, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
        linear.bias.copy_(torch.tensor([0.3, -0.4, 0.0]))
    layers = [conv, nn.ReLU(inplace=True), *([after_target] if after_target else []), nn.AdaptiveAvgPool2d(1)]
    model = nn.Sequential(*layers, nn.Flatten(), linear)
    return Backbone(model, name="toy", mean=mean, std=std, default_layers=["0"], cam_layer="0", input_size=8)


def toy_images(count: int = 3) -> Tensor:
    return torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def minmax(maps: Tensor) -> Tensor:
    low = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-30), torch.zeros_like(maps))


def resize(maps: Tensor, size: int = 8) -> Tensor:
    return F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def count_rows(module: nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Batch size of every forward call of ``module`` (the caller removes the handle)."""
    rows: list[int] = []
    handle = module.register_forward_pre_hook(lambda m, inputs: rows.append(inputs[0].shape[0]))
    return rows, handle


def by_hand_ablation(backbone: Backbone, images: Tensor, targets: Tensor) -> Tensor:
    """Closed form: zeroing channel k lowers logit c by W[c, k] * mean(ReLU(A^k))."""
    conv, linear = backbone.model[0], backbone.model[-1]
    activations = conv(backbone.normalize(images))
    pooled = torch.relu(activations).mean(dim=(2, 3))
    logit = (pooled @ linear.weight.T + linear.bias).gather(1, targets[:, None])
    drop = linear.weight[targets] * pooled  # y^c - y^c_k
    weights = drop / logit
    return resize(minmax(torch.relu((weights[:, :, None, None] * activations).sum(dim=1))))


def by_hand_scorecam(backbone: Backbone, images: Tensor, targets: Tensor, baseline: str) -> tuple[Tensor, Tensor]:
    """One masked forward pass per channel, written out; returns the maps and the map with s_k = 0 for the
    constant channel (to show the test can see a wrong score there)."""
    activations = backbone.model[0](backbone.normalize(images))
    maps, without_constant = [], []
    for image, activation, target in zip(images, activations, targets, strict=True):
        total = torch.zeros(4, 4)
        total_without_constant = torch.zeros(4, 4)
        for channel in activation:
            if torch.all(channel == 0):
                continue  # adds nothing whatever its score
            upsampled = resize(channel[None])[0]
            if upsampled.max() - upsampled.min() > 1e-6:
                mask = (upsampled - upsampled.min()) / (upsampled.max() - upsampled.min())
            else:
                mask = torch.zeros(8, 8)  # the constant channel: the fully masked image
            if baseline == "mean":
                masked = backbone.model(backbone.normalize(image[None]) * mask)
            else:
                masked = backbone.model(backbone.normalize(image[None] * mask))
            score = masked.softmax(dim=1)[0, target]
            total += score * channel
            if upsampled.max() - upsampled.min() > 1e-6:
                total_without_constant += score * channel
        maps.append(total)
        without_constant.append(total_without_constant)
    return (
        resize(minmax(torch.relu(torch.stack(maps)))),
        resize(minmax(torch.relu(torch.stack(without_constant)))),
    )


# ----------------------------------------------------------------------------------------------------------
# Ablation-CAM


@torch.no_grad()
def test_ablationcam_matches_the_closed_form_for_positive_and_negative_logits():
    backbone = toy_backbone()
    images = toy_images()
    logits = backbone(images)
    for target in (0, 1):
        targets = torch.full((3,), target)
        expected = by_hand_ablation(backbone, images, targets)
        assert (expected.amax(dim=(1, 2)) > 0.5).all()  # not degenerate: the test has teeth
        torch.testing.assert_close(AblationCAM(backbone, batch_size=2)(images, targets), expected)
    # dividing by a negative logit flips the weights: class 1 (and class 0 for two images) checks it
    assert (logits[:, 1] < 0).all() and (logits[:, 0] < 0).sum() == 2


def test_ablationcam_zero_logit_gives_zero_maps_not_nan():
    backbone = toy_backbone()
    images = toy_images()
    assert torch.all(backbone(images)[:, 2] == 0)
    maps = AblationCAM(backbone)(images, torch.full((3,), 2))
    assert torch.isfinite(maps).all() and torch.all(maps == 0)


def tiny_seeded() -> Backbone:
    torch.manual_seed(0)
    return backbones.create(**TINY_BACKBONE)


@pytest.mark.parametrize("make", [toy_backbone, tiny_seeded])
def test_ablationcam_full_pass_fallback_equals_the_tail(make, monkeypatch):
    backbone = make()
    images = torch.rand(3, 3, *backbone.input_size, generator=torch.Generator().manual_seed(2))
    assert backbone.num_classes >= 1  # its one-off dry run is not counted below
    stem = next(m for m in backbone.model.modules() if isinstance(m, nn.Conv2d))
    rows, handle = count_rows(stem)
    explainer = AblationCAM(backbone, batch_size=16)
    targets = torch.zeros(3, dtype=torch.long)  # (the toy's top-1 can be class 2, whose map is zeros)
    with_tail = explainer(images, targets)
    assert rows == [3]  # the tail re-ran nothing below the layer
    monkeypatch.setattr(ablationcam, "model_tail", lambda model, layer: None)
    rows.clear()
    hooked = explainer(images, targets)
    handle.remove()
    assert len(rows) > 1 and sum(rows) > 3  # the fallback did run the whole network again
    torch.testing.assert_close(hooked, with_tail, atol=1e-5, rtol=0)
    assert count_hooks(backbone) == 0 and (with_tail.amax(dim=(1, 2)) > 0.5).all()


def test_ablationcam_does_not_trust_a_wrong_tail(monkeypatch):
    backbone = toy_backbone()
    images = toy_images()
    expected = AblationCAM(backbone)(images)
    monkeypatch.setattr(ablationcam, "model_tail", lambda model, layer: lambda activation: model(activation[:, :3]))
    torch.testing.assert_close(AblationCAM(backbone)(images), expected)


# ----------------------------------------------------------------------------------------------------------
# Score-CAM


@pytest.mark.parametrize("baseline", ["mean", "black"])
@torch.no_grad()
def test_scorecam_matches_masked_passes_by_hand(baseline):
    # a non-trivial normalisation so that the two baselines differ
    backbone = toy_backbone(mean=(0.4, 0.5, 0.6), std=(0.3, 0.2, 0.25))
    images = toy_images()
    gaps = []
    for target in (0, 1):
        targets = torch.full((3,), target)
        expected, wrong = by_hand_scorecam(backbone, images, targets, baseline)
        gaps.append((expected - wrong).abs().max())
        assert (expected.amax(dim=(1, 2)) > 0.5).all()
        maps = ScoreCAM(backbone, batch_size=4, baseline=baseline)(images, targets)
        torch.testing.assert_close(maps, expected, atol=1e-5, rtol=0)
    assert max(gaps) > 0.05  # the constant channel's score (of the fully masked image) changes the maps


def test_scorecam_baselines_differ():
    backbone = toy_backbone(mean=(0.4, 0.5, 0.6), std=(0.3, 0.2, 0.25))
    images = toy_images()
    assert not torch.allclose(ScoreCAM(backbone, baseline="mean")(images), ScoreCAM(backbone, baseline="black")(images))


def test_scorecam_skips_zero_channels_and_shares_the_fully_masked_pass():
    backbone = toy_backbone()
    images = toy_images(5)
    rows, handle = count_rows(backbone.model)
    ScoreCAM(backbone, batch_size=4)(images)
    handle.remove()
    # 5 (first pass) + 2 varying channels x 5 images + 1 fully masked pass per image (channel 2); channel 3
    # (all zero) never runs. One pass per channel would be 5 + 4 x 5 = 25 rows.
    assert sum(rows) == 5 + 10 + 5
    assert rows == [5, 4, 4, 4, 3]  # the 15 masked images of the whole batch in chunks of 4


def test_scorecam_pass_count_on_a_real_cnn(tiny_backbone):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        activation = tiny_backbone.features(images, ["layer4"])[1]["layer4"].flatten(2)
    constant = activation.amax(dim=2) == activation.amin(dim=2)
    zero = (activation == 0).all(dim=2)
    assert zero.sum() > 0 and zero.sum() < zero.numel()  # some channels are dead after the ReLU
    expected = 2 + (~constant).sum().item() + (constant & ~zero).any(dim=1).sum().item()
    rows, handle = count_rows(tiny_backbone.model)
    ScoreCAM(tiny_backbone, batch_size=32)(images)
    handle.remove()
    assert sum(rows) == expected and max(rows) <= 32


# ----------------------------------------------------------------------------------------------------------
# both: batch independence, state, options


@pytest.mark.parametrize("method", [ScoreCAM, AblationCAM])
def test_per_image_maps_do_not_depend_on_the_batch(method, tiny_backbone):
    images = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    targets = torch.arange(8) % 10
    together = method(tiny_backbone, batch_size=5)(images, targets)  # chunks mix images
    explainer = method(tiny_backbone, batch_size=64)
    alone = torch.cat([explainer(images[i : i + 1], targets[i : i + 1]) for i in range(8)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert together.dtype == torch.float32 and together.shape == (8, 64, 64)
    assert (together.amax(dim=(1, 2)) > 0.5).sum() >= 6  # most maps are not degenerate


class Bomb(nn.Module):
    """Passes its input through ``allowed`` times, then raises (an error in the middle of a method)."""

    def __init__(self, allowed: int) -> None:
        super().__init__()
        self.allowed = allowed

    def forward(self, x: Tensor) -> Tensor:
        self.allowed -= 1
        if self.allowed < 0:
            raise RuntimeError("boom")
        return x


def snapshot(backbone: Backbone) -> tuple[list[bool], list[bool]]:
    return [m.training for m in backbone.modules()], [p.requires_grad for p in backbone.parameters()]


@pytest.mark.parametrize(("method", "tail"), [(ScoreCAM, True), (AblationCAM, True), (AblationCAM, False)])
def test_no_hook_left_and_state_kept_also_when_a_pass_raises(method, tail, monkeypatch):
    if not tail:  # Ablation-CAM's full passes with a hook swapping in the ablated activations
        monkeypatch.setattr(ablationcam, "model_tail", lambda model, layer: None)
    backbone = toy_backbone(after_target=Bomb(allowed=1_000))
    backbone.model[0].weight.requires_grad_(True)  # an unusual state that must survive
    backbone.model[2].train()
    before = snapshot(backbone)
    method(backbone)(toy_images())
    assert count_hooks(backbone) == 0 and snapshot(backbone) == before
    backbone.model[2].allowed = 1  # the first pass runs, the next one raises
    with pytest.raises(RuntimeError, match="boom"):
        method(backbone, batch_size=2)(toy_images())
    assert count_hooks(backbone) == 0 and snapshot(backbone) == before


@pytest.mark.parametrize("method", [ScoreCAM, AblationCAM])
def test_maps_are_float32_under_autocast(method, tiny_backbone):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = method(tiny_backbone)(images)
    assert maps.dtype == torch.float32 and torch.isfinite(maps).all()
    assert maps.amin() >= 0 and maps.amax() == 1


def test_options_are_checked(tiny_backbone):
    with pytest.raises(ValueError, match="baseline must be one of"):
        ScoreCAM(tiny_backbone, baseline="white")
    for method in (ScoreCAM, AblationCAM):
        for bad in (0, 2.5, True):
            with pytest.raises(ValueError, match="batch_size"):
                method(tiny_backbone, batch_size=bad)
        with pytest.raises(ValueError, match="one layer"):
            method(tiny_backbone, layers=["layer3", "layer4"])
    assert isinstance(create("scorecam", tiny_backbone, baseline="black"), ScoreCAM)
    assert isinstance(create("ablationcam", tiny_backbone, batch_size=8), AblationCAM)


# ----------------------------------------------------------------------------------------------------------
# model_tail


@pytest.fixture(scope="module")
def vgg16() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.vgg16().eval()


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet50().eval()


@pytest.fixture(scope="module")
def lite0_random() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("tf_efficientnet_lite0").eval()


@pytest.mark.parametrize(
    ("model_name", "layer"),
    [
        ("vgg16", "features.29"),
        ("vgg16", "features.28"),  # a conv followed by ReLU(inplace=True)
        ("resnet50", "layer4"),
        ("lite0_random", "bn2"),
        ("lite0_random", "blocks.6"),
    ],
)
@torch.no_grad()
def test_model_tail_reproduces_the_logits(model_name, layer, request):
    model = request.getfixturevalue(model_name)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with capture(model, [layer]) as store:
        logits = model(images)
    activation = store[layer]
    kept = activation.clone()
    tail = model_tail(model, layer)
    assert tail is not None
    torch.testing.assert_close(tail(activation), logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(activation, kept)  # an in-place op after the layer works on a copy
    own = {id(p) for p in model.parameters()}
    assert tail_parameters(tail) and tail_parameters(tail) <= own  # shared, never copied
    assert count_hooks(model) == 0


def tail_parameters(tail: nn.Module) -> set[int]:
    return {id(p) for p in tail.parameters()}


def test_model_tail_is_none_inside_a_residual_block(resnet50):
    assert model_tail(resnet50, "layer4.1.conv1") is None  # the block's skip connection bypasses the conv
    assert model_tail(resnet50, "layer4.0.relu") is None  # runs three times in the block


class Branchy(nn.Module):
    """Data-dependent control flow in ``forward`` itself (untraceable) or only inside ``head`` (opaque)."""

    def __init__(self, branch_in_forward: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = Head()
        self.branch_in_forward = branch_in_forward

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.branch_in_forward and x.mean() > 0:
            x = -x
        return self.head(x)


class Head(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        x = x.mean(dim=(2, 3))
        return x if x.sum() > 0 else -x


def test_model_tail_needs_only_the_path_to_the_layer_to_be_traceable():
    torch.manual_seed(0)
    assert model_tail(Branchy(branch_in_forward=True), "conv") is None
    model = Branchy(branch_in_forward=False)
    tail = model_tail(model, "conv")
    images = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(tail(model.conv(images)), model(images))
    assert tail.head is model.head
