"""The real thing, small: EfficientNet-Lite0 with its ImageNet weights on 64 Imagenette validation images."""

from __future__ import annotations

import json

import pytest

from tame_lit.evaluate import evaluate
from tame_lit.train import train
from tests.helpers import compose_train

SMALL_IMAGES = ["data.resize_size=182", "data.crop_size=160", "data.num_workers=2"]


@pytest.mark.real
def test_evaluate_lite0_on_imagenette(tmp_path, shared_data):
    paths = f"paths.data_dir={shared_data}"
    train(
        compose_train(
            [
                "experiment=tame_lite0_imagenette",
                paths,
                *SMALL_IMAGES,
                "trainer.max_steps=40",
                "data.batch_size=8",
                "data.limit=16",
            ],
            tmp_path / "train",
        )
    )
    checkpoint = tmp_path / "train" / "checkpoints" / "last.ckpt"
    cfg = compose_train(
        [
            "data=imagenette",
            paths,
            *SMALL_IMAGES,
            "data.limit=64",
            "data.batch_size=32",
            "logger=none",
            "explainers=[tame,gradcam,scorecam,rise,random]",
            f"heads.tame.checkpoint={checkpoint}",
            "explainer.scorecam.layers=[blocks.2]",  # 40 channels: the perturbation methods run, cheaply
            "explainer.rise.num_masks=50",
            "metrics.deletion.steps=8",
            "metrics.road.levels=[0.2,0.5,0.8]",
        ],
        tmp_path / "evaluate",
        config="evaluate",
    )
    results = evaluate(cfg)
    run_dir = tmp_path / "evaluate"
    written = json.loads((run_dir / "metrics.json").read_text())
    assert all(written[name] == pytest.approx(row) for name, row in results.items())
    assert set(results) == {"tame", "gradcam", "scorecam", "rise", "random"}
    for row in results.values():
        assert row["images"] == 64
    # the floor: a random map must lose to Grad-CAM where faithfulness is measured
    assert results["random"]["deletion_auc"] > results["gradcam"]["deletion_auc"]
    assert results["random"]["AD@15"] > results["gradcam"]["AD@15"]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["top1_accuracy"] > 0.6 and run["labelled_images"] == 64 and not run["failed"]
    for name in (
        "metrics.csv",
        "curves.json",
        "report.md",
        "heatmaps.png",
        "deletion.png",
        "insertion.png",
        "road.png",
    ):
        assert (run_dir / name).stat().st_size > 100, name
    report = (run_dir / "report.md").read_text()
    assert "efficientnet_lite0" in report and "64 images evaluated" in report
