"""Issue #14, finding 1: no file runs code when tame-lit loads it. A program (``explainer.pt2``) is loaded only
when the caller vouches for it (its SHA-256 from elsewhere, or ``trusted``), never on the word of the
``explainer.json`` beside it; resuming reads checkpoints with ``weights_only=True`` even when the environment
tells torch otherwise. Each malicious file here would write a marker file if it ran."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tame_lit import backbones, load_explainer
from tame_lit.checkpoints import IncompatibleCheckpointError
from tame_lit.cli.explain import main as explain_main
from tame_lit.evaluate import build_explainers
from tame_lit.export import METADATA_FILE, export_head, sha256
from tame_lit.export.format import UntrustedFileError, write_metadata
from tame_lit.train import train
from tests.helpers import TINY_BACKBONE, TINY_OVERRIDES, compose_train


class _WritesMarker:
    """Unpickling this object runs ``exec``: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def _malicious_program(program: Path, marker: Path) -> None:
    """Rewrite ``program`` in place so that ``torch.export.load`` unpickles ``_WritesMarker``: its first
    weight is flagged as pickled (the archive format's ``use_pickle``) and replaced by the payload; then the
    ``explainer.json`` beside it records the new file's SHA-256, as an attacker would."""
    entries = {}
    with zipfile.ZipFile(program) as archive:
        for name in archive.namelist():
            entries[name] = archive.read(name)
    config_name = next(name for name in entries if name.endswith("data/weights/model_weights_config.json"))
    config = json.loads(entries[config_name])
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    payload_name = config_name.rsplit("/", 1)[0] + "/" + first["path_name"]
    entries[config_name] = json.dumps(config).encode()
    buffer = program.with_suffix(".payload")
    torch.save(_WritesMarker(marker), buffer)
    entries[payload_name] = buffer.read_bytes()
    buffer.unlink()
    with zipfile.ZipFile(program, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    metadata = json.loads((program.parent / METADATA_FILE).read_text())
    metadata["program_sha256"] = sha256(program)
    write_metadata(program.parent, metadata)  # every checksum in the folder agrees: the attacker recomputed them


@pytest.fixture
def programs(checkpoint, tmp_path):
    """``(good, evil, marker)``: an exported program, and a malicious copy whose folder vouches for it."""
    good = export_head(checkpoint, tmp_path / "good", verify=False, program=True) / "explainer.pt2"
    shutil.copytree(good.parent, tmp_path / "evil")
    evil, marker = tmp_path / "evil" / "explainer.pt2", tmp_path / "marker.txt"
    _malicious_program(evil, marker)
    return good, evil, marker


def test_the_malicious_program_would_run_code_if_loaded_plainly(programs):
    """The payload is real: loading it as torch does by default (or trusting it) runs it."""
    _, evil, marker = programs
    with pytest.raises(Exception):  # noqa: B017 - whatever the program fails with after the payload ran
        load_explainer(evil, trusted=True)
    assert marker.read_text() == "code ran"


def test_a_program_vouched_for_only_by_its_own_folder_is_refused_everywhere(programs, tmp_path, capsys):
    good, evil, marker = programs
    with pytest.raises(UntrustedFileError, match="cannot vouch for it") as refused:
        load_explainer(evil)
    assert str(refused.value).startswith(f"{evil}: not loaded")
    with pytest.raises(UntrustedFileError, match="checksum mismatch"):  # a checksum the caller got elsewhere
        load_explainer(evil, program_sha256=sha256(good))

    with pytest.raises(SystemExit) as exited:
        explain_main([str(tmp_path), "--explainer", str(evil), "--out", str(tmp_path / "explained")])
    assert exited.value.code == 2 and f"{evil}: not loaded" in capsys.readouterr().err
    assert not (tmp_path / "explained").exists()

    backbone = backbones.create(**TINY_BACKBONE)
    for heads in ({"x": {"checkpoint": str(evil)}}, {"x": {"checkpoint": str(evil), "sha256": sha256(good)}}):
        _, _, failures = build_explainers(OmegaConf.create({"explainers": ["x"], "heads": heads}), backbone)
        assert failures["x"].startswith(f"UntrustedFileError: {evil}: ")
    _, _, failures = build_explainers(OmegaConf.create({"explainers": [str(evil)], "heads": {}}), backbone)
    assert "not loaded" in failures[str(evil)]
    assert not marker.exists()


def test_a_program_loads_with_a_checksum_from_elsewhere_or_when_trusted(programs, checkpoint):
    good, _, marker = programs
    images = torch.rand(2, 3, 64, 64)
    eager = load_explainer(good.parent)(images)
    for vouched in ({"program_sha256": sha256(good).upper()}, {"trusted": True}):
        torch.testing.assert_close(load_explainer(good, **vouched)(images), eager, rtol=0, atol=1e-5)
    cfg = OmegaConf.create({"explainers": ["x"], "heads": {"x": {"checkpoint": str(good), "sha256": sha256(good)}}})
    built, _, failures = build_explainers(cfg, load_explainer(good.parent).backbone)
    assert failures == {} and torch.allclose(built["x"](images), eager, atol=1e-5)
    with pytest.raises(ValueError, match=r"program_sha256 is for explainer\.pt2 programs"):
        load_explainer(checkpoint, program_sha256=sha256(good))
    good.write_bytes(good.read_bytes()[:1000])  # trusted, yet an accident its recorded checksum still catches
    with pytest.raises(IncompatibleCheckpointError, match="changed or truncated after export"):
        load_explainer(good, trusted=True)
    assert not marker.exists()


def test_resuming_never_unpickles_code_even_when_the_environment_asks_torch_to(tmp_path, monkeypatch):
    marker, evil = tmp_path / "marker.txt", tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": _WritesMarker(marker)}, evil)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    cfg = compose_train([*TINY_OVERRIDES, f"ckpt_path={evil}", "trainer.max_steps=1"], tmp_path / "run")
    with pytest.raises(IncompatibleCheckpointError, match="not a readable tame-lit checkpoint") as refused:
        train(cfg)
    assert str(refused.value).startswith(f"{evil}: ")
    assert not marker.exists() and not (tmp_path / "run" / "checkpoints").exists()
