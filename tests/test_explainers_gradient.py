"""The Grad-CAM family on hand-built networks whose gradients are known in closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tame_lit import explainers
from tame_lit.backbones import Backbone
from tame_lit.maps import normalize
from tests.helpers import CountBackward, Probe


def toy_backbone() -> tuple[Backbone, nn.Conv2d, nn.Linear]:
    """x -> probe -> 1x1 conv -> ReLU (target "2") -> probe -> global average pool -> linear.

    With A the ReLU output (K=4 channels, 8x8), d logit_c / d A^k_ij = W[c, k] / 64 everywhere.
    """
    torch.manual_seed(0)
    conv, linear = nn.Conv2d(3, 4, 1), nn.Linear(4, 5)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 0.0]] * 5) + torch.arange(5.0)[:, None] * 0.1)
    model = nn.Sequential(Probe(), conv, nn.ReLU(), Probe(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear)
    backbone = Backbone(
        model, name="toy", mean=(0, 0, 0), std=(1, 1, 1), default_layers=["2"], cam_layer="2", input_size=8
    )
    return backbone, conv, linear


def expected_maps(name: str, activations: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Each method's formula with channel-constant gradients g_k (shape [B, K])."""
    total = activations.sum(dim=(2, 3))
    if name == "gradcam":
        weights = gradient
    elif name == "gradcampp":
        alpha = torch.nan_to_num(gradient**2 / (2 * gradient**2 + total * gradient**3))  # 0 where g = 0
        weights = 64 * alpha * torch.relu(gradient)
    elif name == "xgradcam":
        weights = torch.where(total != 0, gradient, torch.zeros_like(gradient))  # sum_ij A/sum(A) * g = g
    elif name == "layercam":
        weights = torch.relu(gradient)
    return normalize(torch.relu((weights[:, :, None, None] * activations).sum(dim=1)))


@pytest.mark.parametrize("name", ["gradcam", "gradcampp", "xgradcam", "layercam"])
def test_gradient_cams_match_their_formulas(name):
    backbone, conv, linear = toy_backbone()
    images = torch.rand(3, 3, 8, 8)
    targets = torch.tensor([0, 3, 4])
    activations = torch.relu(conv(images)).detach()
    gradient = linear.weight[targets].detach() / 64
    maps = explainers.create(name, backbone)(images, targets)
    torch.testing.assert_close(maps, expected_maps(name, activations, gradient), rtol=1e-5, atol=1e-6)


def test_gradients_stop_at_the_target_layer_and_leave_no_parameter_gradients():
    backbone, _, _ = toy_backbone()
    CountBackward.calls = 0
    explainers.create("gradcam", backbone)(torch.rand(2, 3, 8, 8))
    assert CountBackward.calls == 1  # the probe after the layer ran backward, the one before did not
    assert all(p.grad is None for p in backbone.parameters())


def test_default_target_is_the_top1_class():
    backbone, _, _ = toy_backbone()
    images = torch.rand(2, 3, 8, 8)
    explainer = explainers.create("gradcam", backbone)
    torch.testing.assert_close(explainer(images), explainer(images, backbone(images).argmax(dim=1)))


def test_several_layers_are_fused():
    torch.manual_seed(0)
    from tame_lit import backbones

    backbone = backbones.create("test_resnet", weights=None, num_classes=10, input_size=64)
    images = torch.rand(2, 3, 64, 64)
    single = [explainers.create("layercam", backbone, layers=[name])(images) for name in ("layer3", "layer4")]
    fused = explainers.create("layercam", backbone, layers=["layer3", "layer4"])(images)
    torch.testing.assert_close(fused, normalize(torch.maximum(torch.tanh(2 * single[0]), torch.tanh(2 * single[1]))))
    mean = explainers.create("gradcam", backbone, layers=["layer3", "layer4"])(images)
    single = [explainers.create("gradcam", backbone, layers=[name])(images) for name in ("layer3", "layer4")]
    torch.testing.assert_close(mean, normalize((single[0] + single[1]) / 2))


def test_unknown_explainer_and_layer_are_named():
    backbone, _, _ = toy_backbone()
    with pytest.raises(ValueError, match=r"unknown explainer 'gradcam2'.*'gradcam'"):
        explainers.create("gradcam2", backbone)
    with pytest.raises(ValueError, match=r"unknown layer name\(s\) \['9'\].*valid names are: 0, 1, 2"):
        explainers.create("gradcam", backbone, layers=["9"])
