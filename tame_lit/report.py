"""What an evaluation leaves behind: metrics.json/csv, curves.json, plots, a heatmap grid and report.md.

Every file is written atomically, so an interrupted run never leaves a half-written report in place of a
good one. ``write_report`` returns the paths it wrote.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tame_lit.io import atomic_path, write_json
from tame_lit.viz import curve_plot, explainer_grid, save_figure

__all__ = ["COLUMNS", "Column", "mean_ranks", "metrics_table", "print_table", "write_report"]


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    higher_is_better: bool | None  # None: not a faithfulness score (not ranked)
    digits: int = 3
    primary: bool = False  # counted in the mean rank


COLUMNS: tuple[Column, ...] = (
    Column("AD@100", "AD@100 ↓", False, 2),
    Column("IC@100", "IC@100 ↑", True, 1),
    Column("AD@50", "AD@50 ↓", False, 2),
    Column("IC@50", "IC@50 ↑", True, 1),
    Column("AD@15", "AD@15 ↓", False, 2, primary=True),
    Column("IC@15", "IC@15 ↑", True, 1, primary=True),
    Column("deletion_auc", "Deletion ↓", False, primary=True),
    Column("insertion_auc", "Insertion ↑", True, primary=True),
    Column("road_morf", "ROAD MoRF ↓", False, primary=True),
    Column("road_lerf", "ROAD LeRF ↑", True, primary=True),
    Column("AD@20", "AD@20 ↓", False, 2),  # An & Joe's "first 20 %", both readings
    Column("IC@20", "IC@20 ↑", True, 1),
    Column("deletion_auc_first20", "Del. 20 % ↓", False),
    Column("insertion_auc_first20", "Ins. 20 % ↑", True),
    Column("pointing_game", "Pointing ↑", True),
    Column("energy_pointing_game", "Energy PG ↑", True),
    Column("seconds_per_image", "s / image", None, 4),
)


def mean_ranks(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Each explainer's mean rank (1 = best) over the primary metrics present: one honest summary line,
    since the metrics can disagree (a method can win deletion and lose ROAD)."""
    ranks: dict[str, list[float]] = {name: [] for name in results}
    for column in COLUMNS:
        if not column.primary:
            continue
        scored = {name: row[column.key] for name, row in results.items() if _finite(row.get(column.key))}
        if len(scored) < 2:
            continue
        for name, value in scored.items():
            better = sum((other > value) if column.higher_is_better else (other < value) for other in scored.values())
            ties = sum(other == value for other in scored.values()) - 1
            ranks[name].append(1 + better + ties / 2)
    return {name: sum(values) / len(values) for name, values in ranks.items() if values}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _present_columns(results: Mapping[str, Mapping[str, float]]) -> list[Column]:
    return [c for c in COLUMNS if any(_finite(row.get(c.key)) for row in results.values())]


def metrics_table(
    results: Mapping[str, Mapping[str, float]], bold_best: bool = True
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table (explainers sorted by mean rank; best value per column in
    bold, markdown style)."""
    columns = _present_columns(results)
    ranks = mean_ranks(results)
    names = sorted(results, key=lambda n: (ranks.get(n, math.inf), n))
    best: dict[str, float] = {}
    for column in columns:
        values = [row[column.key] for row in results.values() if _finite(row.get(column.key))]
        if column.higher_is_better is not None and len(set(values)) > 1:  # all equal: nobody is best
            best[column.key] = max(values) if column.higher_is_better else min(values)
    header = ["explainer", "mean rank ↓", *[c.title for c in columns]]
    rows = []
    for name in names:
        row = [name, f"{ranks[name]:.2f}" if name in ranks else ""]
        for column in columns:
            value = results[name].get(column.key)
            text = f"{value:.{column.digits}f}" if _finite(value) else ""
            if bold_best and text and column.key in best and value == best[column.key]:
                text = f"**{text}**"
            row.append(text)
        rows.append(row)
    return header, rows


def print_table(results: Mapping[str, Mapping[str, float]], title: str) -> None:
    """The summary table in the terminal, with rich."""
    from rich.console import Console
    from rich.table import Table

    header, rows = metrics_table(results)
    table = Table(title=title, show_lines=False)
    for index, name in enumerate(header):
        table.add_column(name, justify="left" if index == 0 else "right")
    for row in rows:  # markdown bold (the best value) becomes rich bold
        table.add_row(*[f"[bold]{cell[2:-2]}[/bold]" if cell.startswith("**") else cell for cell in row])
    Console(width=max(160, 14 * len(header))).print(table)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def _write_csv(path: Path, results: Mapping[str, Mapping[str, float]]) -> None:
    keys = sorted({key for row in results.values() for key in row})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["explainer", *keys])
    for name, row in results.items():
        writer.writerow([name, *[row.get(key, "") for key in keys]])
    _write_text(path, buffer.getvalue())


def _curve_figures(curves: Mapping[str, Mapping[str, Any]], results: Mapping[str, Mapping[str, float]]) -> dict:
    figures = {}
    deletion = {
        f"{name} (AUC {results[name].get('deletion_auc', float('nan')):.3f})": (c["deletion_insertion"]["fraction"],
                                                                                 c["deletion_insertion"]["deletion"])
        for name, c in curves.items() if "deletion_insertion" in c
    }  # fmt: skip
    if deletion:
        insertion = {
            f"{name} (AUC {results[name].get('insertion_auc', float('nan')):.3f})": (
                c["deletion_insertion"]["fraction"], c["deletion_insertion"]["insertion"])
            for name, c in curves.items() if "deletion_insertion" in c
        }  # fmt: skip
        figures["deletion.png"] = curve_plot(
            deletion, "Deletion (lower is better)", "fraction of pixels deleted", "probability of the class"
        )
        figures["insertion.png"] = curve_plot(
            insertion, "Insertion (higher is better)", "fraction of pixels inserted", "probability of the class"
        )
    road, styles, groups = {}, {}, {}
    for name, c in curves.items():
        for order, style in (("road_morf", "-"), ("road_lerf", "--")):
            if order in c:
                label = f"{name} {order[5:].upper()}"
                road[label] = ([100 * x for x in c[order]["removed"]], c[order]["accuracy"])
                styles[label], groups[label] = style, name
    if road:
        figures["road.png"] = curve_plot(
            road, "ROAD (MoRF lower, LeRF higher is better)", "% of pixels removed", "top-1 kept", styles, groups
        )
    return figures


def write_report(
    run_dir: str | Path,
    results: Mapping[str, Mapping[str, float]],
    curves: Mapping[str, Mapping[str, Any]],
    summary: Mapping[str, Any],
    meta: Mapping[str, Any],
    grid_images: Sequence[torch.Tensor] = (),
    grid_maps: Mapping[str, Sequence[torch.Tensor]] | None = None,
    grid_titles: Sequence[str] = (),
) -> dict[str, Path]:
    """Write every output of an evaluation into ``run_dir``; returns ``{name: path}``."""
    run_dir = Path(run_dir)
    paths = {
        "metrics.json": run_dir / "metrics.json",
        "metrics.csv": run_dir / "metrics.csv",
        "curves.json": run_dir / "curves.json",
        "run.json": run_dir / "run.json",
    }
    write_json(paths["metrics.json"], {name: dict(row) for name, row in results.items()})
    _write_csv(paths["metrics.csv"], results)
    write_json(paths["curves.json"], {name: dict(c) for name, c in curves.items()})
    write_json(paths["run.json"], {**meta, **summary, "mean_rank": mean_ranks(results)})

    figures = _curve_figures(curves, results)
    if grid_images and grid_maps:
        maps = {name: torch.stack(list(m)) for name, m in grid_maps.items() if name in results and len(m)}
        if maps:
            figures["heatmaps.png"] = explainer_grid(torch.stack(list(grid_images)), maps, list(grid_titles))
    for name, figure in figures.items():
        paths[name] = run_dir / name
        save_figure(figure, paths[name])

    paths["report.md"] = run_dir / "report.md"
    _write_text(paths["report.md"], _markdown(results, summary, meta, figures))
    return paths


def _markdown(results: Mapping, summary: Mapping, meta: Mapping, figures: Mapping) -> str:
    header, rows = metrics_table(results)
    accuracy = summary.get("top1_accuracy")
    backbone = meta.get("backbone", {})
    lines = [
        f"# Explainer evaluation: {backbone.get('name', '?')} on {meta.get('data', {}).get('name', '?')}",
        "",
        f"- Date: {meta.get('date', '')}; tame-lit {meta.get('version', '')}; command: `{meta.get('command', '')}`",
        f"- Model: `{meta.get('backbone', {})}`",
        f"- Data: `{meta.get('data', {})}`; {meta.get('images', 0)} images evaluated"
        + (f", {summary.get('skipped_images')} unreadable images skipped" if summary.get("skipped_images") else ""),
        "- Backbone top-1 accuracy on these images: "
        + (
            f"{100 * accuracy:.2f} % ({summary.get('labelled_images')} labelled)"
            if accuracy is not None
            else "no labels"
        ),
        "- Explained class: each image's top-1 prediction on the clean image.",
        "",
        "## Results",
        "",
        _markdown_table(header, rows),
        "",
        "Best value per column in bold. *Mean rank* averages each explainer's rank over AD@15, IC@15, deletion, "
        "insertion, ROAD MoRF and ROAD LeRF (the metrics can disagree: read the columns, not only the rank).",
        "",
        "- **AD / IC @ p**: TAME's Average Drop / Increase in Confidence (%) with the top p % of each map's pixels "
        "kept at their soft values, the rest black.",
        "- **Deletion / Insertion**: area under the probability curve as pixels are removed (to black) or "
        "inserted (into a blurred copy) in map order.",
        "- **ROAD**: share of images whose top-1 survives removing the most (MoRF) / least (LeRF) relevant "
        "pixels, filled by noisy linear imputation; mean over the removal levels (per level in metrics.json).",
        "- **First 20 %** (An & Joe 2022; their definition is not public, so both readings): AD@20 / IC@20 with "
        "20 % kept, and *Del. / Ins. 20 %*, the deletion/insertion AUC over the first 20 % of pixels divided by 0.2.",
        "- **Pointing / energy PG**: pointing game (15 px tolerance) and energy-based pointing game over the images "
        "with a box of the explained class (when boxes were given).",
        "- **s / image**: seconds of explanation per image (after the first batch, which pays the warm-up).",
        "",
    ]
    if summary.get("failed"):
        lines += ["## Failed explainers", ""]
        lines += [f"- `{name}`: {error}" for name, error in summary["failed"].items()]
        lines.append("")
    lines += ["## Explainer settings", ""]
    lines += [f"- `{name}`: `{settings}`" for name, settings in meta.get("explainers", {}).items()]
    lines += ["", f"Metric settings: `{meta.get('metrics', {})}`", ""]
    if figures:
        lines += ["## Plots", ""]
        lines += [f"![{name}]({name})" for name in figures]
        lines.append("")
    return "\n".join(lines)
