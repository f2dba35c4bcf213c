"""``python evaluate.py`` as users run it: outputs, batch and process invariance, precision, bad input."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from timm.data import ImageNetInfo

from tame_lit import metrics as metric_registry
from tame_lit.evaluate import EvaluationFailed, evaluate, trained_head_settings
from tame_lit.evaluation import metric_columns
from tame_lit.metrics import Column, FaithfulnessMetric, ScoredBatch
from tame_lit.report import mean_ranks
from tame_lit.train import train
from tests.helpers import TINY_OVERRIDES, compose_train, run_cli

FAST_METRICS = ["metrics.deletion.steps=4", "metrics.road.levels=[0.25,0.75]", "data.num_workers=0"]
REQUIRED = [
    "AD@100",
    "IC@100",
    "AD@50",
    "IC@50",
    "AD@15",
    "IC@15",
    "deletion_auc",
    "insertion_auc",
    "road_morf",
    "road_lerf",
    "AD@20",
    "IC@20",
    "deletion_auc_first20",
    "insertion_auc_first20",
]


TEN_WNIDS = list(ImageNetInfo().label_names())[:10]


def image_folder(root: Path, count: int = 7, boxes: Path | None = None) -> Path:
    """``count`` noisy 72 px images in two class folders; with ``boxes``, one XML box file per image with a
    box for each of the tiny model's 10 classes (the WordNet ids of ImageNet's classes 0-9)."""
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        folder = root / ("a" if index % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(72, 72, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{index}.png")
        if boxes is not None:
            boxes.mkdir(parents=True, exist_ok=True)
            objects = "".join(
                f"<object><name>{name}</name><bndbox><xmin>{1 + 10 * index}</xmin><ymin>5</ymin><xmax>"
                f"{30 + 5 * index}</xmax><ymax>60</ymax></bndbox></object>"
                for name in TEN_WNIDS
            )
            (boxes / f"img{index}.xml").write_text(
                f"<annotation><size><width>72</width><height>72</height></size>{objects}</annotation>"
            )
    return root


def run_dir_of(root: Path) -> Path:
    runs = list((root / "outputs" / "evaluate" / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def without_timing(results: dict) -> dict:
    return {name: {k: v for k, v in row.items() if k != "seconds_per_image"} for name, row in results.items()}


# differences of nearly equal maps: a map's 1e-7 rounding (thread count, batch size) moves them by ~1e-5 relative
ROBUSTNESS_KEYS = ("max_sensitivity", "avg_sensitivity", "local_lipschitz")


def assert_close_results(first: dict, second: dict, tolerance: float, interval_tolerance: float | None = None) -> None:
    """Same keys, values within ``tolerance``; intervals and comparisons within ``interval_tolerance`` (default
    the same); the robustness metrics within 1e-4 relative, their statistics (and randomisation's) 5e-3."""
    first, second = without_timing(first), without_timing(second)
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].keys() == second[name].keys(), name
        for key, value in first[name].items():
            statistic = "_ci_" in key or "_vs_" in key
            limit = interval_tolerance if statistic and interval_tolerance is not None else tolerance
            if key.startswith(ROBUSTNESS_KEYS):  # and a 7-image BCa interval's ends by up to ~1e-3 relative
                limit = max(limit, 5e-3 if statistic else 1e-4)
            elif statistic and key.startswith("randomisation"):  # per-image SSIM within 1e-6 (one or two threads
                limit = max(limit, 5e-3)  # per process), its 7-image BCa interval's ends within ~4e-4 relative
            assert math.isclose(value, second[name][key], rel_tol=limit, abs_tol=limit), (name, key)


def test_cli_writes_every_output_with_boxes_and_wandb_offline(tmp_path):
    data = image_folder(tmp_path / "images", boxes=tmp_path / "boxes")
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env["HOME"] = str(tmp_path / "home")  # not logged in: W&B must go offline without a prompt
    args = [
        *TINY_OVERRIDES,
        *FAST_METRICS,
        "data=folder",
        f"data.root={data}",
        f"data.boxes_dir={tmp_path / 'boxes'}",
        "data.limit=6",
        "data.batch_size=4",
        "explainers=[gradcam,random]",
        "logger=wandb",
        "grid_images=3",
    ]
    result = run_cli(args, cwd=tmp_path, script="evaluate.py", env=env, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = run_dir_of(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"gradcam", "random"}
    for row in metrics.values():
        assert set(REQUIRED) <= set(row)
        assert row["images"] == 6
        assert 0 <= row["AD@15"] <= 100 and 0 <= row["deletion_auc"] <= 1 and 0 <= row["road_morf"] <= 1
        assert {"road_morf@25", "road_lerf@75", "pointing_game", "energy_pointing_game"} <= set(row)
        assert row["pointing_images"] == 6  # every image has a box of whatever class it is explained for
        # issue #17's map-only and box metrics, on by default, with intervals (relevance mass: the energy game)
        assert {"sparseness", "complexity", "relevance_rank", "box_iou", "box_iou_ci_low"} <= set(row)
        assert row["relevance_mass"] == pytest.approx(row["energy_pointing_game"])
        assert 0 <= row["sparseness"] <= 1 and 0 <= row["complexity"] <= math.log(64 * 64)
        assert row["AD@15_ci_low"] <= row["AD@15"] <= row["AD@15_ci_high"]  # intervals from per-image values
        assert 0 <= row["IC@15_ci_low"] <= row["IC@15"] <= row["IC@15_ci_high"] <= 100  # Wilson: a share
    # the paired comparison with the default reference (gradcam): only of the others, in metrics.json
    random, gradcam = metrics["random"], metrics["gradcam"]
    assert {"deletion_auc_vs_gradcam", "deletion_auc_vs_gradcam_p", "AD@15_vs_gradcam_outcome"} <= set(random)
    assert random["AD@15_vs_gradcam"] == pytest.approx(random["AD@15"] - gradcam["AD@15"])
    assert not any("_vs_" in key for key in metrics["gradcam"])
    curves = json.loads((run_dir / "curves.json").read_text())
    assert len(curves["gradcam"]["deletion"]["y"]) == 5  # 4 steps + the clean image
    assert curves["gradcam"]["deletion"]["x"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curves["gradcam"]["road_morf"]["x"] == [25.0, 75.0] and curves["gradcam"]["road_lerf"]["figure"] == "road"
    with open(run_dir / "metrics.csv") as handle:
        assert len(handle.read().strip().splitlines()) == 3
    report = (run_dir / "report.md").read_text()
    assert "| explainer | mean rank" in report and "![heatmaps.png](heatmaps.png)" in report
    assert "## 95 % confidence intervals" in report and "## Paired comparison with gradcam" in report
    assert "vs gradcam W/T/L" in report and "| gradcam |" in report
    # the step that steps=4 resolved to on 64x64 images, not the config's unused default step
    deletion_line = next(line for line in report.splitlines() if line.startswith("- `deletion`"))
    assert "applied: `{'image_size': [64, 64], 'step': 1024, 'steps': 4}`" in deletion_line
    for name in ("heatmaps.png", "deletion.png", "insertion.png", "road.png"):
        assert (run_dir / name).stat().st_size > 1000, name
    assert "gradcam" in result.stdout and "Deletion" in result.stdout  # the table in the terminal
    assert "W/T/L" in result.stdout and "reference" in result.stdout
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert offline and offline[0].stat().st_size > 0


def test_numbers_do_not_depend_on_the_batch_size(tmp_path):
    # the random explainer's maps are bit-identical in any batch; a gradient method's maps can move by
    # 1e-7 with the batch size (float reductions), enough to swap pixels tied at a threshold
    data = image_folder(tmp_path / "images")
    results = []
    for batch in (1, 7):
        cfg = compose_train(
            [
                *TINY_OVERRIDES,
                *FAST_METRICS,
                "data=folder",
                f"data.root={data}",
                "logger=none",
                f"data.batch_size={batch}",
                "explainers=[random]",
            ],
            tmp_path / f"batch{batch}",
            config="evaluate",
        )
        results.append(evaluate(cfg))
    # per-image values move by ~1e-7 with the batch size (the model's float reductions); on 7 images BCa's
    # bias correction counts the resamples whose mean is below the observed one, and ~0.6 % of them are
    # permutations of the sample whose mean equals it up to that rounding: the ends move by up to ~1e-4
    assert_close_results(results[0], results[1], 1e-5, interval_tolerance=1e-3)
    assert results[0]["random"]["images"] == 7


def test_two_processes_give_the_numbers_of_one(tmp_path):
    data = image_folder(tmp_path / "images", boxes=tmp_path / "boxes")
    common = [
        *TINY_OVERRIDES,
        *FAST_METRICS,
        "data=folder",
        f"data.root={data}",
        f"data.boxes_dir={tmp_path / 'boxes'}",
        "data.batch_size=1",
        "explainers=[gradcam,random]",
        "logger=none",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        # the metrics that explain again (issue #17), on small settings
        "metrics.randomisation={layers: [layer4.0, fc]}",
        "metrics.random_logit=true",
        *(f"metrics.{name}={{samples: 2}}" for name in ("max_sensitivity", "avg_sensitivity", "local_lipschitz")),
    ]
    results, per_image = [], []
    for name, extra in (("one", []), ("two", ["trainer=ddp", "trainer.devices=2"])):
        cwd = tmp_path / name
        cwd.mkdir()
        result = run_cli([*common, *extra], cwd=cwd, script="evaluate.py", timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
        results.append(json.loads((run_dir_of(cwd) / "metrics.json").read_text()))
        with open(run_dir_of(cwd) / "per_image.csv") as handle:
            rows = csv.DictReader(handle)
            per_image.append(sorted((r["explainer"], r["key"], int(r["index"]), float(r["value"])) for r in rows))
        if name == "two":
            assert (run_dir_of(cwd) / "evaluate_ddp_process_1.log").is_file() or "rank: 1" in result.stderr
    assert results[1]["gradcam"]["images"] == 7  # every image once: no padding by the distributed sampler
    # the same per-image values, hence the same intervals and paired comparisons (compared within 1e-6 above)
    # 2 explainers, 7 images, 29 per-image keys (the sensitivities leave out images with a blank map)
    keys = {row[1] for row in per_image[1]}
    assert {"randomisation", "randomisation_ssim", "random_logit", "max_sensitivity", "local_lipschitz"} <= keys
    assert {"pointing_game", "relevance_mass", "relevance_rank", "box_iou"} <= keys  # with boxes
    assert len(keys) == 29 and len(per_image[0]) == len(per_image[1]) > 2 * 7 * 27
    for mine, theirs in zip(per_image[0], per_image[1], strict=True):
        relative = 1e-4 if mine[1] in ROBUSTNESS_KEYS else 0.0
        assert mine[:3] == theirs[:3] and math.isclose(mine[3], theirs[3], rel_tol=relative, abs_tol=1e-6), mine
    assert {"AD@15_ci_low", "road_morf_ci_high", "randomisation@fc", "local_lipschitz_ci_low"} <= set(
        results[1]["gradcam"]
    )
    assert {"AD@15_vs_gradcam_ci_low", "insertion_auc_vs_gradcam_p"} <= set(results[1]["random"])
    assert_close_results(results[0], results[1], 1e-6)


def test_bf16_mixed_precision_scores_close_to_32_true(tmp_path):
    """Maps, quantiles and metrics run in float32 under autocast: only the backbone's passes are in bf16."""
    data = image_folder(tmp_path / "images", count=4)
    rows = {}
    for precision in ("32-true", "bf16-mixed"):
        overrides = [*TINY_OVERRIDES, *FAST_METRICS, "data=folder", f"data.root={data}", "logger=none",
                     f"trainer.precision={precision}", "explainers=[gradcam]"]  # fmt: skip
        rows[precision] = evaluate(compose_train(overrides, tmp_path / precision, config="evaluate"))["gradcam"]
    row, exact = rows["bf16-mixed"], rows["32-true"]
    assert all(math.isfinite(value) for value in row.values())
    for key in REQUIRED:  # measured: AD within 0.03 points, the AUCs within 6e-5, no share changed
        if key.startswith("AD@"):
            assert row[key] == pytest.approx(exact[key], abs=0.5), key
        elif key.startswith(("IC@", "road")):  # a share of 4 images: at most one may flip
            assert abs(row[key] - exact[key]) <= (100 if key.startswith("IC@") else 1) / 4 + 1e-9, key
        else:
            assert row[key] == pytest.approx(exact[key], abs=5e-3), key


def test_bad_explainers_fail_clearly_and_the_others_are_still_written(tmp_path):
    data = image_folder(tmp_path / "images", count=4)
    train_cfg = compose_train([*TINY_OVERRIDES, "trainer.max_steps=2", "data.num_workers=0"], tmp_path / "train")
    train(train_cfg)
    checkpoint = tmp_path / "train" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    base = [
        *FAST_METRICS,
        "data=folder",
        f"data.root={data}",
        "logger=none",
        "data.resize_size=72",
        "data.crop_size=64",
    ]

    # a trained head on its own backbone is just another explainer
    cfg = compose_train(
        [*TINY_OVERRIDES, *base, "explainers=[tame,random]", f"heads.tame.checkpoint={checkpoint}"],
        tmp_path / "good",
        config="evaluate",
    )
    results = evaluate(cfg)
    assert set(results) == {"tame", "random"} and results["tame"]["images"] == 4

    other_backbone = [o.replace("test_resnet", "test_efficientnet") for o in TINY_OVERRIDES]
    cfg = compose_train(
        [*other_backbone, *base, "explainers=[tame,nosuch,random]", f"heads.tame.checkpoint={checkpoint}"],
        tmp_path / "bad",
        config="evaluate",
    )
    with pytest.raises(EvaluationFailed) as failure:
        evaluate(cfg)
    message = str(failure.value)
    assert "unknown explainer 'nosuch'" in message and "gradcam" in message  # lists the available ones
    assert "'test_resnet'" in message and "'test_efficientnet'" in message  # names both backbones
    written = json.loads((tmp_path / "bad" / "metrics.json").read_text())
    assert set(written) == {"random"} and written["random"]["images"] == 4
    run = json.loads((tmp_path / "bad" / "run.json").read_text())
    assert set(run["failed"]) == {"tame", "nosuch"}
    assert "nosuch" in (tmp_path / "bad" / "report.md").read_text()


def test_missing_box_files_and_missing_heads_are_named(tmp_path):
    data = image_folder(tmp_path / "images", count=3)
    (tmp_path / "boxes").mkdir()
    cfg = compose_train(
        [
            *TINY_OVERRIDES,
            *FAST_METRICS,
            "data=folder",
            f"data.root={data}",
            "logger=none",
            f"data.boxes_dir={tmp_path / 'boxes'}",
            "explainers=[random]",
        ],
        tmp_path,
        config="evaluate",
    )
    with pytest.raises(FileNotFoundError, match=r"no <image stem>\.xml box file for 3 of 3 images.*img"):
        evaluate(cfg)
    cfg = compose_train(
        [*TINY_OVERRIDES, *FAST_METRICS, "data=folder", f"data.root={data}", "logger=none", "explainers=[tame,random]"],
        tmp_path / "head",
        config="evaluate",
    )
    with pytest.raises(EvaluationFailed, match=r"heads\.tame\.checkpoint=PATH"):
        evaluate(cfg)


def test_mean_rank_orders_by_the_primary_metrics():
    results = {
        "good": {"AD@15": 10.0, "IC@15": 30.0, "deletion_auc": 0.1, "insertion_auc": 0.7},
        "bad": {"AD@15": 50.0, "IC@15": 5.0, "deletion_auc": 0.4, "insertion_auc": 0.3},
        "mixed": {"AD@15": 20.0, "IC@15": 30.0, "deletion_auc": 0.5, "insertion_auc": 0.5},
    }
    columns = metric_columns({name: metric_registry.create(name) for name in metric_registry.available()})
    assert [c.key for c in columns if c.primary] == [
        "AD@15", "IC@15", "deletion_auc", "insertion_auc", "road_morf", "road_lerf"
    ]  # fmt: skip
    ranks = mean_ranks(results, columns)
    assert ranks["good"] == pytest.approx((1 + 1.5 + 1 + 1) / 4)
    assert ranks["mixed"] == pytest.approx((2 + 1.5 + 3 + 2) / 4)
    assert ranks["bad"] == pytest.approx((3 + 3 + 2 + 3) / 4)


def test_a_trained_sacam_head_is_evaluated_beside_cam_and_its_export_loads(tmp_path):
    data = image_folder(tmp_path / "images", count=4)
    run = tmp_path / "train"
    overrides = [*TINY_OVERRIDES, "head=sacam", "trainer.max_steps=2", "data.num_workers=0"]
    train(compose_train(overrides, run))
    checkpoint = run / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["tame_lit"]["head"] == "sacam" and saved["tame_lit"]["head_options"]["init_from_classifier"]
    assert any(key.endswith(".gamma") for key in saved["state_dict"])
    images = torch.rand(3, 3, 64, 64)
    from tame_lit import load_explainer

    backbone = load_explainer(checkpoint).backbone  # random weights: one copy for both
    exported, trained = load_explainer(run / "export", backbone=backbone), load_explainer(checkpoint, backbone=backbone)
    torch.testing.assert_close(exported(images), trained(images))
    base = [*FAST_METRICS, "data=folder", f"data.root={data}", "logger=none"]
    cfg = compose_train(
        [*TINY_OVERRIDES, *base, "explainers=[sacam,cam,random]", f"heads.sacam.checkpoint={checkpoint}"],
        tmp_path / "evaluate",
        config="evaluate",
    )
    results = evaluate(cfg)
    assert set(results) == {"sacam", "cam", "random"}
    assert all(results[name]["images"] == 4 for name in results)


def test_an_ablation_table_tells_the_trained_variants_apart(tmp_path):
    """Trained heads under any name (`+heads.<name>.checkpoint`), each cited with its head, variant and
    training steps; the data subset is cited too."""
    data = image_folder(tmp_path / "images", count=6)
    checkpoints = {}
    for variant in ("standard", "no_skip"):
        run = tmp_path / variant
        train(
            compose_train(
                [*TINY_OVERRIDES, f"head.variant={variant}", "trainer.max_steps=2", "data.num_workers=0"], run
            )
        )
        checkpoints[variant] = run / "checkpoints" / "last.ckpt"
    exported = trained_head_settings(tmp_path / "no_skip" / "export")
    assert exported["head"] == "tame" and exported["variant"] == "no_skip"
    weights = (tmp_path / "no_skip" / "export" / "head.safetensors").read_bytes()
    assert exported["weights_sha256"] == hashlib.sha256(weights).hexdigest()  # two heads in one folder: told apart
    cfg = compose_train(
        [
            *TINY_OVERRIDES,
            *FAST_METRICS,
            "data=folder",
            f"data.root={data}",
            "data.limit_per_class=2",
            "logger=none",
            "explainers=[standard,no_skip]",
            *(f"+heads.{name}.checkpoint={path}" for name, path in checkpoints.items()),
        ],
        tmp_path / "evaluate",
        config="evaluate",
    )
    results = evaluate(cfg)
    assert set(results) == {"standard", "no_skip"} and results["no_skip"]["images"] == 4  # 2 per class
    assert results["standard"]["insertion_auc"] != results["no_skip"]["insertion_auc"]  # two different heads
    run = json.loads((tmp_path / "evaluate" / "run.json").read_text())
    for name, path in checkpoints.items():
        cited = run["explainers"][name]
        assert cited["checkpoint"] == str(path.resolve()) and cited["head"] == "tame"
        assert cited["variant"] == name and cited["step"] == 2
    assert run["data"]["limit_per_class"] == 2
    assert "'variant': 'no_skip'" in (tmp_path / "evaluate" / "report.md").read_text()


class MapMass(FaithfulnessMetric):
    """A toy metric, registered the documented way: the mean value of each map (scaled), per image."""

    def __init__(self, scale: float = 1.0, **kwargs) -> None:
        super().__init__(per_image_keys=["map_mass"], **kwargs)
        self.scale = scale
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, batch: ScoredBatch) -> None:
        values = self.scale * batch.maps.double().mean(dim=(1, 2))
        self.total = self.total + values.sum()
        self.count = self.count + batch.size
        self.record(batch.indices, map_mass=values)

    def compute(self) -> dict[str, float]:
        return {"map_mass": float(self.total) / max(int(self.count), 1)}

    def columns(self) -> list[Column]:
        return [Column("map_mass", "Map mass ↓", False, primary=True)]


def test_a_registered_metric_reaches_every_output_without_editing_the_evaluation(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(metric_registry.METRICS, "map_mass", MapMass)
    data = image_folder(tmp_path / "images", count=3)
    overrides = [*TINY_OVERRIDES, "data=folder", f"data.root={data}", "data.num_workers=0", "logger=none"]
    overrides += ["explainers=[gradcam,random]", "+metrics={map_mass: {scale: 2.0}}", "~metrics.road"]
    overrides += ["~metrics.deletion", "~metrics.pointing", "metrics.ad_ic.keep=[0.5]"]
    overrides += [
        f"~metrics.{name}" for name in ("sparseness", "complexity", "relevance_mass", "relevance_rank", "box_iou")
    ]
    cfg = compose_train(overrides, tmp_path / "run", config="evaluate")
    results = evaluate(cfg)
    run_dir = tmp_path / "run"
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written == json.loads(json.dumps(results))
    scored = ("AD@50", "IC@50", "map_mass")  # each gets its interval, and a paired comparison with gradcam
    intervals = {f"{key}_ci_{side}" for key in scored for side in ("low", "high")}
    compared = {f"{key}_vs_gradcam{part}" for key in scored for part in ("", "_ci_low", "_ci_high", "_p", "_outcome")}
    assert set(written["gradcam"]) == {*scored, "images", "seconds_per_image", *intervals}
    assert set(written["random"]) == {*scored, "images", "seconds_per_image", *intervals, *compared}
    for name in ("gradcam", "random"):
        assert 0 < written[name]["map_mass"] <= 2.0
    with open(run_dir / "metrics.csv") as handle:
        header = handle.readline().strip().split(",")
    assert header[:4] == ["explainer", "AD@50", "IC@50", "map_mass"] and "map_mass_ci_low" in header
    report = (run_dir / "report.md").read_text()
    assert "Map mass ↓" in report and "rank over Map mass (" in report  # AD@50 is not ranked by default
    assert "Map mass" in capsys.readouterr().out  # the terminal table
    run = json.loads((run_dir / "run.json").read_text())
    assert run["metrics"]["options"]["map_mass"] == {"scale": 2.0}
    # its per-image values are kept, by dataset index, and average to the reported number
    with open(run_dir / "per_image.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row["key"] == "map_mass"]
    for name in ("gradcam", "random"):
        values = {int(row["index"]): float(row["value"]) for row in rows if row["explainer"] == name}
        assert sorted(values) == [0, 1, 2]
        assert sum(values.values()) / 3 == pytest.approx(written[name]["map_mass"], abs=1e-9)


def test_a_holdout_evaluation_cites_the_training_folder_not_the_ignored_root():
    from tame_lit.evaluate import _cited_data

    data = {"_target_": "tame_lit.data.ImageDataModule", "root": "val", "train_root": "train", "limit": 4}
    assert _cited_data(data) == {"name": "ImageDataModule", "root": "val", "limit": 4}
    held_out = _cited_data({**data, "holdout_per_class": 50})
    assert held_out == {"name": "ImageDataModule", "train_root": "train", "holdout_per_class": 50, "limit": 4}


def test_the_heatmap_grid_spans_classes_and_fills_up_with_repeats():
    """Images sorted by class (as folders load): the grid takes the first image of each class; a set with
    fewer classes than the grid fills up with the first repeats."""
    from tame_lit.evaluation import Grid

    def grid_of(batches: list[list[int]], size: int) -> list[int]:
        grid, seen = Grid(size), 0
        for keys in batches:
            rows = grid.rows_to_keep(keys)
            grid.images.extend(torch.tensor([float(seen + row)]) for row in rows)
            grid.predictions.extend(keys[row] for row in rows)
            grid.probabilities.extend(0.5 for _ in rows)
            grid.maps.setdefault("cam", []).extend(torch.tensor([float(seen + row)]) for row in rows)
            seen += len(keys)
        images, predictions, _, maps = grid.selected()
        assert [float(m) for m in maps["cam"]] == [float(i) for i in images]  # maps stay with their images
        return predictions

    assert grid_of([[0, 0, 0], [0, 1, 1], [2, 2, 3], [4]], size=4) == [0, 1, 2, 3]
    assert grid_of([[7, 7], [7, 8]], size=3) == [7, 8, 7]  # two classes: the first repeat fills the grid


def test_a_subset_explainer_scores_the_first_images_of_each_class_paired_on_those(tmp_path):
    """``subset_per_class``: the ``subset_explainers`` score only the first N images of each class; their values on
    those images are those of the full run, and its comparison pairs them with the reference's."""
    data = image_folder(tmp_path / "images")  # folder order: a/img1, a/img3, a/img5, b/img0, b/img2, ...
    overrides = [
        *TINY_OVERRIDES,
        *FAST_METRICS,
        "data=folder",
        f"data.root={data}",
        "data.batch_size=3",  # the last batch (index 6) holds nothing of the subset
        "logger=none",
        "explainers=[random,random_subset]",
        "+explainer.random_subset={name: random}",
        "compare_to=random",
        "subset_per_class=2",
        "subset_explainers=[random_subset,scorecam]",  # scorecam: a known method, not evaluated here
    ]
    cfg = compose_train(overrides, tmp_path / "run", config="evaluate")
    results = evaluate(cfg)
    assert results["random"]["images"] == 7 and results["random_subset"]["images"] == 4
    run_dir = tmp_path / "run"
    with open(next(run_dir.rglob("per_image.csv"))) as handle:
        rows = [row for row in csv.DictReader(handle) if row["key"] == "AD@15"]
    values = {name: {int(r["index"]): float(r["value"]) for r in rows if r["explainer"] == name} for name in results}
    assert sorted(values["random_subset"]) == [0, 1, 3, 4]  # the first two of class a, then of class b
    assert all(values["random_subset"][i] == values["random"][i] for i in values["random_subset"])
    subset = results["random_subset"]
    assert subset["AD@15_vs_random"] == 0 and subset["AD@15_vs_random_outcome"] == 0  # paired on those 4
    assert subset["AD@15"] == pytest.approx(sum(values["random_subset"].values()) / 4)
    run = json.loads(next(run_dir.rglob("run.json")).read_text())
    assert run["explainers"]["random_subset"]["subset_per_class"] == 2
    assert (next(run_dir.rglob("heatmaps.png"))).stat().st_size > 1000
    header = next(line for line in next(run_dir.rglob("report.md")).read_text().splitlines() if "mean rank" in line)
    assert "| images |" in header  # the counts differ, so the table shows them

    for wrong, named in (("subset_explainers=[nosuch]", "nosuch"), ("subset_per_class=0", "subset_per_class")):
        bad = compose_train([*overrides, wrong], tmp_path / "bad", config="evaluate")
        with pytest.raises(ValueError, match=named):
            evaluate(bad)
