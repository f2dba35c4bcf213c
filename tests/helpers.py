"""Small building blocks shared by the tests (tiny models, run helpers)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# A tiny timm CNN (random init, 10 classes) at 64 px: the whole pipeline in seconds.
TINY_BACKBONE = {"name": "test_resnet", "weights": None, "num_classes": 10, "input_size": 64}
TINY_OVERRIDES = [
    "backbone=custom",
    "backbone.name=test_resnet",
    "backbone.weights=null",
    "+backbone.num_classes=10",
    "+backbone.input_size=64",
    "data.resize_size=72",
    "data.crop_size=64",
]


class StopAfterStep(L.Callback):
    """Ask the trainer to stop after ``step`` optimiser steps (simulates an interrupted run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class SlowSteps(L.Callback):
    """Sleep ``seconds`` after each training step (a slow machine, for wall-clock limits)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


def free_port() -> int:
    """A TCP port free now on this machine, for a process group's rendezvous (port 0 would make torchrun wait)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(
    args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None, script: str = "train.py"
) -> subprocess.CompletedProcess:
    """Run ``python SCRIPT ARGS`` in ``cwd`` with no stdin (a prompt would fail instead of hanging);
    ``env`` replaces the inherited environment."""
    environment = {**(os.environ if env is None else env), "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )


def compose_train(overrides: list[str], output_dir: Path, config: str = "train"):
    """The config ``python train.py OVERRIDES`` (or ``config``.yaml's script) would run, writing to
    ``output_dir`` (for in-process runs)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tame_lit.config import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config, overrides=[*overrides, f"paths.output_dir={output_dir}"])


def read_csv_metrics(run_dir: Path) -> list[dict[str, str]]:
    import csv

    with open(run_dir / "csv" / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def masked_passes(module, loader):
    """For each batch of ``loader`` in eval mode without gradients: the clean logits, the masking loss terms
    and the masked image's logits of ``module`` (a ``HeadTrainingModule``), labels = the top-1 class."""
    module.eval()
    with torch.no_grad():
        for batch in loader:
            logits, features = module.backbone.features(batch["images"], module.head.layers)
            terms, masked = module.masking_pass(batch["images"], features, logits.argmax(dim=1))
            yield logits, terms, masked


class CountBackward(torch.autograd.Function):
    """Identity whose backward counts its calls: tells whether backward reached this point."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        CountBackward.calls += 1
        return grad


class Probe(nn.Module):
    """A point in a test network that records, through CountBackward, whether backward reached it."""

    def forward(self, x):
        return CountBackward.apply(x)
