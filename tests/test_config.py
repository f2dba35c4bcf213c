"""One source of defaults: the configs Hydra composes carry the code's defaults, and a key no code reads (or a
value of the wrong type) stops the command line before any model is built, naming the valid keys."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tame_lit import backbones, explainers, heads
from tame_lit.acceleration import Acceleration
from tame_lit.callbacks import HeatmapGrid
from tame_lit.config import ConfigError, check_command_line, check_config, config_dir
from tame_lit.data import EmbeddedDataModule, ImageDataModule
from tame_lit.evaluation import EvaluationModule
from tame_lit.losses import MaskingLoss
from tame_lit.training import HeadTrainingModule, OptimizerConfig
from tests.helpers import TINY_OVERRIDES, compose_train, run_cli

CONF = Path(config_dir())


def code_defaults(*functions, skip=()) -> dict:
    """The keyword options of a call chain and their defaults, straight from ``inspect.signature``."""
    defaults = {}
    for function in functions:
        for param in inspect.signature(function).parameters.values():
            if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL) or param.name in skip:
                continue
            assert param.default is not param.empty, f"{function}: {param.name} has no default"
            value = param.default
            defaults.setdefault(param.name, list(value) if isinstance(value, tuple) else value)
    return defaults


def composed(overrides, tmp_path, config="train") -> dict:
    return OmegaConf.to_container(compose_train(overrides, tmp_path, config=config))


@pytest.mark.parametrize("name", sorted(heads.HEADS))
def test_each_head_config_is_the_code_defaults(name, tmp_path):
    cls = heads.HEADS[name]
    expected = {"name": name, **code_defaults(cls.from_backbone, cls, skip=("backbone", "layer_shapes", "num_classes"))}
    assert composed([f"head={name}"], tmp_path)["head"] == expected


def test_sacam_starts_from_cam_in_python_and_in_hydra(tmp_path):
    assert inspect.signature(heads.SACAMHead.from_backbone).parameters["init_from_classifier"].default is True
    assert composed(["head=sacam"], tmp_path)["head"]["init_from_classifier"] is True


def test_loss_optimizer_and_module_options_are_the_code_defaults(tmp_path):
    cfg = composed([], tmp_path)
    code = dataclasses.asdict(MaskingLoss())
    code = {key: list(value) if isinstance(value, tuple) else value for key, value in code.items()}
    assert cfg["loss"] == code  # YAML has lists where the dataclass has tuples
    assert cfg["optimizer"] == dataclasses.asdict(OptimizerConfig())
    module = code_defaults(HeadTrainingModule, skip=("backbone", "head", "loss", "optimizer", "acceleration"))
    assert {key: cfg[key] for key in module} == module
    speed = dataclasses.asdict(Acceleration())  # the module's acceleration: the top-level keys of both tasks
    resolved = OmegaConf.to_container(compose_train([], tmp_path), resolve=True)["module"]["acceleration"]
    assert {key: cfg[key] for key in speed} == speed == resolved


def test_backbone_configs_take_the_architectures_defaults(tmp_path):
    defaults = code_defaults(backbones.create, skip=("name",))
    for path in sorted((CONF / "backbone").glob("*.yaml")):
        overrides = [f"backbone={path.stem}"] + (["backbone.name=resnet18"] if path.stem == "custom" else [])
        cfg = composed(overrides, tmp_path)["backbone"]
        assert cfg.pop("name") == (path.stem if path.stem != "custom" else "resnet18")
        assert cfg == defaults  # cam_layer and layers: null, so tame_lit.backbones.ARCHITECTURES decides


def test_each_explainer_config_is_its_class_defaults(tmp_path):
    cfg = composed([], tmp_path, config="evaluate")
    assert sorted(cfg["explainer"]) == sorted(path.stem for path in (CONF / "explainer").glob("*.yaml"))
    for name, options in cfg["explainer"].items():
        cls = explainers.explainer_class(name)
        assert options == {"name": name, **code_defaults(cls, skip=("backbone",))}, name


def test_evaluate_data_and_callback_defaults_are_the_code_defaults(tmp_path):
    cfg = composed([], tmp_path, config="evaluate")
    for key in ("grid_images", "compare_to", "confidence", "resamples"):
        assert cfg[key] == inspect.signature(EvaluationModule).parameters[key].default, key
    assert cfg["compare_to"] == "gradcam"
    assert set(cfg["heads"]) == set(heads.HEADS)

    def picked(node: dict, *classes) -> dict:  # the values a YAML file sets that differ from the code
        defaults = code_defaults(*classes)
        assert set(node) - {"_target_"} == set(defaults)
        return {key: value for key, value in node.items() if key != "_target_" and value != defaults[key]}

    train = composed(["data=embedded"], tmp_path)
    assert picked(train["data"], EmbeddedDataModule, ImageDataModule) == {"batch_size": 8, "num_workers": 0}
    assert picked(composed(["data=folder"], tmp_path)["data"], ImageDataModule) == {}
    assert picked(train["callbacks"]["heatmaps"], HeatmapGrid) == {}


def test_base_momentum_reaches_the_one_cycle_schedule(tmp_path):
    cfg = compose_train([*TINY_OVERRIDES, "optimizer.base_momentum=0.8", "optimizer.max_momentum=0.9"], tmp_path)
    module = instantiate(cfg.module, _convert_="all")
    module.trainer = SimpleNamespace(estimated_stepping_batches=10)
    optimizer = module.configure_optimizers()["optimizer"]
    assert module.hparams["optimizer"]["base_momentum"] == 0.8
    assert [group["base_momentum"] for group in optimizer.param_groups] == [0.8] * len(optimizer.param_groups)
    assert [group["max_momentum"] for group in optimizer.param_groups] == [0.9] * len(optimizer.param_groups)


@pytest.fixture
def no_backbone(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a backbone was built")

    monkeypatch.setattr(backbones, "create", refuse)


def refused(capsys, config: str, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        check_command_line(config, argv)
    assert exit_info.value.code != 0
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["optimizer.max_lrr=1"], ["unknown key 'optimizer.max_lrr'", "max_lr: float", "base_momentum: float"]),
        (["+foo=1"], ["unknown key 'foo'", "the top level (TrainConfig)", "optimizer: OptimizerConfig", "seed"]),
        (["optimizer.max_lr=abc"], ["'optimizer.max_lr'", "'abc'", "Float", "momentum: float"]),
        (["+optimizer.foo=1"], ["unknown key 'optimizer.foo'", "max_lr: float"]),
        (["head=sacam", "head.variant=no_skip"], ["unknown key 'head.variant'", "init_from_classifier: bool"]),
        (["-m", "head=sacam,tame", "head.reduction=4"], ["unknown key 'head.reduction'", "variant: str"]),
        (["-m", "optimizer.max_lr=1e-3,abc"], ["'optimizer.max_lr'", "'abc'"]),
        (["+callbacks.heatmaps.colums=2"], ["unknown key 'callbacks.heatmaps.colums'", "columns: int"]),
        (["+trainer.max_epoch=2"], ["unknown key 'trainer.max_epoch'", "max_epochs"]),
    ],
)
def test_unknown_keys_and_wrong_types_stop_train_before_any_model(argv, expected, capsys, no_backbone):
    message = refused(capsys, "train", argv)
    for text in expected:
        assert text in message, message


def test_unknown_explainer_options_stop_evaluate(capsys, no_backbone):
    message = refused(capsys, "evaluate", ["explainer.rise.num_maskz=3"])
    assert "unknown key 'explainer.rise.num_maskz'" in message and "num_masks: int" in message
    message = refused(capsys, "evaluate", ["+explainer.r2={name: rise, num_maskz: 3}"])
    assert "unknown key 'explainer.r2.num_maskz'" in message and "num_masks: int" in message
    for argv in (["+heads.tame.checkpointt=p"], ["+heads.mine.checkpointt=p"]):
        assert "checkpoint: str | None" in refused(capsys, "evaluate", argv)
    # an expensive metric is off (false): its options alone are refused with how to turn it on
    message = refused(capsys, "evaluate", ["metrics.max_sensitivity.samples=3"])
    assert "'metrics.max_sensitivity={option: value, ...}' (options: radius, samples, chunk_size)" in message


@pytest.mark.parametrize(
    ("config", "argv"),
    [
        ("train", ["-m", "optimizer.max_lr=1e-3,1e-2", "head=tame,sacam", "optimizer.base_momentum=0.8"]),
        ("train", [*TINY_OVERRIDES, "hparams_search=optuna", "hydra.sweeper.n_trials=2"]),
        ("train", ["-m", "optimizer.max_lr=tag(log, interval(1e-4, 1e-1))", "hparams_search=optuna"]),
        ("train", ["+callbacks.stop._target_=tests.helpers.StopAfterStep", "+callbacks.stop.step=3"]),
        ("train", ["experiment=tame_vgg16_imagenet", "--cfg", "job"]),
        ("train", ["experiment=tame_vit_b16_imagenet", "--cfg", "job"]),
        ("train", ["-m", "experiment=tame_lite0_imagenette", "hparams_search=lite0_recipe"]),
        ("train", ["-m", "experiment=lite0_imagenette_best", "hparams_search=lite0_recipe"]),
        ("train", ["experiment=lite0_imagenette_best", "--cfg", "job"]),
        ("evaluate", ["+explainer.ge_scorecam={name: ge, base: scorecam, batch_size: 8}", "+heads.x.checkpoint=p"]),
        ("evaluate", ["comparison=lite0_imagenette", "heads.best.checkpoint=p", "--cfg", "job"]),
        ("evaluate", ["metrics.randomisation=true", "metrics.max_sensitivity={samples: 3, radius: 0.1}"]),
    ],
)
def test_valid_command_lines_pass_the_check(config, argv, no_backbone):
    check_command_line(config, argv)


@pytest.mark.parametrize("search", ["optuna", "lite0_recipe"])
def test_every_key_a_search_tunes_exists_and_the_recipe_search_never_sees_the_test_images(search, tmp_path):
    """A misspelt key in ``hydra.sweeper.params`` would only fail at the first trial (or add a key nobody reads)."""
    import yaml

    searched = yaml.safe_load((Path(config_dir()) / "hparams_search" / f"{search}.yaml").read_text())
    cfg = compose_train(["experiment=tame_lite0_imagenette", f"hparams_search={search}"], tmp_path)
    for key in searched["hydra"]["sweeper"]["params"]:
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key
    if search == "lite0_recipe":  # a validation split of imagenette/train, never imagenette/val
        assert cfg.data.holdout_per_class == 50 and cfg.optimized_metric.startswith("val/")


def test_train_checks_its_config_before_building(tmp_path, no_backbone):
    from tame_lit.train import train

    cfg = compose_train([*TINY_OVERRIDES, "+module.labelz=model"], tmp_path)
    with pytest.raises(ConfigError, match=r"unknown key 'module.labelz'[\s\S]*val_keep"):
        train(cfg)
    check_config(compose_train(TINY_OVERRIDES, tmp_path))


def test_the_command_line_fails_fast_with_the_valid_keys(tmp_path):
    result = run_cli(["optimizer.max_lrr=1"], cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    assert "unknown key 'optimizer.max_lrr'" in result.stderr and "max_lr: float" in result.stderr
    assert not (tmp_path / "outputs").exists()  # no run started


def test_the_faithfulness_comparison_scores_every_method_and_the_trained_heads(tmp_path):
    """README "Which explainer is most faithful?": a method added later must join the table."""
    from tame_lit import explainers

    cfg = compose_train(["comparison=lite0_imagenette"], tmp_path, config="evaluate")
    assert set(explainers.defined_for("spatial")) <= set(cfg.explainers)  # every method defined on a CNN
    assert {"best", "tame", "sacam"} <= set(cfg.explainers) <= {*explainers.available(), *cfg.heads}
    assert cfg.compare_to == "gradcam" and cfg.data.limit is None and cfg.data.limit_per_class is None
    assert set(cfg.subset_explainers) == {"ablationcam", "rise", "scorecam", "sise"} and cfg.subset_per_class == 10
    assert cfg.metrics.deletion.steps == 14 and list(cfg.metrics.road.levels) == [0.1, 0.3, 0.5, 0.7, 0.9]
