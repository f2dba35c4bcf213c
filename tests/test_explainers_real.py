"""Every explainer on EfficientNet-Lite0 with its real ImageNet weights: a pointing game on a pasted
photo, and the randomisation sanity check of Adebayo et al. (2018)."""

from __future__ import annotations

import functools

import pytest
import skimage.data
import torch
import torch.nn.functional as F

from tame_lit import backbones, explainers
from tame_lit.data import ImageDataset, eval_transform, folder_samples
from tests.helpers import SHARED_DATA

pytestmark = pytest.mark.real

# The random-map baseline is excluded: it is the floor the others must beat, not an explanation.
METHODS = [name for name in explainers.defined_for("spatial") if name != "random"]  # Lite0 is a CNN
# Sized for a 2-core CI machine: Score-CAM on the 112-channel blocks.4 instead of bn2's 1,280 channels,
# RISE with 1,000 masks, SISE on the last three stages (all still in the same code paths).
SETTINGS = {
    "scorecam": {"layers": ["blocks.4"]},
    "rise": {"num_masks": 1000, "batch_size": 50},
    "sise": {"layers": ["blocks.2", "blocks.4", "bn2"], "batch_size": 50},
}
TOP, LEFT, HEIGHT, WIDTH = 100, 10, 112, 150


@functools.cache
def canvas() -> torch.Tensor:
    """The scikit-image cat pasted into a plain grey 224 x 224 canvas at a known place."""
    cat = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float() / 255
    cat = F.interpolate(cat[None], size=(HEIGHT, WIDTH), mode="bilinear", antialias=True)[0]
    image = torch.full((1, 3, 224, 224), 0.5)
    image[0, :, TOP : TOP + HEIGHT, LEFT : LEFT + WIDTH] = cat
    return image


@functools.cache
def random_backbone() -> backbones.Backbone:
    torch.manual_seed(0)
    return backbones.create("efficientnet_lite0", weights=None)


@functools.cache
def real_map(name: str) -> torch.Tensor:
    return explainers.create(name, real_backbone(), **SETTINGS.get(name, {}))(canvas())[0]


@functools.cache
def real_backbone() -> backbones.Backbone:
    return backbones.create("efficientnet_lite0")


def test_the_pasted_photo_is_recognised():
    with torch.no_grad():
        probabilities = real_backbone()(canvas()).softmax(dim=1)[0]
    assert probabilities.argmax().item() in range(281, 286)  # the ImageNet cats (tabby ... Egyptian cat)


@pytest.mark.parametrize("name", METHODS)
def test_pointing_game_on_a_pasted_photo(name):
    row, column = divmod(real_map(name).flatten().argmax().item(), 224)
    assert TOP <= row < TOP + HEIGHT and LEFT <= column < LEFT + WIDTH, (row, column)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation of two maps, compared at 40 x 40."""

    def ranks(x: torch.Tensor) -> torch.Tensor:
        small = F.adaptive_avg_pool2d(x[None, None], 40).flatten()
        return small.argsort().argsort().float()

    return torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1].item()


@functools.cache
def photos() -> torch.Tensor:
    """Two natural photos of imagenet-sample at 160 px (a tench and a bird: textures everywhere, unlike
    the canvas, whose flat grey would make any texture-following map look alike)."""
    samples, _ = folder_samples(SHARED_DATA / "imagenet-sample")
    dataset = ImageDataset([samples[0], samples[125]], eval_transform(182, 160))
    return torch.stack([dataset[0][0], dataset[1][0]])


@pytest.mark.parametrize("name", [*METHODS, "random"])
def test_maps_change_when_the_weights_are_randomised(name):
    """Adebayo et al.'s model-randomisation check: with the weights re-initialised, a map that explains the
    model must change. The model-blind random baseline is the control: its maps stay identical (rank
    correlation 1). Measured here: 0.0-0.5 for most methods; about 0.7 for Grad-CAM++ and Layer-CAM, whose
    maps follow the activations more (positive gradients times activations), hence the bound of 0.8."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real images not found at {SHARED_DATA}")
    trained = explainers.create(name, real_backbone(), **SETTINGS.get(name, {}))(photos())
    randomised = explainers.create(name, random_backbone(), **SETTINGS.get(name, {}))(photos())
    correlation = sum(rank_correlation(a, b) for a, b in zip(trained, randomised, strict=True)) / 2
    if name == "random":
        assert correlation == pytest.approx(1.0)
    else:
        assert correlation < 0.8
