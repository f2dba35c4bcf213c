"""``python train.py`` as users run it: default run, experiments, sweeps, DDP, W&B offline, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, TINY_OVERRIDES, free_port, run_cli


def only_run(root: Path) -> Path:
    runs = list((root / "outputs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def assert_finished(result, run_dir: Path) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert Path(metrics["best_checkpoint"]).is_file()
    exported = json.loads((run_dir / "export" / "explainer.json").read_text())  # exported and verified
    assert exported["source_checkpoint"] == str(Path(metrics["best_checkpoint"]).resolve())
    return metrics["metrics"]


@pytest.mark.real
def test_no_arguments_trains_on_the_embedded_default(tmp_path):
    result = run_cli([], cwd=tmp_path)
    run_dir = only_run(tmp_path)
    metrics = assert_finished(result, run_dir)
    assert 0 <= metrics["val/AD@15"] <= 100 and 0 <= metrics["val/masked_agreement"] <= 1
    assert sorted(p.name for p in (run_dir / "heatmaps").iterdir()) == ["epoch_000.png", "epoch_001.png"]
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["backbone"]["name"] == "efficientnet_lite0"
    assert config["data"]["_target_"] == "tame_lit.data.EmbeddedDataModule"


@pytest.mark.real
def test_imagenette_experiment_runs(tmp_path, shared_data):
    args = ["experiment=tame_lite0_imagenette", "trainer.max_steps=20", "data.batch_size=8",
            "trainer.limit_val_batches=2", f"paths.data_dir={shared_data}"]  # fmt: skip
    result = run_cli(args, cwd=tmp_path)
    run_dir = next((tmp_path / "outputs" / "tame_lite0_imagenette" / "runs").iterdir())
    metrics = assert_finished(result, run_dir)
    assert "val/AD@50" in metrics and metrics["lr-SGD/pg2"] == pytest.approx(2 * metrics["lr-SGD/pg1"])


@pytest.mark.parametrize("head", ["tame", "sacam"])
def test_ddp_with_two_cpu_processes(tmp_path, head):
    """Both heads under DDP (SA-CAM's scalar gains included); SA-CAM's run also has no logger, which must not
    trip the default LearningRateMonitor."""
    logger = "logger=none" if head == "sacam" else "logger=csv"
    args = [*TINY_OVERRIDES, f"head={head}", logger, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.precision=32-true", "trainer.max_steps=3"]  # fmt: skip
    result = run_cli(args, cwd=tmp_path)
    run_dir = only_run(tmp_path)
    metrics = assert_finished(result, run_dir)
    assert (run_dir / "train_ddp_process_1.log").is_file()  # the second rank ran
    assert (run_dir / "csv").is_dir() == (head == "tame")
    if head == "sacam":
        assert {"train/gamma/layer2", "train/gamma/layer3", "train/gamma/layer4"} <= set(metrics)


def test_a_ddp_sweep_runs_each_job_once_with_its_processes_in_its_folder(tmp_path):
    """Lightning starts a DDP job's second process with the first one's command line: in a sweep, that line
    was the whole sweep, so the second process ran every job (an Optuna sampler could give it other values) and
    wrote into a sweep folder of its own. Now each job's processes share its values and its folder, and the
    next job launches processes of its own."""
    args = ["-m", *TINY_OVERRIDES, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.precision=32-true", "trainer.max_steps=2", "export=false",
            "optimizer.max_lr=1e-3,1e-2"]  # fmt: skip
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()  # one sweep folder, not one per process
    assert sorted(path.name for path in sweep.iterdir() if path.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert (sweep / job / "train_ddp_process_1.log").is_file() and (sweep / job / "metrics.json").is_file()
    # each job's settings are printed once by each of its two processes, and no process ran the other job
    counts = (result.stderr.count("max_lr: 0.001\n"), result.stderr.count("max_lr: 0.01\n"))
    assert counts == (2, 2), result.stderr[-3000:]


def test_torchrun_processes_share_the_run_folder_given(tmp_path):
    """The README's multi-node command on one node: torchrun starts both processes (Lightning launches none),
    and with ``hydra.run.dir`` given, both write into that one folder."""
    import subprocess
    import sys

    port = free_port()  # torchrun's static rendezvous needs a real port
    run_dir = tmp_path / "run"
    args = [*TINY_OVERRIDES, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
            "trainer.max_steps=2", f"hydra.run.dir={run_dir}"]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
               f"--master-port={port}", str(ROOT / "train.py"), *args]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr  # two processes trained together
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]  # no other run folder
    assert_finished(result, run_dir)


def test_multirun_sweep_and_optuna_search(tmp_path):
    result = run_cli(["-m", *TINY_OVERRIDES, "trainer.max_steps=2", "optimizer.max_lr=1e-3,1e-2"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = next((tmp_path / "outputs" / "train" / "multiruns").iterdir())
    lrs = sorted(yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text())["optimizer"]["max_lr"]
                 for job in ("0", "1"))  # fmt: skip
    assert lrs == [1e-3, 1e-2] and all((sweep / job / "metrics.json").is_file() for job in ("0", "1"))

    args = [*TINY_OVERRIDES, "hparams_search=optuna", "hydra.sweeper.n_trials=2", "trainer.max_steps=2",
            "hydra.sweeper.sampler.n_startup_trials=1", f"hydra.sweep.dir={tmp_path / 'optuna'}"]  # fmt: skip
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = yaml.safe_load((tmp_path / "optuna" / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"optimizer.max_lr", "loss.area", "loss.variation"}
    assert 0 <= results["best_value"] <= 100


def test_wandb_logs_offline_without_a_login_or_a_prompt(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env["HOME"] = str(tmp_path / "home")  # no ~/.netrc: not logged in
    result = run_cli([*TINY_OVERRIDES, "logger=wandb"], cwd=tmp_path, env=env, timeout=300)
    run_dir = only_run(tmp_path)
    assert_finished(result, run_dir)
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    logged = next(offline.glob("run-*.wandb")).read_bytes()
    for key in (b"train/loss", b"val/AD@15", b"val/IC@50", b"lr-SGD/pg1", b"max_lr"):
        assert key in logged, key
    assert len(list((offline / "files" / "media" / "images").rglob("heatmaps_*.png"))) == 2  # one per epoch
    assert b"explainer-" in logged and b"head.safetensors" in logged  # the export, as a model artifact


def test_bad_input_fails_with_a_message_naming_it(tmp_path):
    result = run_cli([*TINY_OVERRIDES, "data=folder", f"data.train_root={tmp_path / 'no_such_dir'}"], cwd=tmp_path)
    assert result.returncode != 0 and "no_such_dir" in result.stderr
    result = run_cli([*TINY_OVERRIDES, "backbone.layers=[layer2,layer99]"], cwd=tmp_path)
    assert result.returncode != 0
    assert "unknown layer name(s) ['layer99']" in result.stderr and "layer4" in result.stderr
