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
    for key in compared:  # measured: AD within 0.021 points (pixels tied at the top-p threshold), the rest 4e-6
        tolerance = {"abs": 0.1} if key.startswith("AD@") else {"rel": 1e-4, "abs": 1e-4}
        assert rows["fast"][key] == pytest.approx(rows["eager"][key], **tolerance), key


def test_unknown_compile_options_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['modes'\].*'mode'"):
        Acceleration(compile=True, compile_options={"modes": "max-autotune"})
