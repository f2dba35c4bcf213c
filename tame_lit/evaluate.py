"""``python evaluate.py`` / ``tame-evaluate``: score trained heads and classic explainers on one dataset."""

from __future__ import annotations

import datetime
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tame_lit import __version__, backbones, explainers
from tame_lit.config import config_dir, instantiate_group, print_config
from tame_lit.evaluation import EvaluationModule, MetricSettings
from tame_lit.explainers import Explainer, load_explainer
from tame_lit.explainers.head import read_checkpoint
from tame_lit.report import print_table, write_report
from tame_lit.system import keep_freed_memory

__all__ = ["EvaluationFailed", "build_explainers", "evaluate", "main", "trained_head_settings"]

log = logging.getLogger(__name__)

# the data settings that decide which images were scored and how (run.json, report.md)
DATA_KEYS_TO_CITE = (
    "root",
    "list_file",
    "limit",
    "limit_per_class",
    "boxes_dir",
    "resize_size",
    "crop_size",
    "class_index",
)


class EvaluationFailed(RuntimeError):
    """Some explainers could not be built or failed mid-run; the others' results were written."""


def trained_head_settings(path: str | Path) -> dict[str, Any]:
    """What a report needs to tell trained heads apart (an ablation table of variants): the file, the head,
    its layers and options, and how long it trained. Export folders carry the same from their checkpoint."""
    path = Path(path).resolve()
    settings: dict[str, Any] = {"checkpoint": str(path)}
    if path.is_dir() or path.name == "explainer.json":
        meta = json.loads((path if path.is_file() else path / "explainer.json").read_text())
        head = dict(meta.get("head", {}))
        settings.update(head=head.pop("name", None), **head)
    elif path.suffix == ".ckpt":
        checkpoint = read_checkpoint(path)
        saved = checkpoint["tame_lit"]
        settings.update(
            head=saved.get("head"),
            layers=list(saved.get("layer_shapes", {})),
            **saved.get("head_options", {}),
            epoch=checkpoint.get("epoch"),
            step=checkpoint.get("global_step"),
        )
    return settings


def build_explainers(
    cfg: DictConfig, backbone: backbones.Backbone
) -> tuple[dict[str, Explainer], dict[str, dict[str, Any]], dict[str, str]]:
    """The explainers named in ``cfg.explainers``: ``(explainers, their settings, failures)``.

    A name is a trained head under ``cfg.heads`` (a checkpoint or export folder), an entry of
    ``cfg.explainer`` (a registered method with its options), or a checkpoint / export path. A name that
    cannot be built is recorded as a failure with the reason, so the others still run.
    """
    names = cfg.get("explainers")
    if isinstance(names, str):
        names = [names]
    if not names:
        raise ValueError(f"explainers is empty: list some, e.g. explainers=[gradcam,scorecam]; available: "
                         f"{explainers.available()}")  # fmt: skip
    duplicates = sorted({str(n) for n in names if list(names).count(n) > 1})
    if duplicates:
        raise ValueError(f"explainers lists {duplicates} more than once")
    heads = cfg.get("heads") or {}
    methods = cfg.get("explainer") or {}
    built: dict[str, Explainer] = {}
    settings: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    for name in map(str, names):
        try:
            head = heads.get(name)
            if head is not None and head.get("checkpoint"):
                built[name] = load_explainer(head.checkpoint, backbone=backbone)
                settings[name] = trained_head_settings(head.checkpoint)
            elif head is not None:
                raise ValueError(
                    f"explainer {name!r} is a trained head: give its checkpoint, heads.{name}.checkpoint=PATH"
                )
            elif name in methods:
                options = OmegaConf.to_container(methods[name], resolve=True)
                method = options.pop("name", name)
                built[name] = explainers.create(method, backbone, **options)
                settings[name] = {"name": method, **options}
            elif name.endswith(".ckpt") or Path(name).is_file() or Path(name).is_dir():
                built[name] = load_explainer(name, backbone=backbone)
                settings[name] = trained_head_settings(name)
            else:
                raise ValueError(
                    f"unknown explainer {name!r}; available: {explainers.available()}, trained heads "
                    f"{sorted(heads)} (with heads.<name>.checkpoint=PATH), or a checkpoint path"
                )
        except (ValueError, TypeError, KeyError, FileNotFoundError) as error:  # IncompatibleCheckpointError too
            failures[name] = f"{type(error).__name__}: {error}"
            log.error("explainer %r: %s", name, error)
    return built, settings, failures


def evaluate(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Run the evaluation described by ``cfg``; returns ``{explainer: {metric: value}}`` and writes the
    outputs (metrics.json/csv, curves.json, plots, report.md) into the run directory. Raises
    ``EvaluationFailed`` after writing when some explainers could not be evaluated."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if cfg.get("float32_matmul_precision"):
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    backbone = backbones.create(**OmegaConf.to_container(cfg.backbone, resolve=True))
    built, settings, failures = build_explainers(cfg, backbone)
    datamodule = instantiate(cfg.data)
    metric_settings = MetricSettings(**OmegaConf.to_container(cfg.metrics, resolve=True))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=[], inference_mode=False, enable_checkpointing=False
    )
    run_dir = Path(trainer.default_root_dir)
    results: dict[str, dict[str, float]] = {}
    try:
        module = None
        if built:
            module = EvaluationModule(backbone, built, metric_settings, grid_images=int(cfg.get("grid_images", 8)))
            trainer.test(module, datamodule=datamodule, verbose=False)
            results = module.results
            failures.update(module.summary["failed"])
        if trainer.is_global_zero:
            _write_outputs(cfg, trainer, datamodule, module, backbone, settings, failures, metric_settings)
            if results:
                print_table(results, f"{backbone.name}: {len(results)} explainers")
            log.info("evaluation written to %s", run_dir.resolve())
            _log_results(loggers, results, module, run_dir)
    finally:
        if any(isinstance(logger, L.pytorch.loggers.WandbLogger) for logger in loggers):
            import wandb

            wandb.finish()
    if failures:
        raise EvaluationFailed(
            "could not evaluate "
            + "; ".join(f"{name}: {error}" for name, error in failures.items())
            + f". The other explainers' results are in {run_dir.resolve()}"
        )
    return results


def _write_outputs(cfg, trainer, datamodule, module, backbone, settings, failures, metric_settings) -> None:
    summary = dict(module.summary) if module is not None else {}
    summary["failed"] = dict(failures)
    images = int(max((row.get("images", 0) for row in module.results.values()), default=0)) if module else 0
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "version": __version__,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "backbone": {
            "name": backbone.name,
            "weights": backbone.weights_source,
            "fingerprint": backbone.fingerprint(),
            "cam_layer": backbone.cam_layer,
        },
        "data": {
            "name": str(data_cfg.get("_target_", "")).rsplit(".", 1)[-1],
            **{k: v for k, v in data_cfg.items() if k in DATA_KEYS_TO_CITE},
        },
        "images": images,
        "precision": str(trainer.precision),
        "processes": trainer.world_size,
        "explainers": settings,
        "metrics": OmegaConf.to_container(cfg.metrics, resolve=True),
    }
    grid = module.grid if module is not None else None
    titles = []
    if grid is not None:
        names = _class_names(backbone, datamodule)
        titles = [
            f"{names[c] if names else c}: {p:.2f}" for c, p in zip(grid.predictions, grid.probabilities, strict=True)
        ]
    write_report(
        trainer.default_root_dir,
        module.results if module else {},
        module.curves if module else {},
        summary,
        meta,
        grid.images if grid else (),
        grid.maps if grid else None,
        titles,
    )


def _class_names(backbone: backbones.Backbone, datamodule: Any) -> list[str] | None:
    if backbone.num_classes == 1000:
        from tame_lit.data import imagenet_class_names

        return imagenet_class_names()
    names = getattr(datamodule, "class_names", None)
    return names if names and len(names) == backbone.num_classes else None


def _log_results(loggers: list, results: Mapping[str, Mapping[str, float]], module: Any, run_dir: Path) -> None:
    """Scores to every logger; with W&B also the table, the plots and the curves."""
    if not results:
        return
    flat = {f"{name}/{key}": value for name, row in results.items() for key, value in row.items()}
    for logger in loggers:
        logger.log_metrics(flat)
        if isinstance(logger, L.pytorch.loggers.WandbLogger):
            import wandb

            keys = sorted({key for row in results.values() for key in row})
            rows = [[name, *[row.get(key) for key in keys]] for name, row in results.items()]
            logger.log_table("evaluation/metrics", columns=["explainer", *keys], data=rows)
            for image in ("heatmaps.png", "deletion.png", "insertion.png", "road.png"):
                if (run_dir / image).is_file():
                    logger.log_image(f"evaluation/{image[:-4]}", images=[str(run_dir / image)])
            series = {
                "deletion": ("deletion_insertion", "fraction"),
                "insertion": ("deletion_insertion", "fraction"),
                "road_morf": ("road_morf", "removed"),
                "road_lerf": ("road_lerf", "removed"),
            }
            for title, (curve, x_key) in series.items():
                named = {name: c[curve] for name, c in module.curves.items() if curve in c}
                if not named:
                    continue
                y_key = title if curve == "deletion_insertion" else "accuracy"
                plot = wandb.plot.line_series(
                    xs=next(iter(named.values()))[x_key],
                    ys=[c[y_key] for c in named.values()],
                    keys=list(named),
                    title=title,
                    xname=x_key,
                )
                logger.experiment.log({f"evaluation/{title}_curve": plot})
        logger.save()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    if cfg.get("keep_freed_memory", True):
        keep_freed_memory()
    print_config(cfg, keys=("backbone", "data", "explainers", "heads", "metrics", "trainer"))
    evaluate(cfg)
