"""``tame-explain``: inputs, targets, every kind of explainer (method, checkpoint, export folder, program,
ONNX graph) on the tiny backbone, and real runs on imagenet-sample with Grad-CAM and a trained head."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tame_lit import backbones
from tame_lit.cli.explain import collect_inputs, main, resolve_target
from tame_lit.data import ImageDataset, collate, eval_transform, imagenet_class_names
from tame_lit.export import export_head, sha256
from tame_lit.train import train
from tests.helpers import ROOT, TINY_BACKBONE, compose_train


def test_inputs_are_files_folders_and_globs_without_repeats(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/1.jpg", "a/deep/2.PNG", "a/notes.txt", "b.jpeg"):
        (tmp_path / name).write_bytes(b"x")
    files, missing = collect_inputs([str(tmp_path / "a"), str(tmp_path / "*.jpeg"), str(tmp_path / "a" / "1.jpg"),
                                     str(tmp_path / "absent.png")])  # fmt: skip
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a/1.jpg", "a/deep/2.PNG", "b.jpeg"]
    assert missing == [str(tmp_path / "absent.png")]


def test_targets_by_index_or_name():
    names = imagenet_class_names()
    assert resolve_target("3", names, 1000) == 3
    assert resolve_target("Tench", names, 1000) == 0
    assert resolve_target(None, names, 1000) is None
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        resolve_target("1000", names, 1000)
    with pytest.raises(ValueError, match="matches 0 class names"):
        resolve_target("no such animal", names, 1000)
    with pytest.raises(ValueError, match="class index"):
        resolve_target("cat", None, 10)


HAS_ONNX = all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    """The tiny trained head exported with its program and, when onnx is installed, its ONNX graph."""
    return export_head(checkpoint, tmp_path_factory.mktemp("explain") / "export", program=True, onnx=HAS_ONNX)


def small_photos(folder: Path, count: int = 2) -> list[Path]:
    folder.mkdir()
    generator = np.random.default_rng(0)
    paths = [folder / f"photo{index}.png" for index in range(count)]
    for index, path in enumerate(paths):
        Image.fromarray(generator.integers(0, 256, (70 + 10 * index, 90, 3), dtype=np.uint8)).save(path)
    return paths


@pytest.mark.parametrize("kind", ["method", "checkpoint", "export", "program", "onnx"])
def test_every_kind_of_explainer_writes_maps_and_the_models_top1(kind, checkpoint, exported, tmp_path):
    """The .onnx case used to fail with AttributeError ('OnnxExplainer' object has no attribute 'metadata')."""
    if kind == "onnx" and not HAS_ONNX:
        pytest.skip("onnx / onnxruntime not installed")
    photos = small_photos(tmp_path / "photos")
    spec = {"method": "gradcam", "checkpoint": checkpoint, "export": exported, "program": exported / "explainer.pt2",
            "onnx": exported / "explainer.onnx"}[kind]  # fmt: skip
    # a method runs on --backbone (a 1000-class test_resnet, random weights seeded alike below); a trained
    # explainer on the backbone it was trained on (tiny test_resnet, weights from a file)
    options = ["--backbone", "test_resnet", "--weights", "none"] if kind == "method" else []
    if kind == "program":  # a program runs only with its checksum from a source the user trusts
        options = ["--program-sha256", sha256(spec)]
    out = tmp_path / "out"
    torch.manual_seed(0)
    code = main([str(tmp_path / "photos"), "--explainer", str(spec), "--out", str(out), "--topk", "2", "--device",
                 "cpu", *options])  # fmt: skip
    assert code == 0

    torch.manual_seed(0)
    if kind == "method":
        backbone = backbones.create("test_resnet", weights=None)
    else:
        weights = checkpoint.parent.parent / "test_resnet.safetensors"
        backbone = backbones.create(**{**TINY_BACKBONE, "weights": str(weights)})
    size = backbone.input_size[0]
    images = collate([ImageDataset([(str(p), -1) for p in photos], eval_transform(size, size))[i] for i in (0, 1)])
    with torch.no_grad():
        probabilities = backbone.eval()(images["images"]).softmax(dim=1)

    summary = json.loads((out / "summary.json").read_text())
    rows = summary["explanations"]
    assert summary["failed"] == [] and len(rows) == 4  # 2 images x top-2
    assert {(Path(row["file"]).name, row["rank"]) for row in rows} == {(p.name, r) for p in photos for r in (1, 2)}
    for row in rows:
        assert (out / row["overlay"]).stat().st_size > 1000
        saliency = np.load(out / row["map"])
        assert saliency.dtype == np.float32 and saliency.shape == (size, size)
        assert saliency.min() >= 0 and saliency.max() <= 1 and saliency.max() > 0
        if row["rank"] == 1:
            index = [p.name for p in photos].index(Path(row["file"]).name)
            assert row["class"] == int(probabilities[index].argmax())
            assert row["probability"] == pytest.approx(float(probabilities[index].max()), abs=1e-4)
    assert (out / "summary.csv").is_file() and (out / "index.html").read_text().count("<img ") == 4


def sample_folder(shared_data: Path, root: Path, count: int = 5) -> Path:
    """``count`` imagenet-sample photos and one corrupt file."""
    root.mkdir()
    for wnid in sorted(p.name for p in (shared_data / "imagenet-sample").iterdir())[:count]:
        source = next((shared_data / "imagenet-sample" / wnid).iterdir())
        shutil.copy(source, root / f"{wnid}{source.suffix}")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return root


def run_explain(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tame_lit.cli.explain", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)  # fmt: skip


def check_outputs(out: Path, images: int, topk: int) -> list[dict]:
    with open(out / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == images * topk
    names = imagenet_class_names()
    for row in rows:
        assert row["name"] == names[int(row["class"])]
        assert (out / row["overlay"]).stat().st_size > 5000
        saliency = np.load(out / row["map"])
        assert saliency.dtype == np.float32 and saliency.shape == (224, 224)
        assert saliency.min() >= 0 and saliency.max() <= 1 and saliency.max() > 0
    by_file: dict[str, list[float]] = {}
    for row in rows:
        by_file.setdefault(row["file"], []).append(float(row["probability"]))
    assert all(p == sorted(p, reverse=True) for p in by_file.values())  # rank 1 is the most probable
    page = (out / "index.html").read_text()
    assert page.count("<img ") == images * topk and "broken.jpg" in page
    summary = json.loads((out / "summary.json").read_text())
    assert [Path(f).name for f in summary["failed"]] == ["broken.jpg"]
    return rows


@pytest.mark.real
def test_gradcam_on_imagenet_sample_with_a_corrupt_file(tmp_path, shared_data):
    folder = sample_folder(shared_data, tmp_path / "photos")
    result = run_explain([str(folder), "--explainer", "gradcam", "--out", str(tmp_path / "out"), "--topk", "2"],
                         cwd=ROOT)  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]  # one input failed
    assert "broken.jpg" in result.stderr and "10 explanations of 5 images" in result.stdout
    rows = check_outputs(tmp_path / "out", images=5, topk=2)
    tench = [row for row in rows if Path(row["file"]).name.startswith("n01440764") and row["rank"] == "1"]
    assert tench[0]["name"] == "tench"  # the sample's tench photo is recognised


@pytest.mark.real
def test_a_trained_head_explains_imagenet_sample(tmp_path, shared_data):
    run = tmp_path / "train"
    train(compose_train(["trainer.max_steps=2", "data.resize_size=146", "data.crop_size=128", "logger=csv"], run))
    folder = sample_folder(shared_data, tmp_path / "photos", count=3)
    result = run_explain([str(folder), "--explainer", str(run / "export"), "--out", str(tmp_path / "out"),
                          "--target", "tench"], cwd=ROOT)  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    rows = check_outputs(tmp_path / "out", images=3, topk=1)
    assert {row["name"] for row in rows} == {"tench"}  # --target by name


def test_channels_last_gives_the_same_maps(checkpoint, tmp_path):
    small_photos(tmp_path / "photos", count=2)
    maps = {}
    for name, flags in (("plain", []), ("nhwc", ["--channels-last"])):
        out = tmp_path / name
        assert main([str(tmp_path / "photos"), "--explainer", str(checkpoint), "--out", str(out), *flags]) == 0
        maps[name] = {path.name: np.load(path) for path in sorted(out.glob("*.npy"))}
    assert len(maps["plain"]) == 2 and maps["plain"].keys() == maps["nhwc"].keys()
    for key, value in maps["plain"].items():
        np.testing.assert_allclose(maps["nhwc"][key], value, atol=1e-4)
