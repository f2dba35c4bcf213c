"""``tame-merge``: join evaluation runs of shards of one image set, or of different explainers, into one run.

    tame-merge RUN_DIR [RUN_DIR ...] --out DIR [--compare-to NAME]

Means, intervals and paired comparisons are recomputed from the runs' per-image values (``tame_lit.merge``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tame_lit.io import output_folder_problem
from tame_lit.merge import MergeError, merge_runs
from tame_lit.metrics import Column
from tame_lit.report import print_table

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tame-merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories of evaluate.py (each with per_image.csv)")
    parser.add_argument("--out", required=True, help="folder for the merged run (metrics.json, report.md, ...)")
    parser.add_argument("--compare-to", help="reference of the paired comparisons (default: the runs' compare_to)")
    args = parser.parse_args(argv)
    problem = output_folder_problem(args.out)
    if problem:
        parser.error(f"--out {args.out}: {problem}")
    try:
        results = merge_runs(args.runs, args.out, compare_to=args.compare_to)
    except (MergeError, FileNotFoundError) as error:
        parser.exit(2, f"tame-merge: error: {error}\n")
    run = json.loads((Path(args.out) / "run.json").read_text())
    columns = [Column(**column) for column in run["columns"]]
    title = f"{run['backbone'].get('name', '?')}: {len(results)} explainers merged from {len(args.runs)} runs"
    print_table(results, columns, title, run.get("statistics"))
    print(f"merged run written to {Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
