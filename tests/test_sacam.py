"""The SA-CAM head: its attention is the written formula, it starts as CAM (the test is in test_heads.py, with
TAME's), it trains, its memory is bounded."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tame_lit import backbones, heads
from tame_lit.data import ImageDataModule
from tame_lit.heads import SACAMHead
from tame_lit.heads.sacam import SpatialSelfAttention
from tame_lit.system import peak_memory
from tame_lit.training import HeadTrainingModule
from tests.helpers import masked_passes


def written_attention(module: SpatialSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """A' = A + gamma V softmax(Q^T K / sqrt(d))^T, with the N x N matrix spelled out (issue #6)."""
    batch, channels, height, width = x.shape
    q, k, v = (conv(x).flatten(2) for conv in (module.query, module.key, module.value))  # [B, c, N]
    scores = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(q.shape[1]), dim=-1)  # S[i, j]: i attends to j
    return x + module.gamma * (v @ scores.transpose(1, 2)).view(batch, channels, height, width)


@pytest.mark.parametrize(("channels", "reduction", "size"), [(16, 8, 6), (10, 3, 5), (40, 8, 7), (300, 8, 4)])
def test_attention_and_its_gradients_equal_the_written_formula(channels, reduction, size):
    """Also for widths that need padding (10 / 3 -> d = 3) and several value groups (300 > 256)."""
    torch.manual_seed(0)
    module = SpatialSelfAttention(channels, reduction)
    with torch.no_grad():
        module.gamma.fill_(0.7)
    x = torch.randn(3, channels, size, size + 1, requires_grad=True)
    ours, reference = module(x), written_attention(module, x)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(ours)
    params = [x, module.gamma, module.query.weight, module.key.weight, module.value.weight]
    grads = torch.autograd.grad((ours * weights).sum(), params)
    expected = torch.autograd.grad((reference * weights).sum(), params)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert module.key_channels == max(1, channels // reduction)


def test_gamma_zero_leaves_the_features_unchanged_and_v_starts_as_the_identity():
    module = SpatialSelfAttention(24)
    x = torch.randn(2, 24, 5, 5)
    assert torch.equal(module(x), x)
    torch.testing.assert_close(module.value(x), x)  # Att = A S^T at the start: attention-weighted smoothing
    assert not torch.allclose(SpatialSelfAttention(24, value_init="random").value(x), x)
    with pytest.raises(ValueError, match=r"value_init must be 'identity' or 'random', got 'eye'"):
        SpatialSelfAttention(24, value_init="eye")


def test_a_classifier_start_needs_pooling_and_one_linear_layer():
    vgg = backbones.create("vgg16", weights=None, input_size=64)
    with pytest.raises(ValueError, match=r"vgg16 .*features\.29.*three FC layers"):
        heads.create("sacam", vgg, init_from_classifier=True)
    with pytest.raises(ValueError, match=r"three FC layers"):  # the default starts from CAM
        heads.create("sacam", vgg)
    no_start = heads.create("sacam", vgg, init_from_classifier=False)
    assert no_start.layers == ("features.16", "features.23", "features.29")
    resnet = backbones.create("test_resnet", weights=None, num_classes=10, input_size=64)
    with pytest.raises(ValueError, match=r"layers \['layer2', 'layer3'\] do not include it: add 'layer4'"):
        heads.create("sacam", resnet, layers=["layer2", "layer3"], init_from_classifier=True)
    reordered = heads.create("sacam", resnet, layers=["layer4", "layer2"], init_from_classifier=True)
    linear = resnet.linear_classifier()
    torch.testing.assert_close(reordered.fuser.weight[:, :96, 0, 0], linear.weight)  # the CAM layer comes first
    assert not reordered.fuser.weight[:, 96:].any()


def test_attention_goes_only_to_the_chosen_layers_and_unknown_ones_are_named():
    torch.manual_seed(0)
    shapes = {"a": (8, 6, 6), "b": (16, 6, 6), "c.1": (32, 3, 3)}
    head = SACAMHead(shapes, num_classes=5, attention_layers=["c.1", "b"])
    assert head.attention_layers == ("b", "c.1") and set(head.attention) == {"b", "c_1"}
    features = {name: torch.randn(2, *shape) for name, shape in shapes.items()}
    with torch.no_grad():
        for module in head.attention.values():
            module.gamma.fill_(1.0)
        full = head(features)
        weight, bias = head.fuser.weight, head.fuser.bias
        plain_a = F.conv2d(features["a"], weight[:, :8], bias)  # "a" reaches the fusion as it is
        plain_b = F.conv2d(features["b"], weight[:, 8:24])
        head.fuser.weight[:, 8:] = 0
        torch.testing.assert_close(head(features), plain_a)
        head.fuser.weight.copy_(weight)
    assert not torch.allclose(full, plain_a + plain_b + F.conv2d(resize3(features["c.1"]), weight[:, 24:]))
    with pytest.raises(ValueError, match=r"attention_layers \['d'\] are not among .*\['a', 'b', 'c.1'\]"):
        SACAMHead(shapes, num_classes=5, attention_layers=["d"])


def resize3(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=(6, 6), mode="bilinear", align_corners=False)


def test_parameter_count_follows_the_structure():
    backbone = backbones.create("resnet50", weights=None)
    head = heads.create("sacam", backbone)
    expected = 0
    for channels in (512, 1024, 2048):
        d = channels // 8
        expected += 2 * (channels * d + d) + channels * channels + channels + 1  # Q, K, V convs and gamma
    expected += (512 + 1024 + 2048) * 1000 + 1000  # the fusion conv
    assert sum(p.numel() for p in head.parameters() if p.requires_grad) == expected == 10_470_763


# Peak tensor memory of one training step (forward with 32 classes + backward) of the EfficientNet-Lite0 SA-CAM
# head at batch 32 (28 x 28, 14 x 14 and 7 x 7 features): `python benchmarks/head_memory.py` reports 89 MiB
# on CPU, and 237 MiB when the math kernel holds the 32 x 784^2 attention scores (75 MiB per copy).
PEAK_BUDGET_MIB = 96


@pytest.mark.real
def test_peak_memory_of_the_head_at_batch_32_stays_within_the_benchmark(lite0):
    torch.manual_seed(0)
    head = heads.create("sacam", lite0)
    assert head.layer_shapes["blocks.2"][1:] == (28, 28) and "blocks.2" in head.attention_layers
    features = {name: torch.randn(32, *shape) for name, shape in head.layer_shapes.items()}
    classes = torch.arange(32) * 31

    def step() -> None:
        head(features, classes).square().mean().backward()

    step()
    peak = peak_memory(step) / 2**20
    with sdpa_kernel([SDPBackend.MATH]):
        math_peak = peak_memory(step) / 2**20
    assert peak <= PEAK_BUDGET_MIB
    assert math_peak >= peak + 32 * 784**2 * 4 / 2**20  # the fused kernel saves at least one score matrix


@pytest.mark.real
def test_a_short_run_on_imagenette_lowers_the_loss_and_moves_gamma(lite0, shared_data):
    """From its CAM start, 20 steps on imagenette/train (224 px, batch 32, the experiment's learning rate)
    lower the masking loss on held-out imagenette/val images and move every gamma away from 0."""
    torch.manual_seed(0)
    module = HeadTrainingModule(
        {"name": "efficientnet_lite0"}, {"name": "sacam", "init_from_classifier": True}, optimizer={"max_lr": 1e-2}
    )
    data = ImageDataModule(
        train_root=str(shared_data / "imagenette" / "train"), root=str(shared_data / "imagenette" / "val"),
        batch_size=32, num_workers=2, train_limit_per_class=64, limit_per_class=4,
    )  # fmt: skip
    data.setup("fit")

    def held_out_loss() -> float:
        total = count = 0.0
        for logits, terms, _ in masked_passes(module, data.val_dataloader()):
            total += terms["loss"].item() * len(logits)
            count += len(logits)
        return total / count

    before = held_out_loss()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=20, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, data)
    after = held_out_loss()
    gammas = module.head.gammas()
    print(f"held-out loss {before:.3f} -> {after:.3f}, gammas {gammas}")
    assert after < before - 0.3
    assert set(gammas) == {"blocks.2", "blocks.4", "bn2"}
    assert all(abs(g) > 1e-3 for g in gammas.values()), gammas
