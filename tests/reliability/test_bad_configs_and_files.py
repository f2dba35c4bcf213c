"""Issue #14, findings 7 and 8: a bad config, a damaged file or an unusable output folder is refused before any
work, with a message naming the key, the file or the folder; index.html links survive odd file names."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

from tame_lit import explainers
from tame_lit.checkpoints import IncompatibleCheckpointError, read_checkpoint
from tame_lit.cli.explain import _write_summary, explain_files
from tame_lit.cli.explain import main as explain_main
from tame_lit.cli.export import main as export_main
from tame_lit.cli.merge import main as merge_main
from tame_lit.config import check_command_line
from tame_lit.data import ImageDataModule
from tame_lit.export import METADATA_FILE, InvalidExportError, load_export
from tame_lit.train import train
from tests.helpers import TINY_OVERRIDES, compose_train


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("trainer.max_epochs=abc", "wrong type for 'trainer.max_epochs'"),
        ("trainer.max_step=5", "unknown key 'trainer.max_step'"),
        ("optimizer.max_lr=fast", "wrong type for 'optimizer.max_lr'"),
        ("loss.ce=abc", "wrong type for 'loss.ce'"),
        ("+foo=1", "unknown key 'foo'"),
    ],
)
def test_a_mistyped_or_unknown_key_is_refused_before_any_work_naming_it(override, named, capsys):
    with pytest.raises(SystemExit) as stopped:
        check_command_line("train", [override])
    assert stopped.value.code == 1
    assert named in capsys.readouterr().err


def folders(root: Path, names: list[str]) -> Path:
    for index, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for copy in range(2):
            Image.new("RGB", (72, 72), (30 * index, 90, 40 * copy)).save(root / name / f"{copy}.png")
    return root


def test_ground_truth_labels_need_folders_that_are_the_models_classes(tmp_path):
    plain = folders(tmp_path / "plain", ["cat", "dog"])
    data = ImageDataModule(train_root=str(plain), root=str(plain))
    data.setup("fit")
    with pytest.raises(ValueError, match=rf"labels=ground_truth: the 2 class folders of {plain} \(cat, dog\) are not"):
        data.check_ground_truth(1000)
    data.check_ground_truth(2)  # a model of exactly these two classes, numbered by folder name
    wordnet = folders(tmp_path / "wordnet", ["n01440764", "n02102040"])
    data = ImageDataModule(train_root=str(wordnet), root=str(wordnet))
    data.setup("fit")
    data.check_ground_truth(1000)  # ImageNet indices 0 and 217


def test_training_toward_ground_truth_on_unmapped_folders_stops_before_a_step(tmp_path):
    plain = folders(tmp_path / "plain", ["cat", "dog", "bird"])
    data = ["data=folder", f"data.train_root={plain}", f"data.root={plain}", "data.num_workers=0"]
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"3 class folders .*\(it has 10\)"):
        train(compose_train([*TINY_OVERRIDES, *data, "labels=ground_truth", "logger=none", "trainer.max_steps=2"], run))
    assert not list(run.glob("checkpoints/*.ckpt"))


def test_an_empty_or_truncated_checkpoint_is_named_with_what_is_wrong(checkpoint, tmp_path):
    empty, truncated = tmp_path / "empty.ckpt", tmp_path / "truncated.ckpt"
    empty.touch()
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(IncompatibleCheckpointError, match=rf"^{empty}: .*the file is empty \(0 bytes"):
        read_checkpoint(empty)
    with pytest.raises(IncompatibleCheckpointError, match=rf"^{truncated}: .*not a PyTorch checkpoint archive"):
        read_checkpoint(truncated)
    run = tmp_path / "run"  # and train.py says so before building anything
    with pytest.raises(IncompatibleCheckpointError, match=rf"^{empty}: "):
        train(compose_train([*TINY_OVERRIDES, f"ckpt_path={empty}", "logger=none"], run))
    assert not run.exists() or not list(run.glob("checkpoints/*"))


def test_an_edited_explainer_json_is_refused_weights_checksum_included(checkpoint, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(checkpoint.parent.parent / "export", export)
    load_export(export)  # intact
    metadata = json.loads((export / METADATA_FILE).read_text())
    metadata["sha256"] = "0" * 64  # e.g. to pass off other weights
    (export / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(InvalidExportError, match=rf"^{export / METADATA_FILE}: its content does not match"):
        load_export(export)


def test_the_command_line_tools_check_their_output_folder_before_any_work(tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.new("RGB", (72, 72)).save(image)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for out, problem in ((blocker, "is a file"), (blocker / "sub", f"is under {blocker}, which is a file")):
        with pytest.raises(SystemExit) as stopped:
            explain_main([str(image), "--out", str(out), "--explainer", "no-such-method"])
        assert stopped.value.code == 2  # refused on --out, before the explainer is even looked up
        assert f"--out {out}: {problem}" in capsys.readouterr().err
    for tool in (export_main, merge_main):  # refused on --out before the (missing) input is read
        with pytest.raises(SystemExit) as stopped:
            tool([str(tmp_path / "missing"), "--out", str(blocker / "sub")])
        assert stopped.value.code == 2
        assert f"--out {blocker / 'sub'}: is under {blocker}, which is a file" in capsys.readouterr().err
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(SystemExit):
            explain_main([str(image), "--out", str(locked / "out")])
        assert "is not writable" in capsys.readouterr().err


def test_index_html_links_images_whose_names_hold_url_characters(tmp_path, tiny_backbone):
    odd = tmp_path / "in" / "shot #1?x=2%.png"
    odd.parent.mkdir()
    Image.new("RGB", (72, 72), (200, 30, 30)).save(odd)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows, _ = explain_files([odd], explainers.create("gradcam", tiny_backbone), out)
    _write_summary(rows, [], out, "gradcam")
    page = (out / "index.html").read_text()
    overlay = rows[0]["overlay"]
    assert "#" in overlay and (out / overlay).is_file()
    (link,) = re.findall(r'<img src="([^"]*)"', page)
    assert not set("#? ") & set(link) and unquote(link) == overlay  # a browser opens the file itself
