"""Lightning callbacks and plugins of tame-lit: the heatmap grid, saving on a pre-emption signal, atomic
checkpoint writes."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tame_lit.data import imagenet_class_names
from tame_lit.io import atomic_path
from tame_lit.viz import overlay_grid, save_figure

__all__ = ["AtomicCheckpointIO", "HeatmapGrid", "Preempted", "RunCheckpoint", "SaveOnSignal"]


class Preempted(SystemExit):
    """The run was asked to stop by a signal and saved ``last.ckpt`` first; the exit code is 128 + the signal
    number (143 for SIGTERM), as if the signal had killed it, so a scheduler sees an interrupted job."""


class SaveOnSignal(L.Callback):
    """On SIGTERM or SIGUSR1 (a scheduler's pre-emption notice, SLURM's ``--signal``), finish the current
    training step, save ``<dirpath>/last.ckpt`` (atomically, with the loop and optimiser state, mid-epoch
    too) and stop with ``Preempted``. Rerun the same command with ``auto_resume=true`` to continue.

    The handlers are installed only while training, and the previous ones restored after. Under DDP the
    processes agree before saving (any process signalled stops all of them at the same step)."""

    def __init__(self, dirpath: str, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")) -> None:
        self.dirpath = Path(dirpath)
        self.signals = [signal.Signals[name] for name in signals if hasattr(signal, name)]
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _notice(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # not on_fit_start: Lightning installs its own handlers after that hook and restores what it found at
        # teardown, which would leave ours installed (a SIGTERM after training would only be noted)
        self.received = None
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._notice)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning's own SIGTERM handler may act first: it stops between two steps with SIGTERMException
        # (exit code 0 unless the task turns it into Preempted); the loop state is whole there, so save it
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.dirpath / "last.ckpt")
        self._restore()

    def _restore(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        number = self.received or signal.SIGTERM  # another process was signalled
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        raise Preempted(128 + int(number))


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, never pointing at another run's files. Resumed into a new folder,
    Lightning keeps the old run's ``best_model_path`` (and only it), so the export after training would read
    the other run's file, or fail when it is gone; here the best is chosen afresh among this run's
    checkpoints (the same folder keeps everything, as in Lightning)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        moved = state_dict.get("dirpath", self.dirpath) != self.dirpath
        if moved:  # Lightning warns about the rest; the best path is the one it would keep
            state_dict = {**state_dict, "best_model_path": ""}
        super().load_state_dict(state_dict)


class HeatmapGrid(L.Callback):
    """Each validation epoch, explain the first ``num_images`` validation images with the head being
    trained, save the overlay grid under ``<run>/heatmaps/`` and send it to the image-capable loggers
    (W&B, TensorBoard)."""

    def __init__(self, num_images: int = 8, columns: int = 4, dirname: str = "heatmaps") -> None:
        self.num_images = num_images
        self.columns = columns
        self.dirname = dirname
        self.last_path: Path | None = None

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        images = batch["images"][: self.num_images]
        if images.shape[0] == 0:
            return
        with torch.no_grad():
            maps = pl_module.explain(images)
            probs, classes = pl_module.backbone(images).float().softmax(dim=1).max(dim=1)
        names = imagenet_class_names() if pl_module.backbone.num_classes == 1000 else None
        titles = [f"{names[c] if names else c}: {p:.2f}" for c, p in zip(classes.tolist(), probs.tolist(), strict=True)]
        figure = overlay_grid(images.cpu(), maps.cpu(), titles, columns=self.columns)
        path = Path(trainer.default_root_dir) / self.dirname / f"epoch_{trainer.current_epoch:03d}.png"
        save_figure(figure, path)
        self.last_path = path
        for logger in trainer.loggers:
            if isinstance(logger, L.pytorch.loggers.WandbLogger):
                logger.log_image(key="val/heatmaps", images=[str(path)], step=trainer.global_step)
            elif isinstance(logger, L.pytorch.loggers.TensorBoardLogger):
                import numpy as np
                from PIL import Image

                pixels = np.asarray(Image.open(path).convert("RGB"))
                logger.experiment.add_image("val/heatmaps", pixels, trainer.global_step, dataformats="HWC")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomic: each checkpoint goes to a temporary file in its own folder, then
    replaces the old one by a rename, so a kill during a save leaves the previous checkpoint intact and no
    temporary file elsewhere (Lightning's own writer overwrites the file in place). A temporary file that a
    killed save left behind is removed by the next save of the same checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        for stale in path.parent.glob(f".{path.name}.*{path.suffix}"):
            stale.unlink(missing_ok=True)
        with atomic_path(path) as temporary, open(temporary, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename makes it the checkpoint
