from __future__ import annotations

import pytest
import torch

from tame_lit import backbones, heads
from tame_lit.heads import TameHead, select_classes
from tame_lit.heads.base import class_maps, resize
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
