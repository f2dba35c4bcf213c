"""Images per second of the AD/IC evaluation (explainer + 3 masked passes) per explainer, next to the
plain forward, on one preloaded batch (compute only; data loading is measured in train_throughput.py).

AD/IC at 100/50/15 % needs 3 forward passes of masked images per image, so its metric part can run at
most at 1/3 of the plain forward throughput: the "metric efficiency" column is the metric part's rate
over that limit (1.0 = the metric costs exactly its 3 forward passes, nothing else).

    python benchmarks/evaluation_throughput.py [--device cuda] [--batch 32] [--explainers gradcam ...]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from common import benchmark_parser, steady_allocator, timed
from explainer_throughput import photos

from tame_lit import backbones, explainers
from tame_lit.metrics import AverageDropIncrease, ScoredBatch

KEEP = (1.0, 0.5, 0.15)


def best_seconds(call: Callable[[], object], repeats: int, device: str) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up (the least disturbed by other processes)."""
    call()
    return min(timed(call, device) for _ in range(repeats))


def rates(backbone, explainer, images: torch.Tensor, args: argparse.Namespace) -> tuple[float, float, float]:
    """Images per second of the explainer alone, of the AD/IC metric part alone (fixed maps), and of both."""
    with torch.no_grad():
        logits = backbone(images)
    targets = logits.argmax(dim=1)
    metric = AverageDropIncrease(keep=KEEP)

    def score(maps: torch.Tensor) -> None:
        with torch.inference_mode():
            metric.update(ScoredBatch(backbone, images, maps, targets, clean_logits=logits))

    maps = explainer(images, targets)
    timed = [
        lambda: explainer(images, targets),
        lambda: score(maps),
        lambda: score(explainer(images, targets)),
    ]
    return tuple(args.batch / best_seconds(call, args.repeats, args.device) for call in timed)


def main() -> None:
    steady_allocator()
    parser = benchmark_parser(__doc__, batch=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--explainers", nargs="+", default=["gradcam", "gradcampp", "layercam", "random"])
    args = parser.parse_args()

    backbone = backbones.create("efficientnet_lite0").to(args.device)
    images = photos(args.batch, args.size).to(args.device)
    with torch.inference_mode():
        forward = args.batch / best_seconds(lambda: backbone(images), args.repeats, args.device)
    rows = [("plain forward", f"{forward:.1f}", "", "", "", "")]
    for name in args.explainers:
        explain_rate, metric_rate, full_rate = rates(backbone, explainers.create(name, backbone), images, args)
        rows.append(
            (
                name,
                f"{full_rate:.1f}",
                f"{full_rate / forward:.3f}",
                f"{explain_rate:.1f}",
                f"{metric_rate:.1f}",
                f"{metric_rate / (forward / len(KEEP)):.2f}",
            )
        )
        print(f"{name}: full {full_rate:.1f}/s, explainer {explain_rate:.1f}/s, metric {metric_rate:.1f}/s", flush=True)

    print(
        f"\nEfficientNet-Lite0, device={args.device}, batch={args.batch}, {args.size}px, torch={torch.__version__}; "
        f"AD/IC at {', '.join(f'{100 * k:g} %' for k in KEEP)} kept"
    )
    print(
        "| explainer | full AD/IC evaluation (images/s) | ratio to plain forward | explainer alone (images/s) "
        "| metric part alone (images/s) | metric efficiency (limit: forward / 3) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
