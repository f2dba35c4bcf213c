"""Join evaluation runs of the same images into one: shards of the image set (``data.num_shards`` /
``data.shard``) and runs of different explainers, as if one run had scored everything.

An evaluation of every explainer on a large set can take longer than one sitting (days of CPU), or be spread
over machines: each run scores a shard or some explainers, and ``merge_runs`` rebuilds the whole table from
their per-image values (``per_image.csv``). Means, intervals and paired comparisons are recomputed from those
values, so they equal what one run over everything gives; curves are averaged weighted by images. Runs must
agree on the model (weights fingerprint), the data settings, the metric options and the statistics settings;
an explainer scored in several runs must have the same settings there and, on images two runs share, the same
values (a repeated reference such as Grad-CAM in each run of a split by explainer). The heatmap grid, made of
images no run keeps, is not rebuilt: see the runs' own ``heatmaps.png``.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tame_lit import __version__, statistics
from tame_lit.metrics import Column
from tame_lit.report import write_report

__all__ = ["MergeError", "merge_runs"]

# the files an evaluation run writes that a merge reads
RUN_FILES = ("metrics.json", "curves.json", "run.json", "per_image.csv")
# settings that must be equal in every merged run (run.json keys), besides the data without its shard
SAME_IN_EVERY_RUN = ("columns", "precision")
SHARD_KEYS = ("num_shards", "shard")
# per-image values of one image, scored twice, must agree to this (deterministic methods give equal values;
# another batch size moves float reductions by ~1e-7)
VALUE_TOLERANCE = 1e-6


class MergeError(ValueError):
    """The runs cannot be merged: names the run, the setting or explainer at fault and what would be valid."""


@dataclass
class _Run:
    path: Path
    results: dict[str, dict[str, float]]
    curves: dict[str, dict[str, Any]]
    run: dict[str, Any]
    values: dict[str, dict[str, dict[int, float]]]  # explainer -> key -> {image index: value}

    @property
    def shard(self) -> tuple[int, int]:
        data = self.run.get("data", {})
        return int(data.get("shard", 0)), int(data.get("num_shards", 1))

    @property
    def data(self) -> dict[str, Any]:
        """The run's data settings without its shard: what every merged run must share."""
        return {key: value for key, value in self.run.get("data", {}).items() if key not in SHARD_KEYS}

    def images_of(self, name: str) -> frozenset[int]:
        return frozenset(index for values in self.values.get(name, {}).values() for index in values)


def read_run(path: str | Path) -> _Run:
    """An evaluation's run directory, checked for the files a merge needs."""
    path = Path(path)
    missing = [name for name in RUN_FILES if not (path / name).is_file()]
    if missing:
        raise MergeError(
            f"{path} is not a complete evaluation run: {', '.join(missing)} missing (a run directory of "
            "evaluate.py holds " + ", ".join(RUN_FILES) + ")"
        )
    run = json.loads((path / "run.json").read_text())
    if "columns" not in run:
        raise MergeError(f"{path / 'run.json'} has no 'columns' (written by an older tame-lit): evaluate again")
    values: dict[str, dict[str, dict[int, float]]] = {}
    with open(path / "per_image.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            values.setdefault(row["explainer"], {}).setdefault(row["key"], {})[int(row["index"])] = float(row["value"])
    return _Run(
        path,
        json.loads((path / "metrics.json").read_text()),
        json.loads((path / "curves.json").read_text()),
        run,
        values,
    )


def merge_runs(
    run_dirs: Sequence[str | Path], out_dir: str | Path, compare_to: str | None = None
) -> dict[str, dict[str, float]]:
    """Merge the evaluation runs in ``run_dirs`` into ``out_dir`` (metrics.json/csv, curves.json, run.json,
    per_image.csv, report.md, plots); returns the merged ``{explainer: {key: value}}``. ``compare_to``: the
    reference of the paired comparisons (default: the runs' own)."""
    if not run_dirs:
        raise MergeError("nothing to merge: give the run directories of evaluate.py")
    runs = [read_run(path) for path in run_dirs]
    _check_compatible(runs)
    first = runs[0]
    columns = [Column(**column) for column in first.run["columns"]]
    settings = first.run.get("statistics")
    if not settings:
        raise MergeError(f"{first.path / 'run.json'} records no statistics settings: evaluate again")
    reference = compare_to if compare_to is not None else settings.get("compare_to")
    names = list(dict.fromkeys(name for run in runs for name in run.results))
    if reference is not None and reference not in names:
        raise MergeError(f"compare_to={reference!r} is not among the merged explainers {names}")

    results: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, Any]] = {}
    per_image: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    explainer_settings: dict[str, Any] = {}
    for name in names:
        parts = _distinct_parts(name, [run for run in runs if name in run.results])
        explainer_settings[name] = parts[0].run.get("explainers", {}).get(name, {})
        merged = {key: {} for part in parts for key in part.values.get(name, {})}
        for part in parts:
            for key, values in part.values.get(name, {}).items():
                merged[key].update(values)
        per_image[name] = {key: _by_index(key, values) for key, values in merged.items()}
        results[name] = _merged_row(name, parts, merged)
        curves[name] = _merged_curves(name, parts)
    # the runs' own settings (every evaluation records them; _check_compatible made them equal)
    found = statistics.summarise(
        per_image, columns, reference, float(settings["confidence"]), int(settings["resamples"]), int(settings["seed"])
    )
    for name, values in found.items():
        results[name].update(values)

    shards = sorted({run.shard for run in runs})
    by_shard = {run.shard: run for run in runs}  # one run per shard: the same images, the same backbone pass
    labelled = sum(int(run.run.get("labelled_images") or 0) for run in by_shard.values())
    correct = sum(
        float(run.run.get("top1_accuracy") or 0.0) * int(run.run.get("labelled_images") or 0)
        for run in by_shard.values()
    )
    data = first.data
    if shards[0][1] > 1:
        data["shards"] = f"{', '.join(str(shard) for shard, _ in shards)} of {shards[0][1]}"
    summary = {
        "top1_accuracy": correct / labelled if labelled else None,
        "labelled_images": labelled,
        "skipped_images": sum(int(run.run.get("skipped_images") or 0) for run in by_shard.values()),
        "failed": {name: error for run in runs for name, error in (run.run.get("failed") or {}).items()},
        "statistics": {**settings, "compare_to": reference},
    }
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "version": __version__,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "merged_from": [str(run.path) for run in runs],
        "backbone": first.run.get("backbone", {}),
        "data": data,
        "images": int(max((row.get("images", 0) for row in results.values()), default=0)),
        "precision": first.run.get("precision"),
        "processes": first.run.get("processes"),
        "explainers": explainer_settings,
        "metrics": first.run.get("metrics", {}),
    }
    write_report(out_dir, results, columns, curves, summary, meta, per_image=per_image)
    return results


def _check_compatible(runs: Sequence[_Run]) -> None:
    """Refuse runs of another model, other images, other metric or statistics settings: their numbers do not
    belong in one table."""
    first = runs[0]

    def settings(run: _Run) -> dict[str, Any]:
        return {
            "backbone.fingerprint": run.run.get("backbone", {}).get("fingerprint"),
            "backbone.name": run.run.get("backbone", {}).get("name"),
            "data": run.data,
            "metrics.options": run.run.get("metrics", {}).get("options"),
            "metrics.seed": run.run.get("metrics", {}).get("seed"),
            "statistics": {k: v for k, v in (run.run.get("statistics") or {}).items() if k != "compare_to"},
            "num_shards": run.shard[1],
            **{key: run.run.get(key) for key in SAME_IN_EVERY_RUN},
        }

    expected = settings(first)
    for run in runs[1:]:
        found = settings(run)
        for key, value in expected.items():
            if found[key] != value:
                raise MergeError(
                    f"{run.path} differs from {first.path} in {key}: {found[key]!r} vs {value!r}; merge only runs of "
                    "the same model, data (all but data.shard), metric settings, statistics settings and number of "
                    "shards"
                )
        for name in set(run.results) & set(first.results):
            theirs, mine = run.run.get("explainers", {}).get(name), first.run.get("explainers", {}).get(name)
            if theirs != mine:
                raise MergeError(f"explainer {name!r} has other settings in {run.path} ({theirs}) than in {first.path} "
                                 f"({mine}): give it another name in one of the runs")  # fmt: skip


def _distinct_parts(name: str, parts: list[_Run]) -> list[_Run]:
    """The runs that scored ``name`` on distinct images: a run scoring the images another already did (the
    same shard) must agree with it value by value and is dropped; a partial overlap is refused."""
    kept: list[_Run] = []
    for part in parts:
        images = part.images_of(name)
        twin = next((other for other in kept if other.images_of(name) == images), None)
        if twin is not None:
            _check_same_values(name, twin, part)
            continue
        overlap = next((other for other in kept if other.images_of(name) & images), None)
        if overlap is not None:
            shared = len(overlap.images_of(name) & images)
            raise MergeError(
                f"explainer {name!r} scored {shared} of the same images in {overlap.path} and {part.path}, but not "
                "the same set: merge shards of one data.num_shards, or runs of the same images"
            )
        kept.append(part)
    return kept


def _check_same_values(name: str, first: _Run, second: _Run) -> None:
    for key, values in first.values[name].items():
        other = second.values[name].get(key, {})
        for index, value in values.items():
            theirs = other.get(index, math.nan)
            if not math.isclose(value, theirs, rel_tol=VALUE_TOLERANCE, abs_tol=VALUE_TOLERANCE):
                raise MergeError(
                    f"explainer {name!r} gave {key} = {value!r} on image {index} in {first.path} but {theirs!r} in "
                    f"{second.path}: the same explainer on the same images must give the same values"
                )


def _by_index(key: str, values: Mapping[int, float]) -> dict[str, torch.Tensor]:
    """One key's per-image values in the shape the evaluation keeps them, ordered by image index."""
    order = sorted(values)
    return {
        "index": torch.tensor(order, dtype=torch.long),
        key: torch.tensor([values[index] for index in order], dtype=torch.float64),
    }


def _merged_row(name: str, parts: Sequence[_Run], merged: Mapping[str, Mapping[int, float]]) -> dict[str, float]:
    """The mean of every per-image key over all the images; counts summed; the other keys (timing) weighted
    by each run's images. Intervals and comparisons are recomputed afterwards."""
    rows = [part.results[name] for part in parts]
    weights = [float(row.get("images", 0)) for row in rows]
    row: dict[str, float] = {}
    for key in dict.fromkeys(key for r in rows for key in r):
        if "_ci_" in key or "_vs_" in key:
            continue
        if key in merged:
            values = list(merged[key].values())
            row[key] = math.fsum(values) / len(values) if values else math.nan
        elif key == "images" or key.endswith("_images"):
            row[key] = float(sum(r.get(key, 0) for r in rows))
        else:
            pairs = [(r[key], w) for r, w in zip(rows, weights, strict=True) if key in r and _finite(r[key])]
            total = sum(w for _, w in pairs)
            row[key] = math.fsum(v * w for v, w in pairs) / total if total else math.nan
    return row


def _merged_curves(name: str, parts: Sequence[_Run]) -> dict[str, Any]:
    """Each mean curve averaged over the runs, weighted by their images (the curves share one x grid)."""
    curves: dict[str, Any] = {}
    for key in dict.fromkeys(key for part in parts for key in part.curves.get(name, {})):
        found = [(part.curves[name][key], float(part.results[name].get("images", 0))) for part in parts
                 if key in part.curves.get(name, {})]  # fmt: skip
        x = found[0][0]["x"]
        if any(curve["x"] != x for curve, _ in found):
            raise MergeError(f"the {key!r} curves of {name!r} have other x grids in some runs: other metric settings")
        total = sum(weight for _, weight in found)
        y = [math.fsum(curve["y"][i] * weight for curve, weight in found) / total for i in range(len(x))]
        curves[key] = {**found[0][0], "y": y}
    return curves


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
