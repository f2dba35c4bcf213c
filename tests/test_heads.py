from __future__ import annotations

import pytest
import torch

from tame_lit import backbones, heads
from tame_lit.heads import TameHead, select_classes


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
    with pytest.raises(ValueError, match=r"unknown head 'tamer'.*\['tame'\]"):
        heads.create("tamer", tiny_backbone)
