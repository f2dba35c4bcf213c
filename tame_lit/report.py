"""What an evaluation leaves behind: metrics.json/csv, curves.json, plots, a heatmap grid and report.md.

Every file is written atomically, so an interrupted run never leaves a half-written report in place of a
good one. ``write_report`` returns the paths it wrote.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tame_lit.io import atomic_path, write_json
from tame_lit.metrics import Column
from tame_lit.statistics import comparison_keys, interval_keys
from tame_lit.viz import curve_plot, explainer_grid, save_figure

__all__ = ["comparison_table", "interval_table", "mean_ranks", "metrics_table", "print_table", "write_report"]

Results = Mapping[str, Mapping[str, float]]

# how a cell shows its paired outcome against the reference: better, same (within the interval), worse
OUTCOME_MARKS = {1: "▲", 0: "", -1: "▼"}


def mean_ranks(results: Results, columns: Sequence[Column]) -> dict[str, float]:
    """Each explainer's mean rank (1 = best) over the primary columns present: one honest summary line,
    since the metrics can disagree (a method can win deletion and lose ROAD)."""
    ranks: dict[str, list[float]] = {name: [] for name in results}
    for column in columns:
        if not column.primary or column.higher_is_better is None:
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


def _table_columns(results: Results, columns: Sequence[Column]) -> list[Column]:
    """The columns to show: those meant for the table, and the image count when explainers scored different
    numbers of images (``subset_per_class``)."""
    differ = len({row.get("images") for row in results.values()}) > 1
    return [
        c
        for c in columns
        if (c.table or (differ and c.key == "images")) and any(_finite(row.get(c.key)) for row in results.values())
    ]


def metrics_table(
    results: Results, columns: Sequence[Column], bold_best: bool = True, reference: str | None = None
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table (explainers sorted by mean rank; best value per column in
    bold, markdown style). With a ``reference`` (the explainer the others were compared with): each value
    marked ▲ / ▼ where its paired difference with the reference is significantly better / worse, and a
    win / tie / loss count per explainer."""
    ranks = mean_ranks(results, columns)
    columns = _table_columns(results, columns)
    names = sorted(results, key=lambda n: (ranks.get(n, math.inf), n))
    best: dict[str, float] = {}
    for column in columns:
        values = [row[column.key] for row in results.values() if _finite(row.get(column.key))]
        if column.higher_is_better is not None and len(set(values)) > 1:  # all equal: nobody is best
            best[column.key] = max(values) if column.higher_is_better else min(values)
    header = ["explainer", "mean rank ↓", *[c.title for c in columns]]
    if reference is not None:
        header.append(f"vs {reference} W/T/L")
    rows = []
    for name in names:
        row = [name, f"{ranks[name]:.2f}" if name in ranks else ""]
        outcomes = []
        for column in columns:
            value = results[name].get(column.key)
            text = f"{value:.{column.digits}f}" if _finite(value) else ""
            if bold_best and text and column.key in best and value == best[column.key]:
                text = f"**{text}**"
            outcome = results[name].get(comparison_keys(column.key, reference)["outcome"]) if reference else None
            if text and _finite(outcome):
                outcomes.append(int(outcome))
                text += OUTCOME_MARKS[int(outcome)]
            row.append(text)
        if reference is not None:
            row.append("reference" if name == reference else _win_tie_loss(outcomes))
        rows.append(row)
    return header, rows


def _win_tie_loss(outcomes: Sequence[int]) -> str:
    if not outcomes:
        return ""
    return f"{outcomes.count(1)}/{outcomes.count(0)}/{outcomes.count(-1)}"


def interval_table(results: Results, columns: Sequence[Column]) -> tuple[list[str], list[list[str]]]:
    """Each table value's confidence interval, ``[low, high]``, explainers in mean-rank order."""
    ranks = mean_ranks(results, columns)
    columns = [c for c in _table_columns(results, columns) if c.higher_is_better is not None]
    rows = []
    for name in sorted(results, key=lambda n: (ranks.get(n, math.inf), n)):
        row = [name]
        for column in columns:
            low, high = (results[name].get(key) for key in interval_keys(column.key))
            row.append(f"[{low:.{column.digits}f}, {high:.{column.digits}f}]" if _finite(low) and _finite(high) else "")
        rows.append(row)
    return ["explainer", *[c.title for c in columns]], rows


def comparison_table(results: Results, columns: Sequence[Column], reference: str) -> tuple[list[str], list[list[str]]]:
    """Each explainer minus ``reference``, image by image: mean difference, its interval and the paired test's
    p-value, marked ▲ / ▼ when significantly better / worse."""
    ranks = mean_ranks(results, columns)
    columns = [c for c in _table_columns(results, columns) if c.higher_is_better is not None]
    rows = []
    for name in sorted(results, key=lambda n: (ranks.get(n, math.inf), n)):
        if name == reference:
            continue
        row = [name]
        for column in columns:
            keys = comparison_keys(column.key, reference)
            found = {field: results[name].get(key) for field, key in keys.items()}
            if not all(_finite(value) for value in found.values()):
                row.append("")
                continue
            digits = column.digits
            row.append(
                f"{found['difference']:+.{digits}f} [{found['low']:+.{digits}f}, {found['high']:+.{digits}f}] "
                f"p={found['p_value']:.2g}{OUTCOME_MARKS[int(found['outcome'])]}"
            )
        rows.append(row)
    return ["explainer", *[c.title for c in columns]], rows


def print_table(
    results: Results, columns: Sequence[Column], title: str, statistics: Mapping[str, Any] | None = None
) -> None:
    """The summary table in the terminal, with rich; with ``statistics`` (an evaluation summary's: its
    ``compare_to`` and ``confidence``), the win / tie / loss against the reference."""
    from rich.console import Console
    from rich.table import Table

    statistics = statistics or {}
    reference = statistics.get("compare_to")
    header, rows = metrics_table(results, columns, reference=reference)
    table = Table(title=title, show_lines=False)
    for index, name in enumerate(header):
        table.add_column(name, justify="left" if index == 0 else "right")
    for row in rows:  # markdown bold (the best value) becomes rich bold
        table.add_row(*[_rich_cell(cell) for cell in row])
    console = Console(width=max(160, 14 * len(header)))
    console.print(table)
    if reference is not None:
        console.print(
            f"▲ / ▼: significantly better / worse than {reference} on the same images (the "
            f"{100 * statistics['confidence']:g} % interval of the paired difference lies on that side of zero and the "
            "paired test agrees); W/T/L counts them per explainer. Intervals and p-values: report.md."
        )


def _rich_cell(cell: str) -> str:
    if cell.startswith("**"):
        end = cell.index("**", 2)
        return f"[bold]{cell[2:end]}[/bold]{cell[end + 2 :]}"
    return cell


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def _write_csv(path: Path, results: Results, columns: Sequence[Column]) -> None:
    present = {key for row in results.values() for key in row}
    keys = [c.key for c in columns if c.key in present]
    keys += sorted(present - set(keys))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["explainer", *keys])
    for name, row in results.items():
        writer.writerow([name, *[row.get(key, "") for key in keys]])
    _write_text(path, buffer.getvalue())


def _write_per_image(path: Path, per_image: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]]) -> None:
    """One row per explainer, key and image (long format: metrics may score different images, e.g. the
    pointing game only those with a box of their class)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["explainer", "key", "index", "value"])
    for name, metrics in per_image.items():
        for values in metrics.values():
            indices = values["index"].tolist()
            for key, column in values.items():
                if key != "index":
                    writer.writerows(
                        [name, key, index, repr(value)] for index, value in zip(indices, column.tolist(), strict=True)
                    )
    _write_text(path, buffer.getvalue())


def _curve_figures(curves: Mapping[str, Mapping[str, Mapping[str, Any]]], results: Results) -> dict:
    """One plot per curve ``figure`` (``deletion.png``, ``road.png``, ...), a line per explainer and curve."""
    lines: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    styles: dict[str, dict[str, str]] = {}
    groups: dict[str, dict[str, str]] = {}
    labels: dict[str, dict[str, Any]] = {}
    for name, explainer_curves in curves.items():
        for curve in explainer_curves.values():
            figure = curve["figure"]
            label = f"{name} {curve['label']}".strip()
            value = results.get(name, {}).get(curve.get("summary_key", ""))
            if _finite(value):
                label += f" ({value:.3f})"
            lines.setdefault(figure, {})[label] = (curve["x"], curve["y"])
            styles.setdefault(figure, {})[label] = curve.get("style", "-")
            groups.setdefault(figure, {})[label] = name
            labels.setdefault(figure, curve)
    return {
        f"{figure}.png": curve_plot(
            lines[figure], labels[figure]["title"], labels[figure]["x_label"], labels[figure]["y_label"],
            styles[figure], groups[figure],
        )
        for figure in lines
    }  # fmt: skip


def write_report(
    run_dir: str | Path,
    results: Results,
    columns: Sequence[Column],
    curves: Mapping[str, Mapping[str, Any]],
    summary: Mapping[str, Any],
    meta: Mapping[str, Any],
    grid_images: Sequence[torch.Tensor] = (),
    grid_maps: Mapping[str, Sequence[torch.Tensor]] | None = None,
    grid_titles: Sequence[str] = (),
    per_image: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]] | None = None,
) -> dict[str, Path]:
    """Write every output of an evaluation into ``run_dir``; returns ``{name: path}``. ``per_image``:
    ``{explainer: {metric: {"index": [N], key: [N], ...}}}``, written to ``per_image.csv``."""
    run_dir = Path(run_dir)
    paths = {
        "metrics.json": run_dir / "metrics.json",
        "metrics.csv": run_dir / "metrics.csv",
        "curves.json": run_dir / "curves.json",
        "run.json": run_dir / "run.json",
    }
    write_json(paths["metrics.json"], {name: dict(row) for name, row in results.items()})
    _write_csv(paths["metrics.csv"], results, columns)
    write_json(paths["curves.json"], {name: dict(c) for name, c in curves.items()})
    # the columns too, so that tame-merge can rebuild the tables of several runs without their metrics
    run = {**meta, **summary, "mean_rank": mean_ranks(results, columns), "columns": [asdict(c) for c in columns]}
    write_json(paths["run.json"], run)
    if per_image:
        paths["per_image.csv"] = run_dir / "per_image.csv"
        _write_per_image(paths["per_image.csv"], per_image)

    figures = _curve_figures(curves, results)
    if grid_images and grid_maps:
        maps = {name: torch.stack(list(m)) for name, m in grid_maps.items() if name in results and len(m)}
        if maps:
            figures["heatmaps.png"] = explainer_grid(torch.stack(list(grid_images)), maps, list(grid_titles))
    for name, figure in figures.items():
        paths[name] = run_dir / name
        save_figure(figure, paths[name])

    paths["report.md"] = run_dir / "report.md"
    _write_text(paths["report.md"], _markdown(results, columns, summary, meta, figures))
    return paths


def _statistics_markdown(results: Results, columns: Sequence[Column], statistics: Mapping[str, Any]) -> list[str]:
    """The intervals and the paired comparisons, with how they were made."""
    if not statistics or not any(interval_keys(c.key)[0] in row for row in results.values() for c in columns):
        return []
    confidence = f"{100 * statistics['confidence']:g} %"
    lines = [
        f"## {confidence} confidence intervals",
        "",
        _markdown_table(*interval_table(results, columns)),
        "",
        f"Means: BCa bootstrap over images ({statistics['resamples']} resamples, seed {statistics['seed']}); shares "
        "(IC, pointing game): Wilson score interval.",
        "",
    ]
    reference = statistics.get("compare_to")
    if reference is None:
        return [*lines, "No paired comparisons (`compare_to` is null or not among the explainers).", ""]
    lines += [
        f"## Paired comparison with {reference}",
        "",
        _markdown_table(*comparison_table(results, columns, reference)),
        "",
        f"Each cell: mean per-image difference (explainer − {reference}) on the images both scored, its {confidence} "
        "BCa bootstrap interval, and the p-value of Wilcoxon's signed-rank test (exact McNemar test for shares). "
        f"▲ / ▼ (here and in the main table): significantly better / worse, i.e. the interval lies wholly on that side "
        f"of zero and p < {1 - statistics['confidence']:.2g}; otherwise a tie. No correction for multiple comparisons: "
        "a single ▲ with p near the threshold is weak evidence.",
        "",
    ]
    return lines


def _markdown(results: Results, columns: Sequence[Column], summary: Mapping, meta: Mapping, figures: Mapping) -> str:
    statistics = summary.get("statistics") or {}
    reference = statistics.get("compare_to")
    header, rows = metrics_table(results, columns, reference=reference)
    ranked = ", ".join(c.title.rstrip(" ↑↓") for c in columns if c.primary and c.higher_is_better is not None)
    accuracy = summary.get("top1_accuracy")
    backbone = meta.get("backbone", {})
    merged_from = meta.get("merged_from") or []
    runs = ", ".join(f"`{path}`" for path in merged_from)
    provenance = [f"- Merged (tame-merge) from the runs {runs}"] if merged_from else []
    lines = [
        f"# Explainer evaluation: {backbone.get('name', '?')} on {meta.get('data', {}).get('name', '?')}",
        "",
        f"- Date: {meta.get('date', '')}; tame-lit {meta.get('version', '')}; command: `{meta.get('command', '')}`",
        *provenance,
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
        f"Best value per column in bold. *Mean rank* averages each explainer's rank over {ranked} (the metrics "
        "can disagree: read the columns, not only the rank).",
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
    lines += _statistics_markdown(results, columns, statistics)
    if summary.get("failed"):
        lines += ["## Failed explainers", ""]
        lines += [f"- `{name}`: {error}" for name, error in summary["failed"].items()]
        lines.append("")
    lines += ["## Explainer settings", ""]
    lines += [f"- `{name}`: `{settings}`" for name, settings in meta.get("explainers", {}).items()]
    lines += ["", *_metric_settings_markdown(meta.get("metrics", {})), ""]
    if figures:
        lines += ["## Plots", ""]
        lines += [f"![{name}]({name})" for name in figures]
        lines.append("")
    return "\n".join(lines)


def _metric_settings_markdown(metrics: Mapping[str, Any]) -> list[str]:
    """One line per metric: its options as configured, then what they resolved to where that differs (a number
    of deletion steps replaces the configured step, so the step applied is printed, not the config's)."""
    options, applied = metrics.get("options") or {}, metrics.get("applied") or {}
    lines = [f"## Metric settings (bootstrap and sampling seed {metrics.get('seed')})", ""]
    for name, given in options.items():
        line = f"- `{name}`: `{given}`"
        if applied.get(name):
            line += f"; applied: `{applied[name]}`"
        lines.append(line)
    return lines
