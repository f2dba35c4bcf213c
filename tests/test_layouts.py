"""Transformer layers read as ``[B, C, h, w]`` maps (``tame_lit.layouts``): ViT/DeiT tokens without their prefix
tokens, Swin's channels-last stages, CNN maps as they are; the network's output unchanged by the capture, and
gradients with respect to the maps equal to the tokens' gradients laid out the same way."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from tame_lit import backbones, explainers
from tame_lit.features import count_hooks
from tame_lit.layouts import FeatureLayout
from tame_lit.train import train
from tests.helpers import compose_train

TINY_SWIN = {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}
# (backbone options, expected layout, input size)
CASES = {
    "vit, class token": ({"name": "test_vit"}, FeatureLayout("tokens", 1, (16, 16)), 160),
    "vit, class and 4 register tokens": (
        {"name": "test_vit", "reg_tokens": 4},
        FeatureLayout("tokens", 5, (16, 16)),
        160,
    ),
    "vit, no prefix (average pooling)": (
        {"name": "test_vit", "class_token": False, "global_pool": "avg"},
        FeatureLayout("tokens", 0, (16, 16)),
        160,
    ),
    "deit, distilled (class and distillation tokens)": (
        {"name": "deit_tiny_distilled_patch16_224", "depth": 3, "embed_dim": 48, "num_heads": 1},
        FeatureLayout("tokens", 2, (16, 16)),
        224,
    ),
    "swin (channels last)": (
        {"name": "swin_tiny_patch4_window7_224", **TINY_SWIN},
        FeatureLayout("channels_last"),
        224,
    ),
    "cnn": ({"name": "test_resnet", "input_size": 64}, FeatureLayout("spatial"), 64),
}


def _expected_map(raw: torch.Tensor, layout: FeatureLayout, size: int) -> torch.Tensor:
    """The formula, written out: drop the prefix tokens, tokens row by row into an h x w grid, channels first."""
    if layout.kind == "spatial":
        return raw
    if layout.kind == "channels_last":
        return raw.permute(0, 3, 1, 2)
    side = size // layout.patch_size[0]
    patches = raw[:, layout.prefix_tokens :]
    return torch.stack([patches[:, row * side : (row + 1) * side].transpose(1, 2) for row in range(side)], dim=2)


@pytest.mark.parametrize("case", list(CASES))
def test_layers_become_maps_with_unchanged_logits_and_exact_gradients(case):
    options, layout, size = CASES[case]
    torch.manual_seed(0)
    backbone = backbones.create(weights=None, num_classes=10, **options)
    assert backbone.layout == layout
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    layer = backbone.default_layers[-2]

    raw_outputs = []  # the layer's own output, seen by an independent hook
    handle = backbone.layer(layer).register_forward_hook(lambda module, inputs, output: raw_outputs.append(output))
    try:
        with torch.no_grad():
            plain = backbone(images)
        pixels = images.clone().requires_grad_(True)
        logits, features = backbone.features(pixels, [layer])
    finally:
        handle.remove()
    feature_map = features[layer]
    assert feature_map.dim() == 4 and feature_map.shape[1:] == backbone.layer_shapes([layer])[layer]
    torch.testing.assert_close(feature_map, _expected_map(raw_outputs[0].detach(), layout, size))
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-6)  # capture changes nothing downstream

    # d(score)/d(map) through the capture equals d(score)/d(raw output) laid out by the same formula, and the
    # input's gradient is the one without capture
    score = logits[:, 3].sum()
    map_gradient, pixel_gradient = torch.autograd.grad(score, [feature_map, pixels])

    def keep_gradient(module, inputs, output):
        output.retain_grad()
        raw_outputs.append(output)

    raw_outputs.clear()
    pixels = images.clone().requires_grad_(True)
    handle = backbone.layer(layer).register_forward_hook(keep_gradient)
    try:
        backbone(pixels)[:, 3].sum().backward()
    finally:
        handle.remove()
    assert map_gradient.abs().max() > 0
    torch.testing.assert_close(map_gradient, _expected_map(raw_outputs[0].grad, layout, size), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(pixel_gradient, pixels.grad, rtol=1e-4, atol=1e-7)
    assert count_hooks(backbone) == 0


def test_a_vit_at_another_input_size_gives_the_grid_of_that_size():
    backbone = backbones.create("test_vit", weights=None, num_classes=10, dynamic_img_size=True)
    _, features = backbone.features(torch.rand(1, 3, 128, 192), ["blocks.5"])
    assert features["blocks.5"].shape == (1, 64, 8, 12)


def test_a_vit_with_fewer_than_three_blocks_reads_all_of_them():
    backbone = backbones.create("test_vit", weights=None, num_classes=10, depth=2)
    assert backbone.default_layers == ("blocks.0", "blocks.1") and backbone.cam_layer == "blocks.1.norm1"


def test_a_layer_that_is_not_a_token_sequence_or_map_is_refused_by_name():
    backbone = backbones.create("test_vit", weights=None, num_classes=10)
    with pytest.raises(ValueError, match=r"layer 'fc_norm' returns shape \(1, 64\), not \[B, 1 \+ 10x10 tokens, C\]"):
        backbone.features(torch.rand(1, 3, 160, 160), ["fc_norm"])
    assert count_hooks(backbone) == 0


@pytest.mark.parametrize(
    ("entry", "layers", "cam_layer", "shapes"),
    [
        ("vit_b16", ("blocks.9", "blocks.10", "blocks.11"), "blocks.11.norm1", [(768, 14, 14)] * 3),
        ("deit_small", ("blocks.9", "blocks.10", "blocks.11"), "blocks.11.norm1", [(384, 14, 14)] * 3),
        ("swin_tiny", ("layers.1", "layers.2", "layers.3"), "norm", [(192, 28, 28), (384, 14, 14), (768, 7, 7)]),
    ],
)
def test_transformer_entries_read_their_default_layers_as_maps(entry, layers, cam_layer, shapes):
    backbone = backbones.create(entry, weights=None)
    assert backbone.default_layers == layers and backbone.cam_layer == cam_layer
    assert list(backbone.layer_shapes(layers).values()) == shapes


@pytest.mark.parametrize("entry", ["vit_b16", "deit_small", "swin_tiny"])
def test_train_py_trains_and_exports_a_tame_head_on_each_transformer_entry(entry, tmp_path):
    """``python train.py backbone=<entry> backbone.weights=null trainer.max_steps=3``: the head reads the entry's
    layers as maps, trains (its weights move, the loss is finite) and is exported."""
    overrides = [f"backbone={entry}", "backbone.weights=null", "trainer.max_steps=3", "data.batch_size=2",
                 "data.limit=6", "logger=none"]  # fmt: skip
    metrics = train(compose_train(overrides, tmp_path))
    assert math.isfinite(metrics["train/loss"])
    exported = load_file(tmp_path / "export" / "head.safetensors")
    layers = {"vit_b16": 768, "deit_small": 384, "swin_tiny": 768}[entry]
    assert any(value.shape[:2] == (layers, layers) for value in exported.values())  # the deepest layer's branch


def test_gradcam_on_a_vit_agrees_with_pytorch_grad_cam_and_its_reshape_transform():
    """The same layer (the last block's first norm), the same top-1 targets: Pearson r >= 0.98 per image between
    tame-lit's Grad-CAM (no reshape function) and pytorch-grad-cam's with the reshape its README gives for ViTs."""
    grad_cam = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    vit = backbones.create("test_vit", weights=None, num_classes=10)
    images = torch.rand(4, 3, 160, 160, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        targets = vit(images).argmax(dim=1)
    ours = explainers.create("gradcam", vit)(images, targets)

    def reshape_transform(tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 1:, :].reshape(tokens.shape[0], 10, 10, tokens.shape[2]).permute(0, 3, 1, 2)

    cam = grad_cam.GradCAM(model=vit, target_layers=[vit.layer(vit.cam_layer)], reshape_transform=reshape_transform)
    wanted = [ClassifierOutputTarget(int(t)) for t in targets]
    # a frozen model: the input requires grad, as pytorch-grad-cam's issues advise
    theirs = torch.from_numpy(cam(input_tensor=images.clone().requires_grad_(True), targets=wanted))
    assert theirs.shape == ours.shape == (4, 160, 160)
    for mine, reference in zip(ours, theirs, strict=True):
        r = torch.corrcoef(torch.stack([mine.flatten(), reference.flatten().float()]))[0, 1].item()
        assert r >= 0.98, r


def test_the_t_tame_vit_experiment_reads_torchvisions_last_three_blocks_as_768x14x14_maps(tmp_path):
    cfg = compose_train(["experiment=tame_vit_b16_imagenet", "backbone.weights=null"], tmp_path)
    backbone = backbones.create(**cfg.backbone)
    assert backbone.layout == FeatureLayout("tokens", 1, (16, 16))  # torchvision's class token
    shapes = backbone.layer_shapes(list(cfg.backbone.layers))
    assert list(shapes) == [f"encoder.layers.encoder_layer_{i}" for i in (9, 10, 11)]
    assert set(shapes.values()) == {(768, 14, 14)} and backbone.cam_layer == "encoder.layers.encoder_layer_11.ln_1"
    assert cfg.optimizer.max_lr == 1e-3 and cfg.optimizer.bias_lr_factor == 1.0 and cfg.data.batch_size == 32


def test_ablation_cam_on_swin_reruns_only_the_tail_after_its_channels_last_layer(monkeypatch):
    """Swin's CAM layer is [B, h, w, C]: the tail after it takes the ablated map permuted back, so Ablation-CAM
    re-runs only that tail (the patch embedding runs once per call), with the maps of the full pass."""
    from tame_lit.explainers import ablationcam

    torch.manual_seed(0)
    swin = backbones.create("swin_tiny_patch4_window7_224", weights=None, num_classes=10, **TINY_SWIN)
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    calls = []
    handle = swin.model.patch_embed.register_forward_hook(lambda *_: calls.append(1))
    try:
        with_tail = explainers.create("ablationcam", swin)(images)
        embeddings_with_tail = len(calls)
        monkeypatch.setattr(ablationcam, "model_tail", lambda *_: None)
        full = explainers.create("ablationcam", swin)(images)
    finally:
        handle.remove()
    assert embeddings_with_tail == 1 and len(calls) - 1 > 2  # the full pass embeds once per batch of ablated channels
    assert with_tail.amax() > 0.5
    torch.testing.assert_close(with_tail, full, rtol=1e-4, atol=1e-4)
