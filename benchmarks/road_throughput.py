"""ROAD throughput: seconds per image per removal level of our batched imputer, alone and with the forward
pass, next to pytorch-grad-cam's scipy imputer (the official ROAD code), and the CG iterations it takes.

EfficientNet-Lite0 (ImageNet weights), real photos from ../shared/data when present, Grad-CAM maps,
MoRF at 10..90 % removed. pytorch-grad-cam (``pip install grad-cam``, an optional benchmark dependency)
imputes one image at a time with ``spsolve`` (about a second per image and level at 224 px on CPU), so it
runs on ``--theirs-images`` images only.

    python benchmarks/road_throughput.py [--device cuda] [--batch 32] [--theirs-images 2]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch
from common import benchmark_parser, steady_allocator
from explainer_throughput import photos

from tame_lit import backbones, explainers
from tame_lit.metrics import ScoredBatch
from tame_lit.metrics.imputation import linear_impute, noisy_linear_impute
from tame_lit.metrics.road import RoadScore, removal_ranks

T = TypeVar("T")
LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def timed(call: Callable[[], object], device: str) -> float:
    """Seconds of one call (synchronised on CUDA)."""
    return timed_result(call, device)[0]


def timed_result(call: Callable[[], T], device: str) -> tuple[float, T]:
    """Seconds of one call (synchronised on CUDA) and what it returned."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = call()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def morf_masks(maps: torch.Tensor, level: float) -> torch.Tensor:
    ranks = removal_ranks(maps, "morf")
    return (ranks < round(level * maps[0].numel())).view_as(maps)


def iteration_table(images: torch.Tensor, maps: torch.Tensor, device: str) -> list[str]:
    """Mean CG iterations (and seconds per image) at 10/50/90 % removed, for the solver variants."""
    variants = {
        "multigrid PCG + push-pull start (ours)": {},
        "multigrid PCG, zero start": {"initial_guess": False},
        "Jacobi PCG + push-pull start": {"multigrid": False, "max_iter": 5000},
        "Jacobi PCG, zero start": {"multigrid": False, "initial_guess": False, "max_iter": 5000},
    }
    rows = []
    for name, options in variants.items():
        cells = []
        for level in (0.1, 0.5, 0.9):
            removed = morf_masks(maps, level)
            seconds, (_, counts) = timed_result(lambda r=removed, o=options: linear_impute(images, r, **o), device)
            cells.append(f"{counts.float().mean():.1f} ({1000 * seconds / images.shape[0]:.0f} ms)")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def theirs(backbone: backbones.Backbone, images: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor):
    """pytorch-grad-cam's imputer and ROADMostRelevantFirst (on normalised images, as it expects), level
    by level: seconds per image per level for the imputation alone and for the metric with its forward
    passes, and the largest difference of its noise-free imputation from ours at 50 % removed; or None
    when it is not installed."""
    try:
        from pytorch_grad_cam.metrics.road import NoisyLinearImputer, ROADMostRelevantFirst
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    except ImportError:
        return None
    normalised = backbone.normalize(images)
    cams = maps.cpu().numpy()
    wanted = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    impute_seconds = metric_seconds = 0.0
    for level in LEVELS:
        road = ROADMostRelevantFirst(percentile=round(100 * (1 - level)))  # keeps pixels below the percentile
        for image, cam in zip(normalised.cpu(), cams, strict=True):
            impute_seconds += timed(lambda i=image, c=cam, r=road: r.perturbation(i, torch.from_numpy(c)), "cpu")
        metric_seconds += timed(lambda r=road: r(normalised, cams, wanted, backbone.model), images.device.type)
    # the system is affine per channel: imputing normalised images = normalising our imputation
    removed = removal_ranks(maps[:1], "morf").view_as(maps[:1]) < maps[0].numel() // 2
    official = NoisyLinearImputer(noise=0.0)(normalised[0].cpu(), (~removed[0]).float().cpu())
    ours, _ = linear_impute(images[:1], removed)
    difference = (backbone.normalize(ours)[0].cpu() - official).abs().max().item()
    per = len(LEVELS) * images.shape[0]
    return impute_seconds / per, metric_seconds / per, difference


def main() -> None:
    steady_allocator()
    parser = benchmark_parser(__doc__, batch=32)
    parser.add_argument("--theirs-images", type=int, default=2, help="images for pytorch-grad-cam (0: skip)")
    parser.add_argument("--solver-images", type=int, default=8, help="images for the CG iteration table")
    parser.add_argument("--repeats", type=int, default=2, help="our timings: the fastest of this many runs")
    args = parser.parse_args()
    try:
        import importlib.metadata

        grad_cam_version = importlib.metadata.version("grad-cam")
    except importlib.metadata.PackageNotFoundError:
        grad_cam_version = "not installed"

    backbone = backbones.create("efficientnet_lite0", weights="imagenet").to(args.device)
    images = photos(args.batch, args.size).to(args.device)
    maps = explainers.create("gradcam", backbone)(images)
    with torch.inference_mode():
        predictions = backbone(images).argmax(dim=1)
        forward = min(timed(lambda: backbone(images), args.device) for _ in range(args.repeats)) / args.batch
    metric = RoadScore(levels=LEVELS, orders=["morf"])
    batch_masks = [morf_masks(maps, level) for level in LEVELS]

    def impute_all_levels() -> None:
        for removed in batch_masks:
            noisy_linear_impute(images, removed)

    def road_all_levels() -> None:
        metric.reset()
        metric.update(ScoredBatch(backbone, images, maps, predictions))

    with torch.inference_mode():
        noisy_linear_impute(images[:4], batch_masks[4][:4])  # warm-up
        impute = min(timed(impute_all_levels, args.device) for _ in range(args.repeats)) / (args.batch * len(LEVELS))
        road = min(timed(road_all_levels, args.device) for _ in range(args.repeats)) / (args.batch * len(LEVELS))
    curve = metric.curves()["road_morf"]  # top-1 kept per level
    solver_rows = iteration_table(images[: args.solver_images], maps[: args.solver_images], args.device)
    reference = None
    if args.theirs_images > 0:
        count = args.theirs_images
        reference = theirs(backbone, images[:count], maps[:count], predictions[:count])

    print(
        f"\ndevice={args.device} batch={args.batch} size={args.size}px torch={torch.__version__} "
        f"grad-cam={grad_cam_version} model=efficientnet_lite0 maps=gradcam order=MoRF levels=10..90%"
    )
    print(f"plain forward: {1000 * forward:.1f} ms per image")
    print("| ROAD, per image per removal level | tame-lit (s) | pytorch-grad-cam (s) | speed-up |")
    print("|---|---:|---:|---:|")
    their_impute, their_road = (reference[0], reference[1]) if reference else (None, None)
    for name, ours, other in (("imputation", impute, their_impute), ("imputation + forward", road, their_road)):
        other_text, ratio = (f"{other:.3f}", f"{other / ours:.1f}x") if other else ("", "")
        print(f"| {name} | {ours:.4f} | {other_text} | {ratio} |")
    if reference:
        print(
            f"\npytorch-grad-cam on {args.theirs_images} image(s); largest difference of its noise-free "
            f"imputation from ours (normalised units, 50 % removed): {reference[2]:.2e}"
        )
    print(f"\nCG iterations, mean over {min(args.solver_images, args.batch)} images (ms per image), MoRF:")
    print("| solver | 10 % removed | 50 % removed | 90 % removed |")
    print("|---|---:|---:|---:|")
    for row in solver_rows:
        print(row)
    accuracy = ", ".join(f"{a:.2f}" for a in curve.y)
    print(f"\nROAD MoRF accuracy of Grad-CAM on these {args.batch} images at 10..90 %: {accuracy}")


if __name__ == "__main__":
    main()
