"""Issue #14, findings 2 and 3: a run that diverged, or had nothing to learn from or to score, fails with a
message naming the step, the term or the folder; it never writes a "best" head, an export or metrics.json
as if it had succeeded. metrics.json is strict JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from tame_lit.data import UnusableDataError
from tame_lit.evaluate import EvaluationFailed, evaluate
from tame_lit.export import ExportError, export_head
from tame_lit.io import write_json
from tame_lit.train import train
from tame_lit.training import NonFiniteTrainingError, NothingToLearnError
from tests.helpers import TINY_OVERRIDES, compose_train

RUN = [*TINY_OVERRIDES, "trainer.max_steps=4", "data.batch_size=2", "data.num_workers=0", "logger=none"]


class PoisonHead(L.Callback):
    """Put a NaN into the head after optimiser step ``step`` (a diverged update)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.head.parameters()).view(-1)[0] = float("nan")


def folder(root: Path, good: int, bad: int) -> Path:
    """``good`` readable and ``bad`` unreadable images, spread over two class folders."""
    for index in range(good + bad):
        path = root / ("a" if index % 2 else "b") / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if index < good:
            Image.new("RGB", (72, 72), (40 * index % 255, 90, 160)).save(path)
        else:
            path.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


def test_a_diverging_loss_stops_training_naming_the_step_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteTrainingError, match=r"^step \d+ \(epoch 0\): the training loss is not finite here: "):
        train(compose_train([*RUN, "optimizer.max_lr=1e12"], run))
    assert not (run / "metrics.json").exists() and not (run / "export").exists()
    assert not list(run.glob("checkpoints/*.ckpt"))


def test_a_head_that_turns_non_finite_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    every_step = ["checkpoint_every_n_steps=1"]
    poison = [
        "+callbacks.poison._target_=tests.reliability.test_no_silent_success.PoisonHead",
        "+callbacks.poison.step=3",
    ]
    with pytest.raises(NonFiniteTrainingError, match=r"a head parameter is not finite here: "):
        train(compose_train([*RUN, *every_step, *poison], run))
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2  # step 3's save was refused
    assert all(bool(value.isfinite().all()) for value in last["state_dict"].values() if value.is_floating_point())
    assert not (run / "metrics.json").exists() and not (run / "export").exists()


def test_export_refuses_a_head_with_nan_weights(checkpoint, tmp_path):
    data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    name = next(key for key, value in data["state_dict"].items() if value.is_floating_point())
    data["state_dict"][name].view(-1)[0] = float("nan")
    broken = tmp_path / "checkpoints" / "broken.ckpt"
    broken.parent.mkdir()
    torch.save(data, broken)
    with pytest.raises(ExportError, match=rf"{broken}: the head's {name.removeprefix('head.')}.* NaN or infinite"):
        export_head(broken, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_metrics_json_is_strict_json_with_null_for_undefined_values(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"gradcam": {"AD@15": math.nan, "curve": [math.inf, 0.5, -math.inf]}})

    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {
        "gradcam": {"AD@15": None, "curve": [None, 0.5, None]}
    }


def test_training_on_unusable_images_stops_naming_the_folder_and_the_count(tmp_path):
    broken, good = folder(tmp_path / "broken", 0, 4), folder(tmp_path / "good", 4, 0)
    data = ["data=folder", f"data.train_root={broken}", f"data.root={good}"]
    with pytest.raises(UnusableDataError, match=rf"^{broken}: 2 of the 2 training images read so far in epoch 0"):
        train(compose_train([*RUN, *data], tmp_path / "run"))
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt")) and not (tmp_path / "run" / "export").exists()
    # allowed to be all bad, the epoch still makes no step: nothing to learn from is never a success
    with pytest.raises(NothingToLearnError, match=rf"epoch 0 made no training step: .*\(from {broken}\)"):
        train(compose_train([*RUN, *data, "data.max_bad_fraction=1.0"], tmp_path / "allowed"))


def test_a_few_bad_training_images_are_tolerated_up_to_the_configured_share(tmp_path):
    mixed, good = folder(tmp_path / "mixed", 6, 2), folder(tmp_path / "good", 4, 0)
    data = ["data=folder", f"data.train_root={mixed}", f"data.root={good}", "data.batch_size=8"]
    with pytest.raises(UnusableDataError, match=r"2 of the 8 training images .* data.max_bad_fraction=0.1 of the 8"):
        train(compose_train([*RUN, *data], tmp_path / "strict"))
    metrics = train(compose_train([*RUN, *data, "data.max_bad_fraction=0.25"], tmp_path / "tolerant"))
    assert metrics["data/skipped_images"] == 2 and (tmp_path / "tolerant" / "export" / "head.safetensors").is_file()


def test_unusable_validation_images_fail_the_run_naming_the_folder(tmp_path):
    good, broken = folder(tmp_path / "good", 4, 0), folder(tmp_path / "broken", 0, 3)
    data = ["data=folder", f"data.train_root={good}", f"data.root={broken}"]
    with pytest.raises(NothingToLearnError, match=rf"validation scored no image: .*\(from {broken}\)"):
        train(compose_train([*RUN, *data], tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_an_evaluation_that_scored_no_image_fails_and_writes_no_scores(tmp_path):
    broken = folder(tmp_path / "broken", 0, 3)
    cfg = compose_train(
        [*TINY_OVERRIDES, "data=folder", f"data.root={broken}", "logger=none", "explainers=[gradcam]",
         "data.num_workers=0"],
        tmp_path / "run",
        config="evaluate",
    )  # fmt: skip
    expected = rf"^{broken}: no image was scored: the 3 image\(s\) of the evaluated set could not be used"
    with pytest.raises(EvaluationFailed, match=expected):
        evaluate(cfg)
    assert not (tmp_path / "run" / "metrics.json").exists()
