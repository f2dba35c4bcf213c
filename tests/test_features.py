from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from tame_lit.features import capture, check_layers, count_hooks, preserved_state, stage_outputs


def conv_relu_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )


def test_capture_is_safe_from_a_following_inplace_relu():
    net = conv_relu_net().eval()
    x = torch.randn(2, 3, 8, 8)
    expected = net[0](x)
    assert expected.min() < 0  # the in-place ReLU would zero these
    with capture(net, ["0"]) as store:
        net(x)
    torch.testing.assert_close(store["0"], expected)
    assert count_hooks(net) == 0


def test_captured_activation_carries_exact_gradients():
    net = conv_relu_net().eval()
    x = torch.randn(1, 3, 8, 8)
    with capture(net, ["2"]) as store:
        score = net(x)[0, 3]
    (gradient,) = torch.autograd.grad(score, store["2"])
    # by hand: score = w3 . mean(relu(A)) + b, so dscore/dA = w3[c] / 64 where A > 0, else 0
    activation = store["2"].detach()
    expected = (net[6].weight[3].view(1, 4, 1, 1) / 64) * (activation > 0)
    torch.testing.assert_close(gradient, expected)


def test_hooks_are_removed_when_the_block_raises():
    net = conv_relu_net()
    with pytest.raises(RuntimeError, match="boom"), capture(net, ["0", "2"]):
        assert count_hooks(net) == 2
        raise RuntimeError("boom")
    assert count_hooks(net) == 0


def test_unknown_layer_lists_the_valid_names():
    net = conv_relu_net()
    with pytest.raises(ValueError) as info:
        check_layers(net, ["0", "conv9"], "my-net")
    message = str(info.value)
    assert "conv9" in message and "my-net" in message
    assert "valid names are: 0, 1, 2, 3, 4, 5, 6" in message


def test_single_string_layers_are_refused():
    with pytest.raises(TypeError, match=r"\['layer4'\]"):
        check_layers(conv_relu_net(), "layer4")


def test_a_module_that_runs_twice_is_refused():
    shared = nn.ReLU()
    net = nn.Sequential(nn.Conv2d(3, 3, 1), shared, nn.Conv2d(3, 3, 1), shared)
    with pytest.raises(RuntimeError, match="more than once"), capture(net, ["1"]):
        net(torch.randn(1, 3, 4, 4))
    assert count_hooks(net) == 0


def test_preserved_state_restores_modes_and_flags_after_an_exception():
    net = conv_relu_net().train()
    net[2].eval()
    net[0].weight.requires_grad_(False)
    with pytest.raises(KeyError), preserved_state(net):
        net.eval()
        net.requires_grad_(True)
        raise KeyError
    assert net.training and net[0].training and not net[2].training
    assert not net[0].weight.requires_grad and net[2].weight.requires_grad


def test_stage_outputs_of_standard_cnns():
    example = torch.zeros(1, 3, 224, 224)
    resnet = torchvision.models.resnet50().train()
    assert stage_outputs(resnet, example) == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert resnet.training  # the dry run does not leave the model in eval mode
    vgg = torchvision.models.vgg16()
    sise_layers = ["features.3", "features.8", "features.15", "features.22", "features.29"]
    assert stage_outputs(vgg, example) == [*sise_layers, "features"]  # + the final 7x7 pool output
    assert stage_outputs(vgg, example, conv_only=True) == sise_layers
    assert stage_outputs(resnet, example, conv_only=True) == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert count_hooks(resnet) == 0 and count_hooks(vgg) == 0
