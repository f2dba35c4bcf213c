"""Issue #14, finding 5: a run killed at any step and resumed ends with the head of the uninterrupted run
(the training order, the augmentations and the loop state are all restored, mid-epoch included); a resume
never points at another run's files, and settings that cannot change on resume are refused by name."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import Dataset

from tame_lit.checkpoints import IncompatibleCheckpointError
from tame_lit.data import ResumableLoader, SeededItems, ShuffledSampler
from tame_lit.train import train
from tests.helpers import ROOT, TINY_OVERRIDES, compose_train

# 88 embedded training images at 8 a batch: 11 steps an epoch, so 14 steps cross into the second epoch
RUN = [*TINY_OVERRIDES, "data.batch_size=8", "data.num_workers=0", "logger=none", "callbacks.heatmaps=null",
       "trainer.max_steps=14", "checkpoint_every_n_steps=1", "export=false"]  # fmt: skip


class RandomItems(Dataset):
    """Item ``i`` is ``(i, a draw from torch's global generator)``: the draw stands for a random augmentation."""

    def __len__(self) -> int:
        return 23

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, torch.rand(2)


def loader(seed: int = 3, batch_size: int = 4, workers: int = 0) -> ResumableLoader:
    items = RandomItems()
    sampler = ShuffledSampler(items, seed=seed, num_replicas=1, rank=0)
    return ResumableLoader(SeededItems(items), batch_size=batch_size, sampler=sampler, num_workers=workers)


def epochs(source: ResumableLoader, count: int, first: int = 0) -> list[list]:
    """``count`` epochs of ``source`` from epoch ``first``, each a list of batches (index lists, draws)."""
    out = []
    for epoch in range(first, first + count):
        source.sampler.set_epoch(epoch)
        out.append([(indices.tolist(), draws) for indices, draws in source])
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_resumes_mid_epoch_in_the_same_order_with_the_same_augmentations(workers):
    reference = epochs(loader(workers=workers), 2)
    assert reference[0] != reference[1]  # a new order and new draws each epoch
    interrupted = loader(workers=workers)
    interrupted.sampler.set_epoch(1)
    first = [(indices.tolist(), draws) for _, (indices, draws) in zip(range(2), interrupted, strict=False)]
    state = interrupted.position()
    assert state["epoch"] == 1 and state["batches"] == 2

    resumed = loader(seed=99, workers=workers)  # the saved seed wins over the new run's
    resumed.resume_from(state)
    rest = [(indices.tolist(), draws) for indices, draws in resumed]
    for (indices, draws), (expected_indices, expected_draws) in zip(first + rest, reference[1], strict=True):
        assert indices == expected_indices
        torch.testing.assert_close(draws, expected_draws, rtol=0, atol=0)
    resumed.sampler.set_epoch(2)  # and the epochs after go on as they would have
    assert [batch[0].tolist() for batch in resumed] == [batch[0] for batch in epochs(loader(), 1, first=2)[0]]


def test_a_checkpoint_at_an_epochs_end_resumes_at_the_next_epoch():
    finished = loader()
    finished.sampler.set_epoch(0)
    list(finished)
    resumed = loader()
    resumed.resume_from(finished.position())
    assert [batch[0].tolist() for batch in resumed] == [batch[0] for batch in epochs(loader(), 1, first=1)[0]]


def test_a_changed_batch_size_cannot_continue_the_epoch_and_is_named():
    interrupted = loader(batch_size=4)
    next(iter(interrupted))
    with pytest.raises(ValueError, match=r"batch_size 4 -> 5.*data\.batch_size"):
        loader(batch_size=5).resume_from(interrupted.position())


class KillMidStep(L.Callback):
    """SIGKILL this process in the middle of optimiser step ``step`` (after its backward, before its update)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def last_head(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 14
    return {key: value for key, value in state["state_dict"].items() if key.startswith("head.")}


def test_a_run_killed_at_a_random_step_and_resumed_ends_with_the_uninterrupted_head(tmp_path):
    step = random.Random().choice([s for s in range(2, 14) if s != 11])  # any step but an epoch's end
    reference = tmp_path / "reference"
    train(compose_train(RUN, reference))

    run = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), *RUN, f"hydra.run.dir={run}"]
    kill = [f"+callbacks.kill._target_={__name__}.KillMidStep", f"+callbacks.kill.step={step}"]
    killed = subprocess.run([*command, *kill], cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, f"step {step}: {killed.stderr[-3000:]}"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step

    resumed = subprocess.run([*command, "auto_resume=true"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, f"step {step}: {resumed.stderr[-3000:]}"
    expected, actual = last_head(reference), last_head(run)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=f"{key}, killed at {step}")


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """The last.ckpt of a 14-step run stopped after 6 steps, having validated (and saved a best) at step 3."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    stop = ["+callbacks.stop._target_=tests.helpers.StopAfterStep", "+callbacks.stop.step=6"]
    train(compose_train([*RUN, *stop, "trainer.val_check_interval=3"], run))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    return run / "checkpoints" / "last.ckpt"


def test_resuming_into_a_new_folder_never_points_at_the_old_runs_files(stopped_run, tmp_path):
    old_best = list(stopped_run.parent.glob("epoch_*.ckpt"))
    assert old_best
    for path in old_best:  # the old run's best is gone (or belongs to someone else): it must not be read
        path.unlink()
    run = tmp_path / "new"
    train(compose_train([*RUN, "trainer.val_check_interval=3", "export=true", f"ckpt_path={stopped_run}"], run))
    assert list((run / "checkpoints").glob("epoch_*.ckpt"))  # its own best, exported
    assert (run / "export" / "head.safetensors").is_file()


def test_a_rerun_in_the_same_folder_replaces_last_ckpt_instead_of_adding_a_versioned_copy(tmp_path):
    run = tmp_path / "run"
    for steps in (2, 3):
        train(compose_train([*RUN, f"trainer.max_steps={steps}", "checkpoint_every_n_steps=0"], run))
    names = sorted(path.name for path in (run / "checkpoints").iterdir())
    assert "last.ckpt" in names and not [name for name in names if "-v" in name], names
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optimizer.max_lr=0.5", r"optimizer\.max_lr: 0\.001 in the checkpoint, 0\.5 now"),
        ("trainer.max_steps=20", r"schedule is 14 steps long, this run's would be 20 \(trainer\.max_steps"),
    ],
)
def test_settings_that_cannot_change_on_resume_are_refused_by_name(stopped_run, tmp_path, override, named):
    before = stopped_run.read_bytes()
    with pytest.raises(IncompatibleCheckpointError, match=rf"^{stopped_run}: .*{named}"):
        train(compose_train([*RUN, f"ckpt_path={stopped_run}", override], tmp_path / "run"))
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt")) and stopped_run.read_bytes() == before
