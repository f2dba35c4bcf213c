"""Head-only export: files, reload without Lightning, verification, tampered and truncated files; the one
compatibility check of checkpoints and exports. ``checkpoint``: a briefly trained tiny head (conftest.py)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch

from tame_lit import backbones, load_explainer
from tame_lit.checkpoints import IncompatibleCheckpointError
from tame_lit.explainers import create
from tame_lit.export import ExportError, InvalidExportError, export_head, load_export, sha256, verify_maps
from tame_lit.export.format import write_metadata
from tame_lit.maps import normalize, smooth
from tame_lit.training import HeadTrainingModule
from tests.helpers import ROOT, TINY_BACKBONE


def test_export_writes_small_verified_files(checkpoint, tmp_path):
    out = export_head(checkpoint, tmp_path / "export")
    metadata = json.loads((out / "explainer.json").read_text())
    assert metadata["sha256"] == sha256(out / "head.safetensors")
    assert metadata["backbone"]["name"] == "test_resnet" and metadata["num_classes"] == 10
    assert metadata["head"]["name"] == "tame" and metadata["layers"] == list(metadata["layer_shapes"])
    assert metadata["input_size"] == [64, 64] and len(metadata["normalization"]["mean"]) == 3
    assert (out / "head.safetensors").stat().st_size < checkpoint.stat().st_size  # no optimiser state
    # the default folder sits beside the run's checkpoints
    assert export_head(checkpoint, verify=False) == checkpoint.parent.parent / "export"


def test_reloaded_in_a_fresh_process_without_lightning_gives_identical_maps(checkpoint, tmp_path):
    out = export_head(checkpoint, tmp_path / "export")
    torch.manual_seed(0)
    images = torch.rand(3, 3, 64, 64)
    torch.save(images, tmp_path / "images.pt")
    eager = load_explainer(checkpoint)(images)
    script = (
        "import sys, torch\n"
        "from tame_lit.export import load_export\n"
        f"explainer = load_export({str(out)!r})\n"
        f"torch.save(explainer(torch.load({str(tmp_path / 'images.pt')!r})), {str(tmp_path / 'maps.pt')!r})\n"
        "assert 'lightning' not in sys.modules and 'hydra' not in sys.modules, 'imported Lightning or Hydra'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "maps.pt"), eager, rtol=0, atol=1e-6)
    # load_explainer takes the folder too, on a given backbone
    torch.testing.assert_close(load_explainer(out)(images), eager, rtol=0, atol=1e-6)


def test_tampered_and_truncated_weights_are_refused(checkpoint, tmp_path):
    out = export_head(checkpoint, tmp_path / "export")
    weights = out / "head.safetensors"
    original = weights.read_bytes()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0x01  # one bit in the middle of the tensor data
    weights.write_bytes(bytes(tampered))
    with pytest.raises(InvalidExportError, match="checksum mismatch"):
        load_export(out)
    weights.write_bytes(original[: len(original) // 2])
    with pytest.raises(InvalidExportError, match="checksum mismatch"):
        load_export(out)
    weights.unlink()
    with pytest.raises(InvalidExportError, match="missing"):
        load_export(out)
    with pytest.raises(InvalidExportError, match=r"no explainer\.json"):
        load_export(tmp_path)


def test_an_export_is_refused_on_another_backbone(checkpoint, tmp_path):
    out = export_head(checkpoint, tmp_path / "export")
    other = backbones.create(**{**TINY_BACKBONE, "name": "test_efficientnet"})
    refused = r"trained with backbone='test_resnet', but this run has backbone='test_efficientnet'"
    with pytest.raises(IncompatibleCheckpointError, match=refused):
        load_export(out, backbone=other)
    assert issubclass(InvalidExportError, IncompatibleCheckpointError)  # one `except` catches both


def test_every_reader_refuses_another_backbone_with_the_same_check(checkpoint, tmp_path):
    """Resuming (HeadTrainingModule), load_explainer on a checkpoint, an export folder and a program: one
    compatibility check, one error type, one message (after the file's name)."""
    other_config = {**TINY_BACKBONE, "name": "test_efficientnet"}
    other = backbones.create(**other_config)
    out = export_head(checkpoint, tmp_path / "export", verify=False, program=True)
    readers = {
        "resume": lambda: HeadTrainingModule.load_from_checkpoint(
            checkpoint, weights_only=True, backbone=other_config, head={"name": "tame"}
        ),
        "checkpoint": lambda: load_explainer(checkpoint, backbone=other),
        "export": lambda: load_explainer(out, backbone=other),
        "program": lambda: load_explainer(out / "explainer.pt2", backbone=other, trusted=True),
    }
    messages = {}
    for name, read in readers.items():
        with pytest.raises(IncompatibleCheckpointError) as caught:
            read()
        assert type(caught.value) is IncompatibleCheckpointError, name
        messages[name] = str(caught.value)
    start = "the head was trained with backbone='test_resnet', but this run has backbone='test_efficientnet'; "
    shapes = {message[message.index(start) :] for message in messages.values()}
    assert len(shapes) == 1, messages
    assert "head=tame" in shapes.pop()
    assert messages["checkpoint"].startswith(f"{checkpoint}: ") and messages["export"].startswith(f"{out}: ")


def test_a_head_on_other_weights_of_its_backbone_warns_with_both_fingerprints(checkpoint):
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["tame_lit"]
    other = backbones.create(**TINY_BACKBONE)  # same architecture, fresh random weights
    assert other.fingerprint() != saved["weights_fingerprint"]
    with pytest.warns(UserWarning, match="may not fit") as caught:
        load_explainer(checkpoint, backbone=other)
    message = str(caught[0].message)
    assert saved["weights_fingerprint"] in message and other.fingerprint() in message


def test_verification_reports_the_difference(tiny_backbone):
    images = torch.rand(2, 3, 64, 64)
    gradcam, random = create("gradcam", tiny_backbone), create("random", tiny_backbone)
    assert verify_maps(gradcam, gradcam, images) == 0.0
    with pytest.raises(ExportError, match=r"differ from the eager ones by 0\.\d+"):
        verify_maps(gradcam, random, images)


def test_weights_of_the_wrong_shape_are_refused_by_name(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    out = export_head(checkpoint, tmp_path / "export")
    state = load_file(str(out / "head.safetensors"))
    key = next(name for name, tensor in state.items() if tensor.dim() > 0)
    state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)
    save_file(state, str(out / "head.safetensors"))
    metadata = json.loads((out / "explainer.json").read_text())
    metadata["sha256"] = sha256(out / "head.safetensors")  # a consistent but wrong export (checksums recomputed)
    write_metadata(out, metadata)
    with pytest.raises(InvalidExportError, match=f"(?s)do not fit the tame head.*{re.escape(key)}"):
        load_export(out)


def test_standalone_program_runs_with_plain_pytorch(checkpoint, tmp_path):
    out = export_head(checkpoint, tmp_path / "export", program=True)
    program = out / "explainer.pt2"
    torch.manual_seed(1)
    images = torch.rand(5, 3, 64, 64)  # another batch size than the one it was captured with
    targets = torch.tensor([-1, 3, -1, 0, 9])  # -1: the top-1 class
    torch.save({"images": images, "targets": targets}, tmp_path / "inputs.pt")
    script = (
        "import sys, torch\n"
        f"inputs = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        f"module = torch.export.load({str(program)!r}).module()\n"
        "maps, logits = module(inputs['images'], inputs['targets'])\n"
        f"torch.save(maps, {str(tmp_path / 'maps.pt')!r})\n"
        "assert not any(name.startswith('tame_lit') for name in sys.modules), 'needed tame_lit'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    eager = load_explainer(out)
    top1 = torch.where(targets < 0, eager.backbone(images).argmax(dim=1), targets)
    torch.testing.assert_close(torch.load(tmp_path / "maps.pt"), eager(images, top1), rtol=0, atol=1e-5)
    # and through tame-lit's interface, vouched for by its checksum (tests/reliability: refused without)
    loaded = load_explainer(program, program_sha256=sha256(program))
    torch.testing.assert_close(loaded(images, top1), eager(images, top1), rtol=0, atol=1e-5)
    program.write_bytes(program.read_bytes()[:1000])  # even trusted, the checksum recorded beside it catches this
    with pytest.raises(InvalidExportError, match="checksum mismatch"):
        load_explainer(program, trusted=True)


@pytest.mark.real
def test_lite0_program_reproduces_the_eager_maps(lite0, tmp_path):
    from tame_lit import heads
    from tame_lit.explainers import HeadExplainer
    from tame_lit.export import ProgramExplainer, export_program

    torch.manual_seed(0)
    eager = HeadExplainer(lite0, heads.create("tame", lite0).eval())
    path = export_program(eager, tmp_path / "explainer.pt2", {"num_classes": 1000})  # verified within 1e-4
    images = torch.rand(3, 3, 224, 224)
    difference = (ProgramExplainer(path, trusted=True)(images) - eager(images)).abs().max()
    assert difference <= 1e-4


def test_command_line_export(checkpoint, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "tame_lit.export", str(checkpoint), "--out", str(out), "--format",
                             "head", "program"], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {"head.safetensors", "explainer.json", "explainer.pt2"}
    result = subprocess.run([sys.executable, "-m", "tame_lit.export", str(tmp_path / "absent.ckpt")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0 and "absent.ckpt" in result.stderr


def test_onnx_export_reproduces_the_maps_in_onnxruntime(checkpoint, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = export_head(checkpoint, tmp_path / "export", onnx=True)  # verified within 1e-4 while writing
    onnx = load_explainer(out / "explainer.onnx")
    eager = load_explainer(out)
    torch.manual_seed(2)
    images = torch.rand(5, 3, 64, 64)
    targets = torch.tensor([0, 9, 4, 4, 1])
    assert onnx.num_classes == 10
    torch.testing.assert_close(onnx(images, targets), eager(images, targets), rtol=0, atol=1e-4)
    top1 = eager.backbone(images).argmax(dim=1)
    torch.testing.assert_close(onnx(images), eager(images, top1), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        onnx(images, torch.tensor([0, 1, 2, 3, 10]))


def test_evaluation_takes_every_kind_of_trained_file_checked_against_its_backbone(checkpoint, tmp_path):
    from omegaconf import OmegaConf

    from tame_lit.evaluate import build_explainers

    has_onnx = all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))
    out = export_head(checkpoint, tmp_path / "export", verify=False, program=True, onnx=has_onnx)
    names = [str(checkpoint), str(out), "program"] + ([str(out / "explainer.onnx")] if has_onnx else [])
    program = out / "explainer.pt2"  # a program is named under heads, with the checksum that vouches for it
    programs = {"program": {"checkpoint": str(program), "sha256": sha256(program)}}
    cfg = OmegaConf.create({"explainers": names, "heads": programs, "explainer": {}})
    weights = checkpoint.parent.parent / "test_resnet.safetensors"
    backbone = backbones.create(**{**TINY_BACKBONE, "weights": str(weights)})
    built, settings, failures = build_explainers(cfg, backbone)
    assert failures == {} and list(built) == names
    images = torch.rand(2, 3, 64, 64)
    reference = built[str(checkpoint)](images)
    for name in names[1:]:
        torch.testing.assert_close(built[name](images), reference, rtol=0, atol=1e-4)
    assert all(settings[name]["head"] == "tame" and settings[name]["checkpoint"] for name in names)
    assert settings[str(checkpoint)]["layers"] == ["layer2", "layer3", "layer4"] and "step" in settings[str(checkpoint)]

    # the same weights read as the trained mask (heads.<name>.explanation); a compiled program cannot be
    heads = {
        "as_mask": {"checkpoint": str(checkpoint), "explanation": "mask"},
        "program_as_mask": {"checkpoint": str(out / "explainer.pt2"), "explanation": "mask", "trusted": True},
        "as_soft": {"checkpoint": str(checkpoint), "explanation": "soft"},
        "smoothed": {"checkpoint": str(checkpoint), "smoothing": 1.0},
        "program_smoothed": {"checkpoint": str(out / "explainer.pt2"), "smoothing": 1.0, "trusted": True},
        "smoothed_less_than_none": {"checkpoint": str(checkpoint), "smoothing": -0.5},
    }
    read_as = OmegaConf.create({"explainers": [names[0], *heads], "heads": heads, "explainer": {}})
    built, settings, failures = build_explainers(read_as, backbone)
    assert built[names[0]].head.explanation == "logits" and built["as_mask"].head.explanation == "mask"
    assert settings["as_mask"]["explanation"] == "mask" and not torch.allclose(built["as_mask"](images), reference)
    assert "explainer.pt2 / explainer.onnx) has its maps compiled in" in failures["program_as_mask"]
    assert "must be one of ['logits', 'mask'], got 'soft'" in failures["as_soft"]
    # and blurred (heads.<name>.smoothing): the same order as the blur of the plain maps
    assert built["smoothed"].head.smoothing == 1.0 and settings["smoothed"]["smoothing"] == 1.0
    plain = built[names[0]]
    with torch.no_grad():
        low = plain.head(backbone.features(images, plain.head.layers)[1]).shape[-1]  # one cell: 64 / low pixels
    expected = normalize(smooth(plain(images), (64 / low, 64 / low)))
    torch.testing.assert_close(built["smoothed"](images), expected, rtol=0, atol=1e-5)
    assert "heads.program_smoothed.smoothing needs a checkpoint or export folder" in failures["program_smoothed"]
    assert "heads.smoothed_less_than_none.smoothing: head smoothing must be" in failures["smoothed_less_than_none"]

    other = backbones.create(**{**TINY_BACKBONE, "name": "test_efficientnet"})
    _, _, failures = build_explainers(cfg, other)
    assert list(failures) == names
    for failure in failures.values():
        assert (
            failure.startswith("IncompatibleCheckpointError: ")
            and "this run has backbone='test_efficientnet'" in failure
        )


def test_a_mask_explanation_survives_export_to_every_format(tmp_path):
    """``head.explanation=mask`` and ``head.smoothing`` are head options: the export folder, the program and ONNX
    give its maps."""
    pytest.importorskip("onnxruntime")
    from safetensors.torch import save_file

    from tame_lit.train import train
    from tests.helpers import TINY_OVERRIDES, compose_train

    torch.manual_seed(0)
    weights = tmp_path / "test_resnet.safetensors"  # one backbone for every loader (random init differs each time)
    save_file(backbones.create(**TINY_BACKBONE).model.state_dict(), str(weights))
    overrides = [*TINY_OVERRIDES, f"backbone.weights={weights}", "head.explanation=mask", "head.smoothing=0.5"]
    overrides.append("trainer.max_steps=1")
    overrides.append("data.num_workers=0")
    train(compose_train(overrides, tmp_path / "run"))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = export_head(checkpoint, tmp_path / "export", program=True, onnx=True)  # each verified while written
    saved = json.loads((out / "explainer.json").read_text())["head"]
    assert saved["explanation"] == "mask" and saved["smoothing"] == 0.5
    images = torch.rand(2, 3, 64, 64)
    eager = load_explainer(checkpoint)
    assert eager.head.explanation == "mask" and eager.head.smoothing == 0.5
    for path in (out, out / "explainer.pt2", out / "explainer.onnx"):
        loaded = load_explainer(path, trusted=True)  # trusted: a program this test just wrote
        torch.testing.assert_close(loaded(images), eager(images), rtol=0, atol=1e-4)


def test_a_head_whose_layers_do_not_sort_in_their_order_reloads_in_that_order(tmp_path):
    """explainer.json's objects have sorted keys, while a head's branches follow its layers' order (a ViT's
    blocks.9, blocks.10, blocks.11 sort as 10, 11, 9): the reload takes the order from ``layers``."""
    from safetensors.torch import save_file

    from tests.test_training import quiet_trainer, tiny_data

    torch.manual_seed(0)
    weights = tmp_path / "test_resnet.safetensors"
    save_file(backbones.create(**TINY_BACKBONE).model.state_dict(), str(weights))
    layers = ["layer4", "layer2", "layer3"]
    module = HeadTrainingModule({**TINY_BACKBONE, "weights": str(weights)}, {"name": "tame", "layers": layers})
    trainer = quiet_trainer(max_steps=2, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, tiny_data())
    trainer.save_checkpoint(tmp_path / "head.ckpt")
    out = export_head(tmp_path / "head.ckpt", tmp_path / "export")  # verifies the reloaded maps against the eager
    assert list(json.loads((out / "explainer.json").read_text())["layer_shapes"]) == sorted(layers)
    assert load_export(out).head.layers == tuple(layers)
