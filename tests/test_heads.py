from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur

from tame_lit import backbones, explainers, heads
from tame_lit.explainers import HeadExplainer
from tame_lit.heads import TameHead, select_classes
from tame_lit.heads.base import class_maps, ranking_maps, resize, target_maps
from tame_lit.maps import normalize, upsample
from tame_lit.training import HeadTrainingModule
from tests.helpers import TINY_BACKBONE


def trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize(("name", "count"), [("vgg16", 1_874_664), ("resnet50", 9_100_776)])
def test_tame_parameter_counts_with_the_default_layers(name, count):
    head = heads.create("tame", backbones.create(name, weights=None))
    assert trainable(head) == count


def test_maps_are_at_the_first_layer_size_capped_at_max_size():
    head = TameHead({"a": (4, 112, 112), "b": (6, 56, 56)}, num_classes=3, max_size=56)
    features = {"a": torch.randn(2, 4, 112, 112), "b": torch.randn(2, 6, 56, 56)}
    assert head(features).shape == (2, 3, 56, 56)
    head = TameHead({"b": (6, 28, 28), "a": (4, 112, 112)}, num_classes=3)
    assert head({"a": features["a"], "b": torch.randn(2, 6, 28, 28)}).shape == (2, 3, 28, 28)


def test_branch_and_fusion_follow_the_spec_by_hand():
    head = TameHead({"x": (2, 4, 4)}, num_classes=2).eval()
    with torch.no_grad():
        branch = head.branches[0]
        branch.conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))  # conv = identity
        branch.conv.bias.fill_(0.5)
        branch.bn.running_mean.fill_(0.5)  # BN(conv(x)) = x  (eval: (x + .5 - .5) / sqrt(1 + eps))
        head.fuser.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]).view(2, 2, 1, 1))
        head.fuser.bias.copy_(torch.tensor([0.0, 1.0]))
    x = torch.randn(1, 2, 4, 4)
    branch_out = torch.relu(x + x / torch.sqrt(torch.tensor(1 + 1e-5)))
    expected = torch.stack([branch_out[:, 0], 1 - branch_out[:, 1]], dim=1)
    torch.testing.assert_close(head({"x": x}), expected)


def test_computing_only_some_classes_gives_the_same_maps(tiny_backbone):
    head = heads.create("tame", tiny_backbone)
    _, features = tiny_backbone.features(torch.rand(3, 3, 64, 64), head.layers)
    classes = torch.tensor([1, 4, 9])
    torch.testing.assert_close(head(features, classes), head(features)[:, classes])
    labels = torch.tensor([9, 1, 9])
    torch.testing.assert_close(
        select_classes(head(features, classes), classes, labels), head(features)[torch.arange(3), labels]
    )


def test_features_that_do_not_fit_are_named():
    head = TameHead({"layer2": (4, 8, 8)}, num_classes=2)
    with pytest.raises(KeyError, match="layer2"):
        head({"layer3": torch.randn(1, 4, 8, 8)})
    with pytest.raises(ValueError, match=r"layer2.*\[B, 4, H, W\]"):
        head({"layer2": torch.randn(1, 5, 8, 8)})


def test_unknown_head_lists_the_available_ones(tiny_backbone):
    with pytest.raises(ValueError, match=r"unknown head 'tamer'.*\['sacam', 'tame'\]"):
        heads.create("tamer", tiny_backbone)


@pytest.mark.parametrize("num_classes", [3, 200])
def test_fusion_convolves_before_resizing_only_where_that_is_exact(num_classes):
    """Few maps: each layer is convolved at its own size, then resized; many: resized, then convolved.
    Both equal the written order (resize, concatenate, 1x1 conv), for all classes and for some."""
    torch.manual_seed(0)
    inputs = [torch.randn(2, 8, 12, 12), torch.randn(2, 16, 6, 6), torch.randn(2, 32, 3, 3)]
    fuser = torch.nn.Conv2d(56, num_classes, kernel_size=1)
    written = fuser(torch.cat([resize(x, (12, 12)) for x in inputs], dim=1))
    torch.testing.assert_close(class_maps(fuser, inputs, (12, 12), None), written, rtol=1e-5, atol=1e-5)
    classes = torch.tensor([0, 2])
    torch.testing.assert_close(class_maps(fuser, inputs, (12, 12), classes), written[:, classes], rtol=1e-5, atol=1e-5)


def variant_parameters(variant: str, channels: list[int], classes: int) -> int:
    """What each ablation's structure implies (tame.md §1.5): branch convs, batch norms, fusion conv."""
    if variant == "no_skip":  # conv C -> classes, BN(classes); the fusion reads layers x classes channels
        branches = sum(c * classes + classes + 2 * classes for c in channels)
        return branches + len(channels) * classes * classes + classes
    batch_norm = 0 if variant == "no_skip_no_bn" else sum(2 * c for c in channels)
    return sum(c * c + c for c in channels) + batch_norm + sum(channels) * classes + classes


@pytest.mark.parametrize("variant", ["standard", "no_skip", "no_skip_no_bn", "sigmoid_in_branch"])
def test_each_tame_variant_has_the_parameter_count_of_its_structure(variant):
    head = heads.create("tame", backbones.create("resnet50", weights=None), variant=variant)
    assert trainable(head) == variant_parameters(variant, [512, 1024, 2048], 1000)
    expected = {"standard": 9_100_776, "sigmoid_in_branch": 9_100_776, "no_skip_no_bn": 9_093_608, "no_skip": 6_594_000}
    assert trainable(head) == expected[variant]


def test_the_variants_compute_what_their_names_say():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3)
    shapes = {"x": (4, 3, 3)}
    standard = TameHead(shapes, num_classes=5).eval()
    sigmoid = TameHead(shapes, num_classes=5, variant="sigmoid_in_branch").eval()
    sigmoid.load_state_dict(standard.state_dict())
    no_bn = TameHead(shapes, num_classes=5, variant="no_skip_no_bn").eval()
    no_bn.load_state_dict(standard.state_dict(), strict=False)  # the same conv and fusion, no batch norm
    branch, fuse = standard.branches[0], standard.fuser
    conv = branch.conv(x)
    torch.testing.assert_close(standard({"x": x}), fuse(torch.relu(x + branch.bn(conv))))
    torch.testing.assert_close(sigmoid({"x": x}), fuse(torch.sigmoid(x + branch.bn(conv))))
    torch.testing.assert_close(no_bn({"x": x}), fuse(torch.relu(conv)))
    no_skip = TameHead(shapes, num_classes=5, variant="no_skip").eval()
    inner = no_skip.branches[0]
    assert inner.conv.out_channels == 5 and no_skip.fuser.in_channels == 5
    torch.testing.assert_close(no_skip({"x": x}), no_skip.fuser(torch.relu(inner.bn(inner.conv(x)))))
    with pytest.raises(ValueError, match=r"unknown TAME variant 'noskip'.*no_skip_no_bn"):
        TameHead(shapes, num_classes=5, variant="noskip")


@pytest.mark.parametrize("variant", ["no_skip", "no_skip_no_bn", "sigmoid_in_branch"])
def test_each_variant_trains_for_a_few_steps(variant):
    torch.manual_seed(0)
    module = HeadTrainingModule(TINY_BACKBONE, {"name": "tame", "variant": variant})
    images = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(module.head.parameters(), lr=0.05, momentum=0.9)
    losses = []
    module.train()
    for _ in range(8):
        with torch.no_grad():
            logits, features = module.backbone.features(images, module.head.layers)
        terms, _ = module.masking_pass(images, features, logits.argmax(dim=1))
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(terms["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def cam_logits(backbone: backbones.Backbone, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Classic CAM of every class, W A + b, bilinearly resized to ``size``."""
    linear = backbone.linear_classifier()
    cam = F.conv2d(features, linear.weight[:, :, None, None], linear.bias)
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def resnet50() -> backbones.Backbone:
    """ResNet-50 with random weights, shared by the heads' tests (its layer shapes are cached)."""
    torch.manual_seed(0)
    return backbones.create("resnet50", weights=None)


@pytest.mark.parametrize("head_name", ["sacam", "tame"])
@pytest.mark.parametrize("name", ["resnet50", pytest.param("lite0", marks=pytest.mark.real)])
def test_the_untrained_head_started_from_the_classifier_is_cam(name, head_name, request):
    """init_from_classifier (SA-CAM: gamma = 0; TAME: branches relu(x + 0)): the head's map is CAM within 1e-5
    (ResNet-50 random weights, Lite0 real ones), in eval and train mode, for the default layers (CAM resized to
    28 x 28) and for the CAM layer alone (explainer maps)."""
    torch.manual_seed(0)
    backbone = request.getfixturevalue(name)
    images = torch.rand(2, 3, 224, 224)
    head = heads.create(head_name, backbone, init_from_classifier=True).eval()
    assert head.layers[-1] == backbone.cam_layer
    if head_name == "sacam":
        assert all(g == 0 for g in head.gammas().values())
    with torch.no_grad():
        logits, features = backbone.features(images, head.layers)
        maps = head(features)
        train_maps = head.train()(features)  # batch statistics: BN with weight 0 still gives 0
        cam = cam_logits(backbone, features[backbone.cam_layer], tuple(maps.shape[-2:]))
    assert maps.shape[-2:] == (28, 28)
    scale = cam.abs().amax().item()
    assert (maps - cam).abs().max().item() <= 1e-5 * max(1.0, scale)
    assert (train_maps - cam).abs().max().item() <= 1e-5 * max(1.0, scale)
    top = logits.argmax(dim=1)
    own = torch.arange(2)
    assert (normalize(maps[own, top]) - normalize(cam[own, top])).abs().max().item() <= 1e-5

    alone = heads.create(head_name, backbone, layers=[backbone.cam_layer], init_from_classifier=True)
    head_maps = HeadExplainer(backbone, alone)(images)
    cam_maps = explainers.create("cam", backbone)(images)
    assert (head_maps - cam_maps).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", ["no_skip", "no_skip_no_bn", "sigmoid_in_branch"])
def test_only_the_standard_tame_variant_starts_from_the_classifier(variant, tiny_backbone):
    with pytest.raises(ValueError, match=rf"variant '{variant}' cannot start from the classifier.*only 'standard'"):
        heads.create("tame", tiny_backbone, variant=variant, init_from_classifier=True)
    assert heads.create("tame", tiny_backbone, variant=variant).variant == variant  # the default: no CAM start


def test_tame_starts_from_the_classifier_only_on_layers_with_the_cam_layer(tiny_backbone):
    with pytest.raises(ValueError, match=r"CAM layer 'layer4'.*\['layer2', 'layer3'\] do not include it: add 'layer4'"):
        heads.create("tame", tiny_backbone, layers=["layer2", "layer3"], init_from_classifier=True)
    plain = heads.create("tame", tiny_backbone)  # the default: TAME's own initialisation
    assert plain.layers == tiny_backbone.default_layers and all(b.bn.weight.all() for b in plain.branches)
    reordered = heads.create("tame", tiny_backbone, layers=["layer4", "layer2"], init_from_classifier=True)
    linear = tiny_backbone.linear_classifier()
    torch.testing.assert_close(reordered.fuser.weight[:, :96, 0, 0], linear.weight)  # the CAM layer comes first
    assert not reordered.fuser.weight[:, 96:].any()
    torch.testing.assert_close(reordered.fuser.bias, linear.bias)
    assert all(not b.bn.weight.any() and not b.bn.bias.any() for b in reordered.branches)


def test_a_tame_head_started_from_the_classifier_learns():
    """The fusion and the CAM layer's BN weight get gradients at once (the BN weight is 0, the conv at its random
    init); the other branches, which the fusion does not read yet, get theirs after one step, as does the CAM
    layer's conv (its BN weight is no longer 0)."""
    torch.manual_seed(0)
    module = HeadTrainingModule(TINY_BACKBONE, {"name": "tame", "init_from_classifier": True})
    head, backbone = module.head, module.backbone
    images = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    module.train()

    def backward() -> None:
        head.zero_grad()
        with torch.no_grad():
            logits, features = backbone.features(images, head.layers)
        terms, _ = module.masking_pass(images, features, logits.argmax(dim=1))
        terms["loss"].backward()

    backward()
    cam = head.layers.index(backbone.cam_layer)
    widths = [shape[0] for shape in head.layer_shapes.values()]
    starts = [sum(widths[:i]) for i in range(len(widths))]
    assert all(head.fuser.weight.grad[:, s : s + w].abs().sum() > 0 for s, w in zip(starts, widths, strict=True))
    assert head.fuser.bias.grad.abs().sum() > 0
    bn_grads = [branch.bn.weight.grad.abs().sum().item() for branch in head.branches]
    assert bn_grads[cam] > 0
    assert all(grad == 0 for i, grad in enumerate(bn_grads) if i != cam), bn_grads
    torch.optim.SGD(head.parameters(), lr=0.05).step()
    backward()
    assert all(branch.bn.weight.grad.abs().sum() > 0 for branch in head.branches)
    assert head.branches[cam].conv.weight.grad.abs().sum() > 0  # its BN weight is no longer 0


def test_a_mask_explanation_has_the_trained_masks_values_and_the_logits_pixel_order():
    """``explanation=mask``: values = min-max of sigmoid(logits) (within the tie-break weight), pixel order =
    that of the upsampled logits, also where the sigmoid saturates to 1.0 (so deletion, insertion and ROAD,
    which only read the order, score it as the logits map)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 7) * 4
    logits[0, 2:5, 2:5] = 40 + torch.rand(3, 3)  # saturated: sigmoid is exactly 1.0 in float32 there
    upsampled = F.interpolate(logits[:, None], size=(56, 56), mode="bilinear", align_corners=False)[:, 0]
    mask = target_maps(logits, (56, 56), "mask")
    assert mask.shape == (3, 56, 56) and mask.amin() == 0 and mask.amax() == 1
    assert (mask - normalize(torch.sigmoid(upsampled))).abs().max() <= 2e-3
    # along the logits' order, the mask never decreases, and rises wherever the logits do (saturated or not)
    order = upsampled.flatten(1).argsort(dim=1)
    rises = upsampled.flatten(1).gather(1, order).diff(dim=1) > 1e-2  # float32 resolves the tie-break to ~3e-3
    steps = mask.flatten(1).gather(1, order).diff(dim=1)
    assert (steps >= -1e-6).all() and (steps[rises] > 0).all()
    saturated = torch.sigmoid(upsampled[0]).eq(1.0)
    assert saturated.sum() > 100 and mask[0][saturated].unique().numel() > 100
    # TAME's explanation: min-max at the head's resolution, then upsampling
    expected = F.interpolate(normalize(logits)[:, None], size=(56, 56), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(target_maps(logits, (56, 56)), expected)


@pytest.mark.parametrize("explanation", ["logits", "mask"])
def test_smoothing_blurs_the_explanation_by_a_gaussian_in_cells_of_the_head_map(explanation):
    """``smoothing=s``: the explanation blurred by a Gaussian of s cells of the head's map (per axis: 7 x 14
    logits to 56 x 56 make 8 x 4 pixels a cell), min-max again; 0 is the explanation itself."""
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 14) * 3
    plain = target_maps(logits, (56, 56), explanation)
    assert torch.equal(target_maps(logits, (56, 56), explanation, 0.0), plain)
    blurred = target_maps(logits, (56, 56), explanation, 0.5)  # sigma 4 px along H, 2 px along W
    taps_h, taps_w = 2 * math.ceil(3 * 4.0) + 1, 2 * math.ceil(3 * 2.0) + 1
    expected = normalize(gaussian_blur(plain[:, None], [taps_w, taps_h], [2.0, 4.0])[:, 0])  # one 2-D kernel
    torch.testing.assert_close(blurred, expected, rtol=0, atol=1e-5)
    assert blurred.amin() == 0 and blurred.amax() == 1 and not torch.allclose(blurred, plain, atol=1e-2)
    # the deletion order of the unsaturated logits, blurred the same way (what loss.deleted ranks by)
    order = normalize(gaussian_blur(upsample(normalize(logits), (56, 56))[:, None], [taps_w, taps_h], [2.0, 4.0]))
    torch.testing.assert_close(ranking_maps(logits, (56, 56), 0.5), order[:, 0], rtol=0, atol=1e-5)


def test_smoothing_ranks_a_saturated_plateau_from_its_centre():
    """A mask saturated on a square ties there but for the logits' tie-break; blurred, its centre ranks first
    and its border last, whatever the logits inside it do."""
    logits = torch.full((1, 14, 14), -6.0)
    offsets = torch.arange(8.0) - 3.5
    logits[0, 3:11, 3:11] = 30 + offsets.abs()[:, None] + offsets.abs()[None]  # sigmoid 1.0, rising outwards
    centre, corner, outside = (slice(26, 30),) * 2, (slice(16, 18),) * 2, (slice(0, 4),) * 2
    plain = target_maps(logits, (56, 56), "mask")[0]
    assert plain[corner].min() > plain[centre].max()  # without a blur, the logits' tie-break ranks the corner first
    smoothed = target_maps(logits, (56, 56), "mask", 1.0)[0]
    assert smoothed[centre].min() > smoothed[corner].max() > smoothed[outside].max()


@pytest.mark.parametrize("smoothing", [-1.0, float("inf"), True, "wide"])
def test_smoothing_must_be_a_standard_deviation(smoothing, tiny_backbone):
    with pytest.raises(ValueError, match=r"head smoothing must be a standard deviation >= 0 in cells"):
        heads.create("tame", tiny_backbone, smoothing=smoothing)


@pytest.mark.parametrize("name", ["tame", "sacam"])
def test_the_explanation_is_a_head_option_that_reaches_the_explainer(name, tiny_backbone):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)
    options = {"init_from_classifier": False} if name == "sacam" else {}
    plain = heads.create(name, tiny_backbone, **options).eval()
    masked = heads.create(name, tiny_backbone, explanation="mask", **options).eval()
    masked.load_state_dict(plain.state_dict())
    assert plain.explanation == "logits" and masked.explanation == "mask"
    with torch.no_grad():
        logits, features = tiny_backbone.features(images, plain.layers)
        own = select_classes(plain(features, None), None, logits.argmax(dim=1))
    assert torch.allclose(HeadExplainer(tiny_backbone, masked)(images), target_maps(own, (64, 64), "mask"), atol=1e-4)
    assert torch.allclose(HeadExplainer(tiny_backbone, plain)(images), target_maps(own, (64, 64)), atol=1e-4)
    smoothed = heads.create(name, tiny_backbone, explanation="mask", smoothing=0.5, **options).eval()
    smoothed.load_state_dict(plain.state_dict())
    expected = target_maps(own, (64, 64), "mask", 0.5)
    assert torch.allclose(HeadExplainer(tiny_backbone, smoothed)(images), expected, atol=1e-4)
    with pytest.raises(ValueError, match=r"explanation must be one of \['logits', 'mask'\], got 'soft'"):
        heads.create(name, tiny_backbone, explanation="soft", **options)


def test_on_an_average_pooled_vit_sacam_starts_as_cam_tame_and_class_token_vits_are_refused_with_the_reason():
    """A ViT that averages its normalised patch tokens into one linear layer (timm global_pool='avg',
    fc_norm=False) has CAM at ``norm``: SA-CAM started from the classifier gives it within 1e-5. TAME's ReLU
    branches would clip those signed tokens, and a class token feeding the classifier leaves no CAM: both
    refused, saying why."""
    torch.manual_seed(0)
    vit = backbones.create("test_vit", weights=None, num_classes=10, class_token=False, global_pool="avg",
                           fc_norm=False)  # fmt: skip
    assert vit.cam_layer == "norm" and vit.default_layers == ("blocks.3", "blocks.4", "norm")
    images = torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    head = heads.create("sacam", vit, init_from_classifier=True).eval()
    with torch.no_grad():
        _, features = vit.features(images, head.layers)
        maps = head(features)
        cam = cam_logits(vit, features["norm"], tuple(maps.shape[-2:]))
    assert cam.abs().amax() > 0.1 and features["norm"].min() < 0
    assert (maps - cam).abs().max().item() <= 1e-5 * max(1.0, cam.abs().amax().item())
    alone = heads.create("sacam", vit, layers=["norm"], init_from_classifier=True)
    cam_maps = explainers.create("cam", vit)(images)
    assert (HeadExplainer(vit, alone)(images) - cam_maps).abs().max().item() <= 1e-5

    with pytest.raises(ValueError, match=r"TameHead .* ReLU.* layer 'norm' has negative values.*head=sacam"):
        heads.create("tame", vit, init_from_classifier=True)
    class_token = backbones.create("test_vit", weights=None, num_classes=10)
    with pytest.raises(ValueError, match="not when a class token feeds it"):
        heads.create("sacam", class_token, init_from_classifier=True)
