"""Issue #14, finding 6: interruptions lose at most a few steps. last.ckpt is written mid-epoch every
``checkpoint_every_n_steps``; SIGTERM saves it and exits non-zero; ``auto_resume=true`` continues from it;
every checkpoint write is atomic."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from tame_lit.callbacks import AtomicCheckpointIO
from tame_lit.train import train
from tests.helpers import ROOT, TINY_OVERRIDES, compose_train

RUN = [*TINY_OVERRIDES, "data.batch_size=2", "data.num_workers=0", "logger=none", "callbacks.heatmaps=null"]


class RecordLastCheckpoint(L.Callback):
    """Before each step, the step that ``last`` (a last.ckpt) holds (-1 before the first save), written to
    ``out`` as JSON when training ends."""

    def __init__(self, last: str, out: str) -> None:
        self.last, self.out, self.seen = Path(last), Path(out), {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        saved = torch.load(self.last, weights_only=True)["global_step"] if self.last.is_file() else -1
        self.seen[trainer.global_step] = saved

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.write_text(json.dumps(self.seen))


class AnnounceStep(L.Callback):
    """Write ``path`` once ``step`` steps are done, then make every step slow (time to send a signal)."""

    def __init__(self, path: str, step: int) -> None:
        self.path, self.step = Path(path), step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            self.path.write_text(str(trainer.global_step))
            time.sleep(0.5)


def test_last_checkpoint_is_written_mid_epoch_every_n_steps(tmp_path):
    run, seen = tmp_path / "run", tmp_path / "seen.json"
    last = run / "checkpoints" / "last.ckpt"
    record = [f"+callbacks.record._target_={__name__}.RecordLastCheckpoint", f"+callbacks.record.last={last}",
              f"+callbacks.record.out={seen}"]  # fmt: skip
    train(compose_train([*RUN, *record, "trainer.max_steps=5", "checkpoint_every_n_steps=2"], run))
    # an epoch of 44 steps: these saves are all mid-epoch
    assert json.loads(seen.read_text()) == {"0": -1, "1": -1, "2": 2, "3": 2, "4": 4}


def test_sigterm_saves_last_checkpoint_exits_non_zero_and_auto_resume_finishes(tmp_path):
    run, started = tmp_path / "run", tmp_path / "started"
    command = [sys.executable, str(ROOT / "train.py"), *RUN, "trainer.max_steps=12", f"hydra.run.dir={run}"]
    slow = [f"+callbacks.announce._target_={__name__}.AnnounceStep", f"+callbacks.announce.path={started}",
            "+callbacks.announce.step=3"]  # fmt: skip
    process = subprocess.Popen([*command, *slow], cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not started.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert started.exists(), process.communicate()[0][-3000:] if process.poll() is not None else "no step in 300 s"
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    stopped_at = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 3 <= stopped_at < 12
    assert not (run / "metrics.json").exists() and not (run / "export").exists()
    assert not list((run / "checkpoints").glob(".*"))  # no temporary file left

    resumed = subprocess.run([*command, "auto_resume=true"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"auto_resume: continuing from {run / 'checkpoints' / 'last.ckpt'}" in resumed.stderr + resumed.stdout
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    assert (run / "metrics.json").is_file() and (run / "export" / "head.safetensors").is_file()


class _FailsToPickle:
    def __reduce__(self):
        raise RuntimeError("killed mid-save")


def test_a_failed_checkpoint_save_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    writer, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    writer.save_checkpoint({"global_step": 1, "weights": torch.ones(1000)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="killed mid-save"):
        writer.save_checkpoint({"global_step": 2, "weights": torch.zeros(1000), "bad": _FailsToPickle()}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    stale = tmp_path / ".last.ckpt.abc123.ckpt"  # what a SIGKILL during a save leaves behind
    stale.write_bytes(b"half a checkpoint")
    writer.save_checkpoint({"global_step": 3}, path)
    assert not stale.exists() and torch.load(path, weights_only=True) == {"global_step": 3}


def test_atomically_written_files_get_the_permissions_a_plain_write_would(tmp_path):
    import os

    from tame_lit.io import write_json

    previous = os.umask(0o027)  # group may read, others nothing
    try:
        write_json(tmp_path / "metrics.json", {"a": 1})  # mkstemp alone would leave 0o600: private to the owner
        AtomicCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "last.ckpt")
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()}
    assert modes == {"metrics.json": 0o640, "last.ckpt": 0o640, "plain": 0o640}


class SignalSelf(L.Callback):
    """Send ``signal_name`` to this process during step ``step`` (a scheduler's pre-emption notice)."""

    def __init__(self, signal_name: str, step: int) -> None:
        self.signal, self.step = signal.Signals[signal_name], step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            signal.raise_signal(self.signal)


def test_sigusr1_finishes_the_step_saves_last_checkpoint_and_exits_with_128_plus_the_signal(tmp_path):
    run = tmp_path / "run"
    notice = [f"+callbacks.notice._target_={__name__}.SignalSelf", "+callbacks.notice.signal_name=SIGUSR1",
              "+callbacks.notice.step=2"]  # fmt: skip
    previous = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(SystemExit) as stopped:
        train(compose_train([*RUN, *notice, "trainer.max_steps=12", "checkpoint_every_n_steps=0"], run))
    assert stopped.value.code == 128 + signal.SIGUSR1
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3  # step 2 finished
    assert not (run / "metrics.json").exists() and signal.getsignal(signal.SIGUSR1) == previous  # handler restored
