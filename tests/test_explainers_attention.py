"""Gradual Extrapolation, attention-guided Grad-CAM and post-hoc SA-CAM: formulas checked against hand
computations on tiny fixed networks, then batch independence and the shared explainer guarantees."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.transforms.v2.functional import gaussian_blur

from tame_lit import backbones
from tame_lit.backbones import Backbone
from tame_lit.explainers import create
from tame_lit.explainers.attention_gradcam import AttentionGradCAM
from tame_lit.explainers.ge import GradualExtrapolation
from tame_lit.explainers.gradcam import GradCAM
from tame_lit.explainers.rollout import attention_modules
from tame_lit.explainers.sacam_posthoc import PostHocSACAM
from tame_lit.features import count_hooks
from tame_lit.maps import normalize
from tests.helpers import TINY_BACKBONE

VALID_SACAM_BASES = "['gradcam', 'gradcampp', 'xgradcam']"


# ----------------------------------------------------------------------------------------------------------------------
# tiny networks and hand-written reference maths


def toy_backbone(net: nn.Module, cam_layer: str) -> Backbone:
    """Identity normalisation, so the network sees exactly the test's images."""
    return Backbone(
        net, name="toy", mean=(0, 0, 0), std=(1, 1, 1), default_layers=[cam_layer], cam_layer=cam_layer, input_size=8
    )


def cam_net() -> nn.Sequential:
    """conv(stride 2) -> ReLU (the CAM layer, 4x4) -> global average -> linear: dy^c/dA^k = W[c, k] / 16.

    The linear weights are scaled up so that attention over the 16 positions is neither uniform (tiny
    tokens) nor one-hot (huge ones): the formulas are then told apart by the maps.
    """
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    )
    with torch.no_grad():
        net[4].weight.mul_(500)
    return net


def ge_net() -> nn.Sequential:
    """One max-pool (8 -> 4), the CAM layer at 4x4, then a strided conv (4 -> 2) *after* it."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1),  # 0
        nn.ReLU(),  # 1: its output is the input of the first hooked layer, e_0 (8x8)
        nn.MaxPool2d(2),  # 2: e_1 (4x4)
        nn.Conv2d(3, 4, 3, padding=1),  # 3
        nn.ReLU(),  # 4: the CAM layer (4x4)
        nn.Conv2d(4, 4, 3, stride=2, padding=1),  # 5: e_2 (2x2), before its ReLU, so partly negative
        nn.ReLU(),  # 6
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )


def minmax(maps: Tensor) -> Tensor:
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - low) / (high - low)


def resize(maps: Tensor, size: int) -> Tensor:
    return F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def cam_net_pieces(net: nn.Sequential, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """The CAM layer's activations [B, K, 4, 4] and Grad-CAM's alpha [B, K] = W[c] / (h * w), by hand."""
    with torch.no_grad():
        activations = net[:2](images)
    return activations, net[4].weight[targets].detach() / 16


def images_and_targets(batch: int = 2, size: int = 8) -> tuple[Tensor, Tensor]:
    torch.manual_seed(1)
    return torch.rand(batch, 3, size, size), torch.tensor([2, 1, 0, 4, 3, 0, 1, 3][:batch])


@pytest.fixture(scope="module")
def resnet() -> Backbone:
    torch.manual_seed(0)
    return backbones.create(**TINY_BACKBONE)


@pytest.fixture(scope="module")
def resnet_sharp() -> Backbone:
    """The tiny ResNet with its logits scaled up 100 times. With the random weights (as with Lite0's real
    ones) attention Grad-CAM's scores are about 1e-4, so its attention is uniform to float32 precision and
    its maps on a 2x2 layer are constant (zeros): scaled scores give it maps worth comparing."""
    torch.manual_seed(0)
    backbone = backbones.create(**TINY_BACKBONE)
    with torch.no_grad():
        backbone.model.fc.weight.mul_(100)
    return backbone


@pytest.fixture(scope="module")
def vgg11() -> Backbone:
    """torchvision VGG-11 (random init, five MaxPool2d) at 64 px; a small classifier keeps it light."""
    torch.manual_seed(0)
    model = torchvision.models.vgg11(num_classes=10)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Linear(512, 10)
    # the last ReLU before pool5, at 4x4: pool5's 2x2 output comes after it
    return Backbone(model, name="vgg11", default_layers=["features.19"], cam_layer="features.19", input_size=64)


# ----------------------------------------------------------------------------------------------------------------------
# attention-guided Grad-CAM


@pytest.mark.parametrize("scale_tokens", [False, True])
@pytest.mark.parametrize("guided", [False, True])
def test_attention_gradcam_matches_the_hand_formula(guided, scale_tokens):
    net = cam_net()
    images, targets = images_and_targets()
    activations, alpha = cam_net_pieces(net, images, targets)
    tokens = (alpha[:, :, None, None] * activations).flatten(2).transpose(1, 2)  # [B, N=16, K=4]
    keys = tokens / tokens.pow(2).mean(dim=(1, 2), keepdim=True).sqrt() if scale_tokens else tokens
    attention = torch.softmax(keys @ keys.transpose(1, 2) / math.sqrt(4), dim=-1)
    # a real mix of positions: neither uniform nor the identity
    assert attention.amax() > 0.1 and attention.diagonal(dim1=1, dim2=2).mean() < 0.9
    attended = attention @ tokens
    low_res = torch.relu(attended.sum(dim=2)).view(2, 4, 4)
    gradcam = torch.relu(tokens.sum(dim=2)).view(2, 4, 4)
    if guided:
        low_res = low_res * gradcam
    expected = resize(minmax(low_res), 8)
    assert not torch.allclose(expected, resize(minmax(gradcam), 8), atol=1e-3)

    maps = AttentionGradCAM(toy_backbone(net, "1"), guided=guided, scale_tokens=scale_tokens)(images, targets)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["attention_gradcam", "sacam_posthoc"])
def test_attention_is_float32_under_autocast(resnet, name):
    explainer = create(name, resnet)
    torch.manual_seed(2)
    activations, gradients = torch.rand(2, 96, 4, 4), torch.randn(2, 96, 4, 4)
    expected = explainer.layer_map(activations, gradients)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = explainer.layer_map(activations, gradients)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, expected, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# post-hoc SA-CAM


@pytest.mark.parametrize("base", ["gradcam", "gradcampp", "xgradcam"])
def test_sacam_with_gamma_zero_is_its_base_exactly(resnet, base):
    torch.manual_seed(3)
    images = torch.rand(3, 3, 64, 64)
    for backbone, batch in ((resnet, images), (toy_backbone(cam_net(), "1"), images_and_targets()[0])):
        reference = create(base, backbone)(batch)
        assert (reference.flatten(1).amax(1) > 0.5).all()
        refined = create("sacam_posthoc", backbone, base=base, gamma=0.0)(batch)
        assert torch.equal(refined, reference)
        assert not torch.equal(create("sacam_posthoc", backbone, base=base, gamma=1.0)(batch), reference)


def _gradcampp_weights(activations: Tensor, alpha: Tensor) -> Tensor:
    """Grad-CAM++ with a gradient g = alpha constant over the 16 positions: a = g^2 / (2 g^2 + S g^3)
    = 1 / (2 + S g) with S = sum_ab A_ab, so w = 16 ReLU(g) / (2 + S g) (0 where g = 0)."""
    total = activations.sum(dim=(2, 3))
    return torch.where(alpha != 0, 16 * torch.relu(alpha) / (2 + total * alpha), torch.zeros_like(alpha))


@pytest.mark.parametrize(
    ("base", "cosine", "temperature", "gamma"),
    [("gradcam", True, None, 1.0), ("gradcam", False, None, 0.5), ("gradcampp", True, 0.3, 2.0)],
)
def test_sacam_matches_the_hand_formula(base, cosine, temperature, gamma):
    net = cam_net()
    images, targets = images_and_targets()
    activations, alpha = cam_net_pieces(net, images, targets)
    weights = alpha if base == "gradcam" else _gradcampp_weights(activations, alpha)
    features = activations.flatten(2)  # F: [B, K=4, N=16]
    normed = features / features.norm(dim=1, keepdim=True).clamp_min(1e-12) if cosine else features
    tau = temperature or (0.1 if cosine else math.sqrt(4))
    affinity = torch.softmax(normed.transpose(1, 2) @ normed / tau, dim=2)  # S = softmax_row: [B, N, N]
    attended = (features @ affinity.transpose(1, 2)).view_as(activations)  # F S^T
    refined = activations + gamma * attended
    expected = resize(minmax(torch.relu((weights[:, :, None, None] * refined).sum(dim=1))), 8)
    plain = resize(minmax(torch.relu((weights[:, :, None, None] * activations).sum(dim=1))), 8)
    assert not torch.allclose(expected, plain, atol=1e-3)

    explainer = PostHocSACAM(toy_backbone(net, "1"), base=base, gamma=gamma, temperature=temperature, cosine=cosine)
    torch.testing.assert_close(explainer(images, targets), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("base", ["nope", "layercam", "attention_gradcam", "sacam_posthoc", "ge"])
def test_sacam_refuses_bases_without_channel_weights(resnet, base):
    with pytest.raises(ValueError, match=r"one of \['gradcam', 'gradcampp', 'xgradcam'\]"):
        create("sacam_posthoc", resnet, base=base)


def test_sacam_refuses_bad_hyper_parameters(resnet):
    with pytest.raises(ValueError, match="gamma"):
        create("sacam_posthoc", resnet, gamma=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        create("sacam_posthoc", resnet, temperature=0.0)


# ----------------------------------------------------------------------------------------------------------------------
# Gradual Extrapolation


def ge_by_hand(
    net: nn.Sequential, images: Tensor, targets: Tensor, only_preceding: bool, relu: bool, batch_wide: bool = False
) -> Tensor:
    """The whole method written out for ``ge_net``: Grad-CAM at layer 4 (gradients by autograd), then the
    excitations [e_0 8x8, e_1 4x4, e_2 2x2] from explicit sub-network calls."""
    activations = net[:5](images).detach().requires_grad_(True)
    logits = net[5:](activations)
    (gradients,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), activations)
    with torch.no_grad():
        heat = minmax(torch.relu((gradients.mean(dim=(2, 3))[:, :, None, None] * activations).sum(dim=1)))[:, None]
        excitations = [net[:2](images), net[:3](images), net[:6](images)]
        assert excitations[2].amin() < 0  # so relu_excitations matters
        if only_preceding:
            excitations = excitations[:2]  # e_2 (2x2) is smaller than the 4x4 CAM layer
        for excitation in reversed(excitations):
            excitation = torch.relu(excitation) if relu else excitation
            heat = F.interpolate(heat, size=excitation.shape[-2:], mode="bilinear", align_corners=False)
            peak = excitation.amax() if batch_wide else excitation.amax(dim=(1, 2, 3), keepdim=True)
            heat = heat * excitation.sum(dim=1, keepdim=True) / peak
        heat = heat[:, 0]
        if batch_wide:
            scaled = ((heat - heat.mean()) / heat.std()).clamp(-1, 1)
            return (scaled - scaled.amin()) / (scaled.amax() - scaled.amin())
        mean, std = heat.mean(dim=(1, 2), keepdim=True), heat.std(dim=(1, 2), keepdim=True)
        return minmax(((heat - mean) / std).clamp(-1, 1))


@pytest.mark.parametrize(("only_preceding", "relu"), [(True, False), (False, False), (False, True)])
def test_ge_matches_the_hand_extrapolation(only_preceding, relu):
    net = ge_net()
    images, targets = images_and_targets()
    expected = ge_by_hand(net, images, targets, only_preceding, relu)
    explainer = GradualExtrapolation(toy_backbone(net, "4"), only_preceding=only_preceding, relu_excitations=relu)
    maps = explainer(images, targets)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-5)
    # the options really change the map
    other = ge_by_hand(net, images, targets, not only_preceding, relu)
    assert (maps - other).abs().amax() > 1e-2


def test_ge_official_demo_mode_is_batch_wide():
    net = ge_net()
    images, targets = images_and_targets(batch=2)
    expected = ge_by_hand(net, images, targets, only_preceding=False, relu=False, batch_wide=True)
    explainer = GradualExtrapolation(toy_backbone(net, "4"), match_official_demo=True)
    maps = explainer(images, targets)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-5)
    # the documented quirk: an image's map depends on its batch mates
    alone = explainer(images[:1], targets[:1])
    assert (alone[0] - maps[0]).abs().amax() > 1e-3


def test_ge_excitations_follow_the_hook_rule(resnet, vgg11):
    torch.manual_seed(4)
    images = torch.rand(2, 3, 64, 64)
    ge = create("ge", vgg11)
    with torch.enable_grad():
        coarse, excitations = ge.coarse_map_and_excitations(images, None)
    # e_0 = the ReLU output feeding pool1, then the five pool outputs
    assert [e.shape[-1] for e in excitations] == [64, 32, 16, 8, 4, 2]
    assert coarse.shape == (2, 4, 4) and coarse.amax() == 1
    ge = create("ge", resnet)
    with torch.enable_grad():
        _, excitations = ge.coarse_map_and_excitations(images, None)
    # ResNet: conv1.0 (stride 2) runs first, so e_0 is the normalised image itself
    assert ge.excitation_names == ("conv1.0", "maxpool", "layer2.0.conv1", "layer3.0.conv2", "layer4.0.conv1")
    assert len(excitations) == 6
    torch.testing.assert_close(excitations[0], resnet.normalize(images))


def test_ge_over_a_base_without_layers_starts_from_the_smallest_excitation():
    backbone = toy_backbone(ge_net(), "4")
    images, targets = images_and_targets()
    ge = GradualExtrapolation(backbone, base="random", seed=5)
    assert not ge.needs_gradients and GradualExtrapolation(backbone).needs_gradients
    with torch.no_grad():
        coarse, _ = ge.coarse_map_and_excitations(images, targets)
    random_maps = create("random", backbone, seed=5)(images)
    torch.testing.assert_close(coarse, minmax(resize(random_maps, 2)))


def test_ge_accepts_an_explainer_instance(resnet):
    torch.manual_seed(6)
    images = torch.rand(2, 3, 64, 64)
    base = GradCAM(resnet)
    torch.testing.assert_close(GradualExtrapolation(resnet, base=base)(images), create("ge", resnet)(images))
    with pytest.raises(ValueError, match="base explainer itself"):
        GradualExtrapolation(resnet, base=base, layers=["layer3"])
    with pytest.raises(ValueError, match="same backbone"):
        GradualExtrapolation(backbones.create(**TINY_BACKBONE), base=base)


def test_ge_unknown_base_lists_the_valid_ones(resnet):
    with pytest.raises(ValueError, match=r"unknown explainer 'nope'.*'gradcam'"):
        create("ge", resnet, base="nope")


def test_ge_needs_a_down_sampling_layer():
    net = nn.Sequential(
        nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)
    )
    with pytest.raises(ValueError, match=r"no nn\.MaxPool2d or strided nn\.Conv2d"):
        GradualExtrapolation(toy_backbone(net, "1"))


# ----------------------------------------------------------------------------------------------------------------------
# guarantees shared by all three


@pytest.mark.parametrize(
    ("name", "model", "options"),
    [
        ("attention_gradcam", "resnet_sharp", {}),
        ("attention_gradcam", "resnet_sharp", {"guided": True}),
        ("sacam_posthoc", "resnet", {}),
        ("sacam_posthoc", "resnet", {"base": "gradcampp", "cosine": False}),
        ("ge", "resnet", {"relu_excitations": True}),
        ("ge", "vgg11", {}),
        ("ge", "vgg11", {"only_preceding": False}),
    ],
)
def test_batch_of_one_and_batch_of_eight_agree(request, name, model, options):
    backbone = request.getfixturevalue(model)
    explainer = create(name, backbone, **options)
    torch.manual_seed(7)
    images = torch.rand(8, 3, 64, 64)
    batched = explainer(images)
    assert batched.shape == (8, 64, 64) and batched.dtype == torch.float32
    assert batched.amin() >= 0 and batched.amax() <= 1 and (batched.flatten(1).amax(1) > 0.5).sum() >= 2
    singles = torch.cat([explainer(images[i : i + 1]) for i in range(8)])
    # batched convolutions round differently (~1e-7); min-max can magnify that, a batch-wide statistic
    # would make differences of order 1
    torch.testing.assert_close(singles, batched, atol=1e-3, rtol=0)


def _state(backbone: Backbone) -> tuple[list[bool], list[bool]]:
    return [m.training for m in backbone.modules()], [p.requires_grad for p in backbone.parameters()]


@pytest.mark.parametrize("name", ["attention_gradcam", "sacam_posthoc", "ge"])
def test_no_hook_left_and_state_restored_also_after_an_error(monkeypatch, name):
    torch.manual_seed(0)
    backbone = backbones.create(**TINY_BACKBONE)
    backbone.model.layer1.train()
    backbone.model.fc.weight.requires_grad_(True)
    before = _state(backbone)
    explainer = create(name, backbone)
    images = torch.rand(2, 3, 64, 64)
    explainer(images)
    assert count_hooks(backbone) == 0 and _state(backbone) == before

    def boom(*args: object) -> None:
        assert count_hooks(backbone) > 0  # raised with the explainer's hooks in place
        raise RuntimeError("boom")

    monkeypatch.setattr(backbone.model.layer4, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        explainer(images)
    assert count_hooks(backbone) == 0 and _state(backbone) == before


@pytest.mark.parametrize(
    ("name", "options"), [("attention_gradcam", {}), ("sacam_posthoc", {}), ("ge", {}), ("ge", {"base": "random"})]
)
def test_works_inside_inference_mode(resnet, name, options):
    explainer = create(name, resnet, **options)
    torch.manual_seed(8)
    images = torch.rand(2, 3, 64, 64)
    expected = explainer(images)
    with torch.inference_mode():
        maps = explainer(images)
    assert maps.amax() > 0.5
    torch.testing.assert_close(maps, expected)


def test_attention_rollout_follows_its_formula_and_gives_the_fused_kernel_back():
    """R = prod_l rownorm(0.5 mean_heads(softmax(q k^T * scale)) + 0.5 I), the class token's row over the patch
    tokens, recomputed here from each block's own q and k (captured as the block's input) on a tiny ViT whose
    attention normally runs fused (timm's default): same maps within 1e-4 (the fused and the explicit kernels
    round differently; 4e-5 measured), the fused switches back on."""
    torch.manual_seed(0)
    vit = backbones.create("test_vit", weights=None, num_classes=10)
    layers = attention_modules(vit.model)
    assert len(layers) == 6 and all(layer.fused_attn for layer in layers)
    images = torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))

    inputs = []
    handles = [layer.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for layer in layers]
    try:
        with torch.no_grad():
            vit(images)
    finally:
        for handle in handles:
            handle.remove()
    rollout = torch.eye(101).expand(2, 101, 101)
    for layer, tokens in zip(layers, inputs, strict=True):
        qkv = layer.qkv(tokens).reshape(2, 101, 3, layer.num_heads, layer.head_dim).permute(2, 0, 3, 1, 4)
        weights = (qkv[0] @ qkv[1].transpose(-2, -1) * layer.scale).softmax(dim=-1).mean(dim=1)
        step = 0.5 * weights + 0.5 * torch.eye(101)
        rollout = (step / step.sum(dim=-1, keepdim=True)) @ rollout
    expected = normalize(rollout[:, 0, 1:].reshape(2, 10, 10))
    expected = F.interpolate(expected[:, None], size=(160, 160), mode="bilinear", align_corners=False)[:, 0]

    explainer = create("attention_rollout", vit)
    torch.testing.assert_close(explainer(images), expected.clamp(0, 1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(explainer(images, torch.tensor([3, 7])), explainer(images))  # class-agnostic
    assert all(layer.fused_attn for layer in layers) and count_hooks(vit) == 0
    with pytest.raises(ValueError, match="head_fusion must be one of"):
        create("attention_rollout", vit, head_fusion="median")


def test_attention_rollout_reads_torchvisions_multihead_attention_and_leaves_its_fast_path_alone():
    """torchvision's vit_* blocks call nn.MultiheadAttention with need_weights=False: rollout asks for the
    per-head weights during its own pass only. Its maps equal the formula on softmax(q k^T / sqrt(d)) per head,
    q and k recomputed from each block's input and in_proj; afterwards the blocks run as before (no hook left,
    same logits)."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10
    )
    vit = Backbone(model, name="torchvision_vit", input_size=32)
    layers = attention_modules(vit.model)
    assert len(layers) == 3 and all(isinstance(layer, nn.MultiheadAttention) for layer in layers)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    inputs = []
    handles = [layer.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for layer in layers]
    try:
        with torch.no_grad():
            logits = vit(images)
    finally:
        for handle in handles:
            handle.remove()
    rollout = torch.eye(17).expand(2, 17, 17)
    for layer, tokens in zip(layers, inputs, strict=True):
        q, k, _ = F.linear(tokens, layer.in_proj_weight, layer.in_proj_bias).chunk(3, dim=-1)
        q, k = (t.reshape(2, 17, 2, 8).transpose(1, 2) for t in (q, k))  # [B, heads, N, head_dim]
        weights = (q @ k.transpose(-2, -1) / math.sqrt(8)).softmax(dim=-1).mean(dim=1)
        step = 0.5 * weights + 0.5 * torch.eye(17)
        rollout = (step / step.sum(dim=-1, keepdim=True)) @ rollout
    expected = normalize(rollout[:, 0, 1:].reshape(2, 4, 4))
    expected = F.interpolate(expected[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]

    torch.testing.assert_close(create("attention_rollout", vit)(images), expected.clamp(0, 1), rtol=1e-4, atol=1e-4)
    assert count_hooks(vit) == 0
    with torch.no_grad():
        torch.testing.assert_close(vit(images), logits)


# ----------------------------------------------------------------------------------------------------------------------
# smoothed: another method's maps blurred


def test_smoothed_is_its_bases_map_blurred_by_torchvisions_gaussian(resnet):
    torch.manual_seed(0)
    images = torch.rand(3, 3, 64, 64)
    smoothed = create("smoothed", resnet, base="gradcampp", sigma=3.0, layers=["layer3"])
    base = create("gradcampp", resnet, ["layer3"])
    plain = base(images)
    taps = 2 * math.ceil(3 * 3.0) + 1
    expected = normalize(gaussian_blur(plain[:, None], [taps, taps], [3.0, 3.0]))
    maps = smoothed(images)
    torch.testing.assert_close(maps, expected[:, 0], rtol=0, atol=1e-5)
    assert (maps - plain).abs().amax() > 1e-2 and smoothed.base.layers == ("layer3",)
    assert smoothed.needs_gradients and not create("smoothed", resnet, base="random").needs_gradients
    # the base's own options reach it: another seed of the random maps, another blur
    random_maps = [create("smoothed", resnet, base="random", seed=s)(images[:1]) for s in (1, 2)]
    assert (random_maps[0] - random_maps[1]).abs().amax() > 1e-2


@pytest.mark.parametrize("sigma", [0.0, -2.0, float("nan"), True])
def test_smoothed_refuses_a_sigma_that_is_not_a_positive_width(sigma, resnet):
    with pytest.raises(ValueError, match=r"smoothed: sigma must be a standard deviation > 0 in pixels"):
        create("smoothed", resnet, sigma=sigma)
