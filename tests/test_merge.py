"""Evaluating in shards (data.num_shards / data.shard) or by explainer, then tame-merge: the same table as one run."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from tame_lit.cli.merge import main as merge_main
from tame_lit.data import ImageDataModule
from tame_lit.evaluate import evaluate
from tame_lit.merge import MergeError, merge_runs
from tests.helpers import TINY_OVERRIDES, compose_train
from tests.test_evaluate import FAST_METRICS, image_folder


def run(tmp_path: Path, name: str, data: Path, *extra: str) -> Path:
    """An in-process evaluation of the tiny model on ``data`` into ``tmp_path / name``; returns its run dir.
    One image per batch: float32 convolutions may round differently with the batch's size (a shard's batches
    are smaller), and on 7 images the BCa interval magnifies a 1e-6 difference into the third digit."""
    overrides = [*TINY_OVERRIDES, *FAST_METRICS, "data=folder", f"data.root={data}", "data.eval_batch_size=1",
                 "logger=none", *extra]  # fmt: skip
    cfg = compose_train(overrides, tmp_path / name, config="evaluate")
    evaluate(cfg)
    return Path(next((tmp_path / name).rglob("run.json")).parent)


def per_image(run_dir: Path) -> dict[tuple[str, str, int], float]:
    with open(run_dir / "per_image.csv") as handle:
        return {(r["explainer"], r["key"], int(r["index"])): float(r["value"]) for r in csv.DictReader(handle)}


def assert_same_results(merged: dict, whole: dict) -> None:
    assert set(merged) == set(whole)
    for name, row in whole.items():
        keys = {key for key in row if key != "seconds_per_image"}
        assert keys == {key for key in merged[name] if key != "seconds_per_image"}, name
        for key in keys:
            assert math.isclose(merged[name][key], row[key], rel_tol=1e-9, abs_tol=1e-12), (name, key)


def test_shards_split_the_images_and_keep_their_indices(tmp_path):
    data = image_folder(tmp_path / "images")  # 7 images: a/img1, a/img3, a/img5, b/img0, b/img2, ...
    whole = ImageDataModule(root=str(data), num_workers=0, resize_size=72, crop_size=64)
    whole.setup("test")
    shards = []
    for shard in range(3):
        module = ImageDataModule(root=str(data), num_workers=0, resize_size=72, crop_size=64, num_shards=3, shard=shard)
        module.setup("test")
        shards.append(module)
        dataset = module.eval_dataset
        assert [dataset[i][2] for i in range(len(dataset))] == list(range(shard, 7, 3))
        assert [s[0] for s in dataset.samples] == [whole.eval_dataset.samples[i][0] for i in range(shard, 7, 3)]
        # the class-balanced subset of the slow methods is chosen on the whole set, in its indices
        assert module.eval_indices_per_class(2) == whole.eval_indices_per_class(2) == [0, 1, 3, 4]
    for wrong, named in (({"num_shards": 0}, "data.num_shards"), ({"num_shards": 2, "shard": 2}, "data.shard")):
        with pytest.raises(ValueError, match=named):
            ImageDataModule(root=str(data), **wrong)


def test_merged_shards_and_explainer_runs_equal_one_run(tmp_path, capsys):
    data = image_folder(tmp_path / "images")
    explainers = "explainers=[gradcam,random]"
    whole = run(tmp_path, "whole", data, explainers)
    shards = [run(tmp_path, f"shard{k}", data, explainers, "data.num_shards=2", f"data.shard={k}") for k in (0, 1)]
    assert {i for (_, _, i) in per_image(shards[0])} == {0, 2, 4, 6}  # indices in the whole set
    whole_results = json.loads((whole / "metrics.json").read_text())

    merged = merge_runs(shards, tmp_path / "merged")
    assert_same_results(merged, whole_results)  # means, intervals and comparisons with gradcam
    assert per_image(tmp_path / "merged") == per_image(whole)
    curves, whole_curves = (json.loads((d / "curves.json").read_text()) for d in (tmp_path / "merged", whole))
    for name, kinds in whole_curves.items():
        for kind, curve in kinds.items():
            assert curves[name][kind]["x"] == curve["x"]
            assert curves[name][kind]["y"] == pytest.approx(curve["y"], abs=1e-12), (name, kind)
    record = json.loads((tmp_path / "merged" / "run.json").read_text())
    single = json.loads((whole / "run.json").read_text())
    assert record["top1_accuracy"] == pytest.approx(single["top1_accuracy"]) and record["labelled_images"] == 7
    assert record["data"]["shards"] == "0, 1 of 2" and record["merged_from"] == [str(s) for s in shards]
    report = (tmp_path / "merged" / "report.md").read_text()
    assert "Merged (tame-merge) from the runs" in report and "## Paired comparison with gradcam" in report

    # split by explainer instead, the reference scored in both runs: the same table again, through the CLI
    by_explainer = [run(tmp_path, "random_run", data, "explainers=[gradcam,random]"),
                    run(tmp_path, "cam_run", data, "explainers=[gradcam,cam]")]  # fmt: skip
    merge_main([*map(str, by_explainer), "--out", str(tmp_path / "by_explainer")])
    assert "merged run written" in capsys.readouterr().out
    merged = json.loads((tmp_path / "by_explainer" / "metrics.json").read_text())
    assert set(merged) == {"gradcam", "random", "cam"}
    assert_same_results({k: merged[k] for k in whole_results}, whole_results)
    assert merged["cam"]["AD@15_vs_gradcam"] == pytest.approx(merged["cam"]["AD@15"] - merged["gradcam"]["AD@15"])


def test_runs_that_do_not_belong_together_are_refused(tmp_path):
    data = image_folder(tmp_path / "images")
    first = run(tmp_path, "first", data, "explainers=[random]", "data.num_shards=2", "data.shard=0")
    other_metric = run(tmp_path, "other", data, "explainers=[random]", "data.num_shards=2", "data.shard=1",
                       "metrics.deletion.steps=2")  # fmt: skip
    with pytest.raises(MergeError, match=r"metrics.options"):
        merge_runs([first, other_metric], tmp_path / "out")
    # an explainer of the same name with other settings, e.g. a head retrained into the same export folder
    retrained = run(tmp_path, "retrained", data, "explainers=[random]", "data.num_shards=2", "data.shard=1")
    record = json.loads((retrained / "run.json").read_text())
    record["explainers"]["random"]["weights_sha256"] = "0" * 64
    (retrained / "run.json").write_text(json.dumps(record))
    with pytest.raises(MergeError, match=r"'random' has other settings .*weights_sha256"):
        merge_runs([first, retrained], tmp_path / "out")
    whole = run(tmp_path, "whole", data, "explainers=[random]")
    with pytest.raises(MergeError, match=r"num_shards"):
        merge_runs([first, whole], tmp_path / "out")
    # the same images scored differently by an explainer of the same name: a conflict, named
    tampered = tmp_path / "tampered"
    shutil.copytree(first, tampered)
    lines = (tampered / "per_image.csv").read_text().splitlines()
    explainer, key, index, value = lines[1].split(",")
    lines[1] = ",".join([explainer, key, index, repr(float(value) + 1.0)])
    (tampered / "per_image.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(MergeError, match=rf"'{explainer}' gave {key} .* on image {index}"):
        merge_runs([first, tampered], tmp_path / "out")
    (tampered / "per_image.csv").unlink()
    with pytest.raises(MergeError, match=r"per_image.csv missing"):
        merge_runs([first, tampered], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written
