"""``python train.py`` / ``tame-train``: train an explanation head with Hydra, Lightning and any logger."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from tame_lit.callbacks import AtomicCheckpointIO, Preempted
from tame_lit.checkpoints import IncompatibleCheckpointError, read_checkpoint
from tame_lit.config import (
    check_command_line,
    config_dir,
    finishing,
    instantiate_group,
    metric_value,
    start_process,
    start_task,
)
from tame_lit.io import write_json

__all__ = ["main", "train"]

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured head; returns the final logged metrics (also written to ``metrics.json``)."""
    start_task(cfg)
    ckpt_path = cfg.get("ckpt_path")
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if cfg.get("auto_resume") and not ckpt_path and last.is_file():
        ckpt_path = str(last)
        log.info("auto_resume: continuing from %s", last)
    if ckpt_path:  # before any work: a missing, truncated, foreign or pickled-code file is named here
        read_checkpoint(ckpt_path)

    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module, _convert_="all")
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    if not loggers:  # Lightning refuses a LearningRateMonitor without a logger: nothing to log the rates to
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=_plugins(cfg.trainer.get("plugins"))
    )
    settings = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams({"config": settings})

    with finishing(loggers):
        try:
            if cfg.get("validate_first") and not ckpt_path:
                baseline = trainer.validate(module, datamodule=datamodule, verbose=False)
                log.info("untrained head: %s", baseline[0] if baseline else {})
            # weights_only explicitly: torch's default can be switched off by TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
            metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
            if trainer.is_global_zero:
                best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
                write_json(
                    Path(trainer.default_root_dir) / "metrics.json", {"metrics": metrics, "best_checkpoint": best}
                )
                if best:
                    log.info("best checkpoint: %s", best)
                if best and cfg.export:
                    _export(best, Path(trainer.default_root_dir) / "export", loggers)
        except SIGTERMException as error:  # Lightning exits 0 on it: a pre-empted run must not look finished
            raise Preempted(128 + signal.SIGTERM) from error
        except IncompatibleCheckpointError as error:
            raise IncompatibleCheckpointError(f"{ckpt_path}: {error}") from None
    return metrics


def _plugins(configured: Any) -> list[Any]:
    """``trainer.plugins`` (e.g. a precision plugin), plus checkpoints written atomically unless one of them
    already is a checkpoint IO of the user's."""
    plugins = instantiate(configured) if configured is not None else []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) or OmegaConf.is_list(plugins) else [plugins]
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def _export(checkpoint: str, out: Path, loggers: list) -> None:
    """Export the best head (verified), and log it as a W&B model artifact when logging to W&B."""
    from tame_lit.export import export_head

    exported = export_head(checkpoint, out)
    log.info("exported (head only, verified) to %s", exported)
    for logger in loggers:
        if isinstance(logger, L.pytorch.loggers.WandbLogger):
            import wandb

            metadata = json.loads((exported / "explainer.json").read_text())
            artifact = wandb.Artifact(f"explainer-{logger.experiment.id}", type="model", metadata=metadata)
            artifact.add_dir(str(exported))
            logger.experiment.log_artifact(artifact, aliases=["best"])


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def run(cfg: DictConfig) -> float | None:
    start_process(cfg, ("backbone", "head", "data", "loss", "optimizer", "trainer", "ckpt_path"))
    metrics = train(cfg)
    return metric_value(metrics, cfg.optimized_metric)


def main() -> float | None:
    """``python train.py`` / ``tame-train``: check the config the command line asks for (an unknown key or a
    wrong type stops here, with the valid keys), then let Hydra run it."""
    check_command_line("train")
    return run()
