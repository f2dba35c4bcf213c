"""The README's tables of "Which explainer is most faithful?", printed as markdown from a merged run.

    python results/lite0_imagenette/tables.py results/lite0_imagenette/merged

Reads ``metrics.json`` and ``run.json`` of the merged run (against Grad-CAM) and ``vs_best/metrics.json`` (the
same shards merged against the best head, ``run.sh merge``); prints the main table (the issue's ten numbers, ▲ / ▼
against Grad-CAM, images and seconds per image), their intervals, and the best head against every other explainer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tame_lit.metrics import Column
from tame_lit.report import OUTCOME_MARKS, interval_table, metrics_table
from tame_lit.statistics import comparison_keys

KEYS = ("AD@100", "IC@100", "AD@50", "IC@50", "AD@15", "IC@15")
KEYS += ("deletion_auc", "insertion_auc", "road_morf", "road_lerf")


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def main(merged: Path) -> None:
    results = json.loads((merged / "metrics.json").read_text())
    run = json.loads((merged / "run.json").read_text())
    columns = {c["key"]: Column(**c) for c in run["columns"]}
    chosen = [columns[key] for key in KEYS]
    reference = run["statistics"]["compare_to"]

    header, rows = metrics_table(results, chosen, reference=reference)
    header.insert(2, "images")
    header.append("s / image")
    for row in rows:
        row.insert(2, f"{results[row[0]]['images']:.0f}")
        row.append(f"{results[row[0]]['seconds_per_image']:.3g}")
    print(markdown(header, rows), end="\n\n")
    print(markdown(*interval_table(results, chosen)), end="\n\n")

    against_best = merged / "vs_best" / "metrics.json"
    if against_best.is_file():
        rivals = json.loads(against_best.read_text())
        rows = []
        for name in sorted(rivals, key=lambda n: n != reference):
            if name == "best":
                continue
            row, outcomes = [name], []
            for column in chosen:
                keys = comparison_keys(column.key, "best")
                found = {field: rivals[name].get(key) for field, key in keys.items()}
                if found["difference"] is None:
                    row.append("")
                    continue
                outcome = -int(found["outcome"])  # the rival's outcome against best, turned into best's
                outcomes.append(outcome)
                row.append(f"{0.0 - found['difference']:+.{column.digits}f}{OUTCOME_MARKS[outcome]}")
            row.append(f"{outcomes.count(1)}/{outcomes.count(0)}/{outcomes.count(-1)}")
            rows.append(row)
        header = ["best − explainer", *(c.title for c in chosen), "best's W/T/L"]
        print(markdown(header, rows))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
