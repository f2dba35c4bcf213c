"""What every registered explainer promises, checked on a tiny real CNN."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tame_lit import backbones, explainers
from tame_lit.features import count_hooks
from tests.helpers import TINY_BACKBONE, compose_train

# small settings so that each method runs in about a second on a CPU
FAST = {
    "rise": {"num_masks": 48, "batch_size": 32},
    "scorecam": {"batch_size": 64},
    "sise": {"batch_size": 128},
}
ALL = explainers.available()
CNN_METHODS = explainers.defined_for("spatial")  # all but the transformer-only ones (attention rollout)


@pytest.fixture(scope="module")
def backbone() -> backbones.Backbone:
    torch.manual_seed(0)
    return backbones.create(**TINY_BACKBONE)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def make(name: str, backbone: backbones.Backbone) -> explainers.Explainer:
    return explainers.create(name, backbone, **FAST.get(name, {}))


def test_the_registry_has_every_method_of_the_issue():
    assert set(ALL) >= {"gradcam", "gradcampp", "xgradcam", "layercam", "scorecam", "ablationcam", "rise", "sise",
                        "ge", "attention_gradcam", "sacam_posthoc", "random"}  # fmt: skip


@pytest.mark.parametrize("name", CNN_METHODS)
def test_maps_are_float32_in_unit_range_and_batch_independent(name, backbone, images):
    explainer = make(name, backbone)
    maps = explainer(images)
    assert maps.shape == (8, 64, 64) and maps.dtype == torch.float32 and maps.device == images.device
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    alone = torch.cat([explainer(images[i, None]) for i in (0, 5)])
    torch.testing.assert_close(alone, maps[[0, 5]], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", CNN_METHODS)
def test_model_state_and_hooks_are_unchanged_also_when_a_call_raises(name, backbone, images):
    explainer = make(name, backbone)
    model = backbone.model
    model.layer3.train()  # an unusual mix of modes and flags that must survive the call
    model.layer2[0].conv1.weight.requires_grad_(True)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    try:
        explainer(images[:2], torch.tensor([1, 2]))
        assert count_hooks(model) == 0
        with pytest.raises(ValueError, match=r"\[0, 10\)"):
            explainer(images[:2], torch.tensor([1, 10]))
        with pytest.raises(ValueError, match="2 class indices"):
            explainer(images[:2], torch.tensor([1, 2, 3]))

        def boom(module, inputs, output):
            raise RuntimeError("boom")

        handle = model.layer4.register_forward_hook(boom)
        try:
            if name != "random":  # the random baseline never runs the model
                with pytest.raises(RuntimeError, match="boom"):
                    explainer(images[:2])
        finally:
            handle.remove()
        assert count_hooks(model) == 0
        assert [m.training for m in model.modules()] == modes
        assert [p.requires_grad for p in model.parameters()] == flags
    finally:
        model.layer3.eval()
        model.layer2[0].conv1.weight.requires_grad_(False)
        model.layer2[0].conv1.weight.grad = None


@pytest.mark.parametrize("name", CNN_METHODS)
def test_works_inside_inference_mode_no_grad_and_autocast(name, backbone, images):
    explainer = make(name, backbone)
    reference = explainer(images[:2])
    with torch.inference_mode():
        torch.testing.assert_close(explainer(images[:2]), reference, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(explainer(images[:2]), reference, rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = explainer(images[:2])
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all() and 0 <= mixed.min() <= mixed.max() <= 1


@pytest.mark.parametrize("name", CNN_METHODS)
def test_degenerate_inputs_give_zeros_not_nan(name, backbone):
    maps = make(name, backbone)(torch.zeros(2, 3, 64, 64))
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1


def test_every_explainer_has_a_config_that_builds_it(backbone, tmp_path):
    from omegaconf import OmegaConf

    from tame_lit.config import config_dir

    folder = Path(config_dir()) / "explainer"
    assert sorted(path.stem for path in folder.glob("*.yaml")) == sorted(ALL)
    cfg = compose_train([], tmp_path, config="evaluate")
    assert sorted(cfg.explainer) == sorted(ALL)
    vit = backbones.create(**TINY_VIT)
    for key, entry in cfg.explainer.items():
        options = OmegaConf.to_container(entry, resolve=True)
        name = options.pop("name")
        assert name == key
        explainer = explainers.create(name, backbone if name in CNN_METHODS else vit, **options)
        assert isinstance(explainer, explainers.Explainer)


# the same promises on a tiny ViT (class token, 6 blocks, 10x10 patch tokens at 160 px; tame_lit.layouts)
TINY_VIT = {"name": "test_vit", "weights": None, "num_classes": 10}


def test_a_transformer_only_method_refuses_a_cnn_saying_why(backbone):
    assert set(ALL) - set(CNN_METHODS) == {"attention_rollout"}
    with pytest.raises(ValueError, match=r"attention_rollout is not defined for test_resnet.*layers are spatial"):
        explainers.create("attention_rollout", backbone)


REFUSED_ON_VIT = {  # with the reason in the message
    "cam": "not a linear readout of the global average",  # a class token, not pooled tokens, feeds the classifier
    "sise": "sise is not defined for test_vit",  # no CNN stages at several resolutions
}


@pytest.fixture(scope="module")
def vit() -> backbones.Backbone:
    torch.manual_seed(0)
    return backbones.create(**TINY_VIT)


@pytest.mark.parametrize("name", ALL)
def test_on_a_tiny_vit_maps_are_in_range_batch_independent_and_leave_the_model_alone(name, vit):
    images = torch.rand(4, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    if name in REFUSED_ON_VIT:
        with pytest.raises(ValueError, match=REFUSED_ON_VIT[name]):
            make(name, vit)(images[:1])
        assert count_hooks(vit.model) == 0
        return
    model = vit.model
    model.blocks[2].train()  # modes and flags that must survive the calls
    model.blocks[1].attn.qkv.weight.requires_grad_(True)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    try:
        explainer = make(name, vit)
        maps = explainer(images)
        assert maps.shape == (4, 160, 160) and maps.dtype == torch.float32
        assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
        assert (maps.flatten(1).amax(dim=1) > maps.flatten(1).amin(dim=1)).all()  # not a blank map
        torch.testing.assert_close(explainer(images[2:3]), maps[2:3], rtol=1e-4, atol=1e-4)
        assert count_hooks(model) == 0
        assert [m.training for m in model.modules()] == modes
        assert [p.requires_grad for p in model.parameters()] == flags
    finally:
        model.blocks[2].eval()
        model.blocks[1].attn.qkv.weight.requires_grad_(False)
        model.blocks[1].attn.qkv.weight.grad = None


@pytest.mark.parametrize("name", ALL)
def test_on_backbone_runs_the_same_method_on_a_copy_and_only_there(name, backbone, vit):
    """What the randomisation test relies on: ``on_backbone(copy)`` explains with the copy's weights (the same maps
    while the copy is equal; other maps once it is randomised) and the original explainer keeps its own model."""
    from tame_lit.metrics.randomisation import randomise, randomised_copy

    network = vit if name == "attention_rollout" else backbone
    size = 160 if network is vit else 64
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    explainer = make(name, network)
    maps = explainer(images)
    copy = randomised_copy(network)
    moved = explainer.on_backbone(copy)
    torch.testing.assert_close(moved(images), maps, rtol=1e-4, atol=1e-4)
    randomise(copy.model, 1)
    if name != "random":  # the model-blind baseline: the same maps whatever the weights
        assert not torch.allclose(moved(images), maps, atol=1e-3)
    torch.testing.assert_close(explainer(images), maps, rtol=1e-4, atol=1e-4)
    assert count_hooks(network.model) == 0 and count_hooks(copy.model) == 0
