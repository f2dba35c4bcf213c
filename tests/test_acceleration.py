"""``compile`` and ``channels_last`` change no result beyond rounding, in training and in explaining, and keep
layer names, hooks and state-dict keys as they are. The tests compile with the ``aot_eager`` backend (dynamo's
tracing and autograd graphs without inductor's minutes of C++ code generation on this CPU); inductor's speed
is measured in ``benchmarks/train_throughput.py``."""

from __future__ import annotations

import copy

import pytest
import torch

from tame_lit import backbones, explainers, heads
from tame_lit.acceleration import Acceleration, accelerate
from tame_lit.evaluate import evaluate
from tame_lit.explainers import HeadExplainer
from tame_lit.features import count_hooks
from tame_lit.train import train
from tame_lit.training import HeadTrainingModule
from tests.helpers import TINY_BACKBONE, TINY_OVERRIDES, compose_train
from tests.test_evaluate import FAST_METRICS, image_folder

FAST_COMPILE = ["compile=true", "+compile_options.backend=aot_eager", "channels_last=true"]


def test_compiled_channels_last_explainers_give_the_eager_maps():
    torch.manual_seed(0)
    backbone = backbones.create(**TINY_BACKBONE)
    head = heads.create("tame", backbone)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    eager = {"gradcam": explainers.create("gradcam", backbone), "head": HeadExplainer(backbone, head)}
    expected = {name: explainer(images) for name, explainer in eager.items()}

    fast_backbone, fast_head = copy.deepcopy(backbone), copy.deepcopy(head)
    accelerate(Acceleration(compile=True, channels_last=True, compile_options={"backend": "aot_eager"}),
               fast_backbone, fast_head)  # fmt: skip
    assert [name for name, _ in fast_backbone.named_modules()] == [name for name, _ in backbone.named_modules()]
    assert fast_backbone.state_dict().keys() == backbone.state_dict().keys()
    conv = next(m for m in fast_backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    fast = {"gradcam": explainers.create("gradcam", fast_backbone), "head": HeadExplainer(fast_backbone, fast_head)}
    for name, explainer in fast.items():
        for _ in range(2):  # the second call reuses the compiled graphs (hooks are added and removed each time)
            torch.testing.assert_close(explainer(images), expected[name], rtol=1e-4, atol=1e-4)
    assert count_hooks(fast_backbone) == 0 and not fast_backbone.training


def test_compiled_channels_last_training_gives_the_eager_head(tmp_path):
    """Three steps (TAME's head with its batch norms, a kept-pixels term), then the export, which rebuilds the
    head from the checkpoint: same state-dict keys, same weights within 1e-5."""
    checkpoint = "+callbacks.checkpoint={_target_: lightning.pytorch.callbacks.ModelCheckpoint, save_last: true}"
    common = [*TINY_OVERRIDES, "trainer.max_steps=3", "loss.kept=[0.5]", "logger=none", "callbacks=none", checkpoint]
    heads_trained = {}
    for name, extra in (("eager", []), ("fast", FAST_COMPILE)):
        train(compose_train([*common, *extra], tmp_path / name))
        state = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        heads_trained[name] = {key: value for key, value in state.items() if key.startswith("head.")}
    assert heads_trained["fast"].keys() == heads_trained["eager"].keys()
    for key, value in heads_trained["fast"].items():
        torch.testing.assert_close(value, heads_trained["eager"][key], rtol=1e-5, atol=1e-5, msg=key)
    assert (tmp_path / "fast" / "export" / "head.safetensors").is_file()


def test_evaluate_with_compile_and_channels_last_scores_as_eager(tmp_path):
    data = image_folder(tmp_path / "images", count=4)
    rows = {}
    for name, extra in (("eager", []), ("fast", FAST_COMPILE)):
        overrides = [*TINY_OVERRIDES, *FAST_METRICS, "data=folder", f"data.root={data}", "logger=none",
                     "explainers=[gradcam]", *extra]  # fmt: skip
        rows[name] = evaluate(compose_train(overrides, tmp_path / name, config="evaluate"))["gradcam"]
    compared = [key for key in rows["eager"] if "seconds" not in key]
    assert {"AD@15", "deletion_auc", "road_morf_probability"} <= set(compared)
    for key in compared:  # measured: AD within 0.021 points (pixels tied at the top-p threshold), the rest 4e-6;
        # a 4-image BCa interval amplifies that: complexity's bounds (values 7.99-8.00) moved by 4e-4 relative
        tolerance = {"rel": 1e-3, "abs": 1e-3} if "_ci_" in key else {"rel": 1e-4, "abs": 1e-4}
        tolerance = {"abs": 0.1} if key.startswith("AD@") else tolerance
        assert rows["fast"][key] == pytest.approx(rows["eager"][key], **tolerance), key


def test_unknown_compile_options_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['modes'\].*'mode'"):
        Acceleration(compile=True, compile_options={"modes": "max-autotune"})


def _with_random_statistics(backbone: backbones.Backbone, seed: int) -> backbones.Backbone:
    """Batch norms with statistics and affine terms far from the identity, so that a wrong fold shows."""
    generator = torch.Generator().manual_seed(seed)
    for module in backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            for tensor in (module.running_mean, module.weight, module.bias):
                tensor.data.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return backbone


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])  # BatchNorm2d; timm's BatchNormAct2d
def test_folded_batch_norms_give_the_logits_and_input_gradients_of_the_backbone_and_leave_it_alone(name):
    backbone = _with_random_statistics(backbones.create(**{**TINY_BACKBONE, "name": name}), seed=0)
    before = {key: value.clone() for key, value in backbone.state_dict().items()}
    norms = sum(isinstance(module, torch.nn.BatchNorm2d) for module in backbone.modules())
    folded = backbone.folded()
    assert folded is not None and norms > 5
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in folded.modules())
    assert sum(isinstance(module, torch.nn.BatchNorm2d) for module in backbone.modules()) == norms
    assert all(torch.equal(before[key], value) for key, value in backbone.state_dict().items())
    assert count_hooks(backbone) == 0 and not any(p.requires_grad for p in folded.parameters())

    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    results = []
    for network in (backbone, folded):
        pixels = images.clone().requires_grad_(True)
        logits = network(pixels)
        logits.logsumexp(dim=1).sum().backward()  # the masked passes' backward reaches the input
        results.append((logits.detach(), pixels.grad))
    (logits, gradient), (folded_logits, folded_gradient) = results
    assert logits.std() > 0.1  # a fold that dropped a batch norm's statistics would move these
    torch.testing.assert_close(folded_logits, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(folded_gradient, gradient, rtol=1e-4, atol=1e-6)


class ConvOutputUsedTwice(torch.nn.Module):
    """``bn(conv(x)) + conv(x)``: folding the batch norm into ``conv`` would change the second term too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc((self.bn(y) + y).mean(dim=(2, 3)))


def test_a_fold_that_would_change_the_logits_is_refused_and_batch_statistics_are_never_folded():
    model = ConvOutputUsedTwice()
    backbone = _with_random_statistics(
        backbones.Backbone(model, name="twice", default_layers=["bn"], cam_layer="bn"), 2
    )
    with pytest.warns(UserWarning, match="twice: folding its batch norms .* changes the logits"):
        assert backbone.folded() is None
    assert isinstance(backbone.model.bn, torch.nn.BatchNorm2d)

    following_train = backbones.create(**TINY_BACKBONE, train_mode=True)
    assert following_train.folded() is None  # its batch norms may use the batch's statistics


def test_training_runs_its_masked_passes_through_the_folded_copy_with_the_same_loss_and_gradients():
    """The head's loss (masked, kept-pixels and deleted-pixels passes) and gradients with the batch norms folded
    equal those without; the copy stays out of the module's state dict (checkpoints hold the head only)."""
    loss = {"kept": [0.5], "deleted": [0.15]}
    modules = []
    for fold_batch_norm in (False, True):
        torch.manual_seed(0)
        module = HeadTrainingModule(
            TINY_BACKBONE, {"name": "tame"}, loss, acceleration={"fold_batch_norm": fold_batch_norm}
        )
        _with_random_statistics(module.backbone, seed=3)
        module.setup("fit")
        modules.append(module)
    (plain, folded) = modules
    assert folded._folded_backbone[0] is not None and plain._folded_backbone[0] is None
    assert folded.state_dict().keys() == plain.state_dict().keys()

    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    results = []
    for module in modules:
        module.train()
        with torch.no_grad():
            logits, features = module.backbone.features(images, module.head.layers)
        terms, _ = module.masking_pass(images, features, logits.argmax(dim=1))
        terms["loss"].backward()
        results.append((terms, {name: p.grad for name, p in module.head.named_parameters()}))
    (terms, grads), (folded_terms, folded_grads) = results
    assert {"ce@50", "del@15"} <= terms.keys()
    for key in terms:
        torch.testing.assert_close(folded_terms[key], terms[key], rtol=1e-4, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(folded_grads[name], grads[name], rtol=1e-3, atol=1e-6)
