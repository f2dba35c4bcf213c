"""``python evaluate.py`` / ``tame-evaluate``: score trained heads and classic explainers on one dataset."""

from __future__ import annotations

import datetime
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tame_lit import __version__, backbones, explainers
from tame_lit.acceleration import Acceleration
from tame_lit.config import check_command_line, config_dir, finishing, instantiate_group, start_process, start_task
from tame_lit.evaluation import EvaluationModule, NothingScoredError
from tame_lit.explainers import Explainer
from tame_lit.heads.base import EXPLANATIONS, check_smoothing
from tame_lit.loading import EXPLAINER_SUFFIXES, describe, load_explainer
from tame_lit.report import print_table, write_report

__all__ = ["EvaluationFailed", "build_explainers", "evaluate", "main", "trained_head_settings"]

log = logging.getLogger(__name__)

# the data settings that decide which images were scored and how (run.json, report.md)
DATA_KEYS_TO_CITE = (
    "root",
    "list_file",
    "limit",
    "limit_per_class",
    "holdout_per_class",
    "boxes_dir",
    "resize_size",
    "crop_size",
    "class_index",
    "num_shards",
    "shard",
)


class EvaluationFailed(RuntimeError):
    """Some explainers could not be built or failed mid-run (the others' results were written), or no image
    could be scored at all (nothing written)."""


def trained_head_settings(path: str | Path) -> dict[str, Any]:
    """What a report needs to tell trained heads apart (an ablation table of variants): the file, the head,
    its layers and options, and how long it trained (``tame_lit.loading.describe``, for every kind of file)."""
    return describe(path)


def build_explainers(
    cfg: DictConfig, backbone: backbones.Backbone
) -> tuple[dict[str, Explainer], dict[str, dict[str, Any]], dict[str, str]]:
    """The explainers named in ``cfg.explainers``: ``(explainers, their settings, failures)``.

    A name is a trained head under ``cfg.heads`` (a checkpoint, export folder, ``explainer.pt2`` or
    ``explainer.onnx``), an entry of ``cfg.explainer`` (a registered method with its options), or such a
    path. Trained explainers are checked against ``backbone`` (``tame_lit.load_explainer``). A name that
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
                built[name] = load_explainer(
                    head.checkpoint,
                    backbone=backbone,
                    trusted=bool(head.get("trusted")),
                    program_sha256=head.get("sha256"),
                )
                settings[name] = trained_head_settings(head.checkpoint)
                settings[name].update(_read_with(built[name], name, head.get("explanation"), head.get("smoothing")))
            elif head is not None:
                raise ValueError(
                    f"explainer {name!r} is a trained head: give its checkpoint, heads.{name}.checkpoint=PATH"
                )
            elif name in methods:
                options = OmegaConf.to_container(methods[name], resolve=True)
                method = options.pop("name", name)
                built[name] = explainers.create(method, backbone, **options)
                settings[name] = {"name": method, **options}
            elif name.endswith(EXPLAINER_SUFFIXES) or Path(name).is_file() or Path(name).is_dir():
                built[name] = load_explainer(name, backbone=backbone)
                settings[name] = trained_head_settings(name)
            else:
                raise ValueError(
                    f"unknown explainer {name!r}; available: {explainers.available()}, trained heads "
                    f"{sorted(heads)} (with heads.<name>.checkpoint=PATH), or a path to a .ckpt, export folder, "
                    "explainer.pt2 or explainer.onnx"
                )
        except (ValueError, TypeError, KeyError, FileNotFoundError) as error:  # IncompatibleCheckpointError too
            failures[name] = f"{type(error).__name__}: {error}"
            log.error("explainer %r: %s", name, error)
    return built, settings, failures


def _read_with(explainer: Explainer, name: str, explanation: str | None, smoothing: float | None) -> dict[str, Any]:
    """Score a trained head's maps read another way (``heads.<name>.explanation`` / ``.smoothing``): the same
    weights, e.g. ``logits`` and ``mask``, or several blurs, side by side. Returns the settings changed."""
    asked = {"explanation": explanation, "smoothing": smoothing}
    changed = {key: value for key, value in asked.items() if value is not None}
    if not changed:
        return changed
    head = getattr(explainer, "head", None)
    if head is None or not hasattr(head, "explanation"):
        raise ValueError(
            f"heads.{name}.{next(iter(changed))} needs a checkpoint or export folder: {type(explainer).__name__} "
            "(explainer.pt2 / explainer.onnx) has its maps compiled in"
        )
    if explanation is not None and explanation not in EXPLANATIONS:
        raise ValueError(f"heads.{name}.explanation must be one of {list(EXPLANATIONS)}, got {explanation!r}")
    if smoothing is not None:
        try:
            smoothing = check_smoothing(smoothing)
        except ValueError as error:
            raise ValueError(f"heads.{name}.smoothing: {error}") from None
        head.smoothing = changed["smoothing"] = smoothing
    if explanation is not None:
        head.explanation = explanation
    return changed


def evaluate(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Run the evaluation described by ``cfg``; returns ``{explainer: {metric: value}}`` and writes the
    outputs (metrics.json/csv, curves.json, plots, report.md) into the run directory. Raises
    ``EvaluationFailed`` after writing when some explainers could not be evaluated."""
    start_task(cfg)
    backbone = backbones.create(**OmegaConf.to_container(cfg.backbone, resolve=True))
    built, settings, failures = build_explainers(cfg, backbone)
    speed = Acceleration(cfg.compile, cfg.channels_last, OmegaConf.to_container(cfg.compile_options, resolve=True))
    explainers.accelerate_explainers(speed, built.values())
    datamodule = instantiate(cfg.data)
    subsets = _subsets(cfg, datamodule, settings)
    metric_options = OmegaConf.to_container(cfg.metrics, resolve=True)
    shared = {"seed": cfg.seed}
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=[], inference_mode=False, enable_checkpointing=False
    )
    run_dir = Path(trainer.default_root_dir)
    results: dict[str, dict[str, float]] = {}
    module = None
    with finishing(loggers):
        if built:
            module = EvaluationModule(
                backbone, built, metric_options, shared, grid_images=int(cfg.grid_images), compare_to=cfg.compare_to,
                confidence=float(cfg.confidence), resamples=int(cfg.resamples), subsets=subsets,
            )  # fmt: skip
            try:
                trainer.test(module, datamodule=datamodule, verbose=False)
            except NothingScoredError as error:
                source = datamodule.source("eval") if hasattr(datamodule, "source") else "the evaluated set"
                raise EvaluationFailed(f"{source}: {error}") from None
            results = module.results
            failures.update(module.summary["failed"])
        if trainer.is_global_zero:
            _write_outputs(cfg, trainer, datamodule, module, backbone, settings, failures)
            if results:
                print_table(
                    results, module.columns, f"{backbone.name}: {len(results)} explainers",
                    module.summary.get("statistics"),
                )  # fmt: skip
            log.info("evaluation written to %s", run_dir.resolve())
            _log_results(loggers, results, module, run_dir)
    if failures:
        raise EvaluationFailed(
            "could not evaluate "
            + "; ".join(f"{name}: {error}" for name, error in failures.items())
            + f". The other explainers' results are in {run_dir.resolve()}"
        )
    return results


def _subsets(cfg: DictConfig, datamodule: Any, settings: dict[str, dict[str, Any]]) -> dict[str, list[int]]:
    """The dataset indices each explainer of ``subset_explainers`` scores when ``subset_per_class`` is set
    (checked before any image is explained), recorded in its settings for run.json and report.md."""
    names = [str(name) for name in cfg.explainers]
    slow = [str(name) for name in cfg.get("subset_explainers") or []]
    known = {*names, *(cfg.get("explainer") or {}), *(cfg.get("heads") or {})}
    unknown = sorted(set(slow) - known)
    if unknown:
        raise ValueError(f"subset_explainers names {unknown}, which are neither explainers nor configured methods "
                         f"or heads; known: {sorted(known)}")  # fmt: skip
    count = cfg.get("subset_per_class")
    if count is None:
        return {}
    indices = datamodule.eval_indices_per_class(count, key="subset_per_class")
    subsets = {name: indices for name in names if name in slow}
    for name in subsets:
        if name in settings:
            settings[name]["subset_per_class"] = int(count)
    return subsets


def _write_outputs(cfg, trainer, datamodule, module, backbone, settings, failures) -> None:
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
        "data": _cited_data(data_cfg),
        "images": images,
        "precision": str(trainer.precision),
        "processes": trainer.world_size,
        "explainers": settings,
        "metrics": {
            "options": OmegaConf.to_container(cfg.metrics, resolve=True),
            # what the options resolved to (e.g. metrics.deletion.steps replaces step: the step applied)
            "applied": {name: applied for name, applied in module.metric_settings.items() if applied}
            if module is not None
            else {},
            "seed": cfg.seed,
        },
    }
    images, predictions, probabilities, maps = module.grid.selected() if module is not None else ([], [], [], {})
    names = _class_names(backbone, datamodule)
    titles = [f"{names[c] if names else c}: {p:.2f}" for c, p in zip(predictions, probabilities, strict=True)]
    write_report(
        trainer.default_root_dir,
        module.results if module else {},
        module.columns if module else [],
        module.curves if module else {},
        summary,
        meta,
        images,
        maps or None,
        titles,
        module.per_image if module else None,
    )


def _cited_data(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The data settings that decide which images were scored: with a holdout, the training folder (or list)
    the held-out images come from, not the ignored ``root``."""
    cited = {k: v for k, v in data_cfg.items() if k in DATA_KEYS_TO_CITE}
    if data_cfg.get("holdout_per_class") is not None:
        cited.pop("root", None)
        cited.pop("list_file", None)
        cited.update({k: data_cfg.get(k) for k in ("train_root", "train_list") if data_cfg.get(k) is not None})
    return {"name": str(data_cfg.get("_target_", "")).rsplit(".", 1)[-1], **cited}


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

            present = {key for row in results.values() for key in row}
            known = [c.key for c in module.columns]
            keys = [key for key in known if key in present] + sorted(present - set(known))
            rows = [[name, *[row.get(key) for key in keys]] for name, row in results.items()]
            logger.log_table("evaluation/metrics", columns=["explainer", *keys], data=rows)
            figures: dict[str, dict[str, dict]] = {}  # figure -> line label -> curve
            for name, curves in module.curves.items():
                for curve in curves.values():
                    figures.setdefault(curve["figure"], {})[f"{name} {curve['label']}".strip()] = curve
            for image in ["heatmaps", *figures]:
                if (run_dir / f"{image}.png").is_file():
                    logger.log_image(f"evaluation/{image}", images=[str(run_dir / f"{image}.png")])
            for figure, lines in figures.items():
                first = next(iter(lines.values()))
                plot = wandb.plot.line_series(
                    xs=first["x"], ys=[c["y"] for c in lines.values()], keys=list(lines), title=first["title"],
                    xname=first["x_label"],
                )  # fmt: skip
                logger.experiment.log({f"evaluation/{figure}_curve": plot})
        logger.save()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="evaluate")
def run(cfg: DictConfig) -> None:
    start_process(cfg, ("backbone", "data", "explainers", "heads", "metrics", "trainer"))
    evaluate(cfg)


def main() -> None:
    """``python evaluate.py`` / ``tame-evaluate``: check the config the command line asks for (an unknown key or
    a wrong type stops here, with the valid keys), then let Hydra run it."""
    check_command_line("evaluate")
    run()
