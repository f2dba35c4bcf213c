"""The known-answer benchmark (tame_lit.known_answer): a tiny ViT and a tiny CNN learn where a red square is
among clutter (ObjectPositionImages); every explainer defined for each, and a TAME head trained with tame-lit's
own training, explain the held-out images; the table gives the share whose map peaks on the square (pointing game,
tolerance half a map cell), with Wilson 95 % intervals, for the trained classifier and for the same network
untrained (random weights: a method must not find the square there).

    python benchmarks/known_answer.py                       # both networks, every method (~15 min on 2 cores)
    python benchmarks/known_answer.py --kinds vit --methods gradcam attention_rollout
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import steady_allocator

from tame_lit import backbones
from tame_lit.known_answer import (
    KnownAnswer,
    backbone_config,
    free_methods,
    pointing_scores,
    train_classifier,
    train_head,
)


def main() -> None:
    steady_allocator()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=["vit", "cnn"], choices=["vit", "cnn"])
    parser.add_argument("--methods", nargs="+", default=None, help="free methods to score (default: all defined)")
    parser.add_argument("--held-out", type=int, default=KnownAnswer.held_out_images)
    parser.add_argument(
        "--tolerance", type=float, default=KnownAnswer.tolerance, help="pointing game's tolerance in pixels"
    )
    parser.add_argument("--no-head", action="store_true", help="skip the trained TAME head")
    parser.add_argument(
        "--rise-masks", type=int, default=1000, help="RISE's masks per image (its default, 4000, is for 224 px)"
    )
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    settings = KnownAnswer(held_out_images=args.held_out, tolerance=args.tolerance)
    print(f"settings: {settings}")

    rows: dict[str, dict[str, str]] = {}
    columns, counts = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        for kind in args.kinds:
            for trained in (True, False):
                column = f"{kind} {'trained' if trained else 'untrained'}"
                columns.append(column)
                weights = Path(scratch) / f"{column.replace(' ', '_')}.safetensors"
                started = time.perf_counter()
                accuracy = train_classifier(kind, settings, weights, epochs=None if trained else 0)
                print(f"{column}: held-out accuracy {accuracy:.3f} ({time.perf_counter() - started:.0f} s)")
                backbone = backbones.create(**backbone_config(kind, weights))
                methods, refused = free_methods(backbone, args.methods, {"rise": {"num_masks": args.rise_masks}})
                for name, reason in refused.items():
                    rows.setdefault(name, {})[column] = "refused"
                    print(f"  {name} refused: {reason}")
                if not args.no_head:
                    started = time.perf_counter()
                    methods["TAME head (trained here)"] = train_head(kind, weights, settings, Path(scratch) / column)
                    print(f"  TAME head trained in {time.perf_counter() - started:.0f} s")
                for name, method in methods.items():
                    started = time.perf_counter()
                    score = pointing_scores(backbone, {name: method}, settings)[name]
                    rows.setdefault(name, {})[column] = f"{score.hits:.3f} [{score.low:.2f}, {score.high:.2f}]"
                    print(f"  {name}: {rows[name][column]} ({time.perf_counter() - started:.0f} s)")
                counts[column] = str(score.images)

    width = max(len(name) for name in rows)
    print(f"\n{'pointing game, held-out':<{width}} | " + " | ".join(f"{c:<20}" for c in columns))
    print("-" * (width + 1) + "|" + "|".join("-" * 22 for _ in columns))
    for name, cells in {**rows, "images with an object": counts}.items():
        print(f"{name:<{width}} | " + " | ".join(f"{cells.get(c, '-'):<20}" for c in columns))


if __name__ == "__main__":
    main()
