"""Training and explanation throughput of each head (TAME, SA-CAM) against the backbone's plain forward.

Compute only, on one preloaded batch: ``inference`` is ``backbone(x)`` under ``inference_mode``; a
training step is a clean forward, the head, the masked forward, the backward to the input and the SGD
step. ``(all classes)`` computes all class maps and selects afterwards (the naive way); the plain head row
computes only the maps of the batch's labels (what ``HeadTrainingModule`` does; same loss); ``explain`` is
``HeadExplainer`` (one forward, the head, the top-1 map); ``clean pass cached`` is a step whose clean pass
comes from ``clean_pass_cache`` (the head, the masked forward, the backward). Data loading (JPEG decode +
resize + crop in worker processes) is measured separately; whole epochs with it: ``epoch_time.py``. Each
configuration runs in a fresh process so that its peak memory (CUDA: max allocated; CPU: peak RSS) is its own;
each ratio divides by the plain forward timed in that same process, one forward after each step, so that the
drift of a shared machine cancels from the ratio (separate processes moved it by up to 1.7x on 2 CPU cores).

    python benchmarks/train_throughput.py [--device cuda] [--batch 16] [--steps 10] [--heads tame sacam best]
        [--precision bf16-mixed] [--compile] [--channels-last]

``--precision``: the autocast of Lightning's precision plugin (``32-true``, ``bf16-mixed``, ``16-mixed``);
``--compile`` / ``--channels-last``: ``tame_lit.acceleration`` on the backbone and the head (the warm-up steps
pay the compilation); ``--no-fold``: the masked passes keep the backbone's batch norms (``fold_batch_norm=false``;
by default they run its folded copy, as training does). The last column extrapolates one epoch of ImageNet's
1,281,167 training images.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import benchmark_parser, steady_allocator, timed

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "imagenet-sample"
IMAGENETTE = ROOT.parent / "shared" / "data" / "imagenette" / "train"


def batch_of_images(batch: int, size: int) -> torch.Tensor:
    """Real photos when ../shared/data is there (labels then vary as in training), else noise."""
    from tame_lit.data import ImageDataset, eval_transform, folder_samples

    if SAMPLE.is_dir():
        samples, _ = folder_samples(SAMPLE)
        dataset = ImageDataset(samples[:: max(1, len(samples) // batch)][:batch], eval_transform(256, size))
        return torch.stack([dataset[i][0] for i in range(batch)])
    return torch.rand(batch, 3, size, size)


def head_options(name: str) -> dict:
    """A head by name (``tame``, ``sacam`` from CAM as its experiment trains it), or ``best``: the head of
    ``experiment=lite0_imagenette_best`` (README "Which explainer is most faithful?"), with all its options."""
    if name != "best":
        return {"name": name, **({"init_from_classifier": True} if name == "sacam" else {})}
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tame_lit.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=lite0_imagenette_best"])
    return OmegaConf.to_container(cfg.head, resolve=True)


IMAGENET_TRAIN_IMAGES = 1_281_167


def measure(backbone_name: str, mode: str, batch: int, size: int, steps: int, device: str, speed: dict) -> dict:
    import contextlib

    from lightning.pytorch.plugins.precision import MixedPrecision

    from tame_lit.training import HeadTrainingModule

    torch.manual_seed(0)
    weights = "imagenet" if backbone_name == "efficientnet_lite0" else None
    head_name, _, variant = mode.partition(":")
    head = head_options("tame" if head_name == "inference" else head_name)
    acceleration = {key: speed[key] for key in ("compile", "channels_last", "fold_batch_norm")}
    module = HeadTrainingModule(
        backbone={"name": backbone_name, "weights": weights}, head=head, acceleration=acceleration
    )
    module.setup("fit")  # as in training: compile, channels-last, the folded copy of the masked passes
    module.to(device).train()
    precision = speed["precision"]
    autocast = contextlib.nullcontext if precision == "32-true" else MixedPrecision(precision, device).forward_context
    images = batch_of_images(batch, size).to(device)
    optimizer = torch.optim.SGD(module.head.parameters(), lr=1e-4, momentum=0.9, nesterov=True)

    def inference() -> None:
        with torch.inference_mode():
            module.backbone(images)

    with torch.no_grad(), autocast():  # clean_pass_cache: the clean pass as read back (float16 values)
        clean_logits, clean_features = module.backbone.features(images, module.head.layers)
    stored = {layer: value.half().float() for layer, value in clean_features.items()}, clean_logits.argmax(dim=1)

    def tame_step() -> None:
        if variant == "cached":
            features, labels = stored
            terms, _ = module.masking_pass(images, features, labels)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            return
        with torch.no_grad():
            logits, features = module.backbone.features(images, module.head.layers)
        labels = logits.argmax(dim=1)
        if variant == "all":
            all_maps = module.head(features)
            original = module.head.forward
            module.head.forward = lambda feats, classes=None: all_maps if classes is None else all_maps[:, classes]
            try:
                terms, _ = module.masking_pass(images, features, labels)
            finally:
                module.head.forward = original
        else:
            terms, _ = module.masking_pass(images, features, labels)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()

    def explain() -> None:
        module.explain(images)

    chosen = inference if mode == "inference" else explain if variant == "explain" else tame_step

    def step() -> None:
        with autocast():
            chosen()

    for _ in range(3 if speed["compile"] else 2):  # compiling: the first calls trace (grad modes, hooks)
        step()
        if mode != "inference":
            inference()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = forward_seconds = 0.0
    for _ in range(steps):  # a plain forward after each step: the ratio is free of the machine's drift
        seconds += timed(step, device)
        if mode != "inference":
            forward_seconds += timed(inference, device)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    rate = batch * steps / seconds
    forward_rate = batch * steps / forward_seconds if forward_seconds else rate
    return {"images_per_s": rate, "forward_images_per_s": forward_rate, "peak_mib": peak}


def loading(batch: int, workers: int, batches: int) -> float:
    from torch.utils.data import DataLoader

    from tame_lit.data import ImageDataset, collate, folder_samples, train_transform

    samples, _ = folder_samples(IMAGENETTE)
    dataset = ImageDataset(samples, train_transform(256, 224), draft_size=256)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batch * batches / (time.perf_counter() - start)


def main() -> None:
    steady_allocator()
    parser = benchmark_parser(__doc__, batch=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--heads", nargs="+", default=["tame", "sacam"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone and the head")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    parser.add_argument(
        "--no-fold", action="store_true", help="masked passes with the batch norms (fold_batch_norm=false)"
    )
    parser.add_argument("--one", nargs=2, metavar=("BACKBONE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    speed = {"precision": args.precision, "compile": args.compile, "channels_last": args.channels_last,
             "fold_batch_norm": not args.no_fold}  # fmt: skip
    flags = ["--precision", args.precision, *(["--compile"] if args.compile else []),
             *(["--channels-last"] if args.channels_last else []),
             *(["--no-fold"] if args.no_fold else [])]  # fmt: skip
    if args.one:
        result = measure(args.one[0], args.one[1], args.batch, args.size, args.steps, args.device, speed)
        print(json.dumps(result))
        return

    rows = []
    for name in args.backbones:
        results = {}
        modes = ["inference"]
        for head in args.heads:
            extra = [f"{head}:all"] if head == "tame" else []
            modes += [*extra, head, f"{head}:cached", f"{head}:explain"]
        for mode in modes:
            command = [sys.executable, __file__, "--one", name, mode, "--device", args.device, "--batch",
                       str(args.batch), "--size", str(args.size), "--steps", str(args.steps), *flags]  # fmt: skip
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[mode] = json.loads(output.strip().splitlines()[-1])
        for mode in modes:
            head, _, variant = mode.partition(":")
            label = {"all": f"{head} step (all classes)", "explain": f"{head} explain", "": f"{head} step",
                     "cached": f"{head} step, clean pass cached"}[variant]  # fmt: skip
            rate, forward_rate = results[mode]["images_per_s"], results[mode]["forward_images_per_s"]
            rows.append((name, "inference forward" if mode == "inference" else label, rate, forward_rate,
                         rate / forward_rate, results[mode]["peak_mib"]))  # fmt: skip

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.device}"
    print(f"\ndevice={where} batch={args.batch} size={args.size}px steps={args.steps} precision={args.precision} "
          f"compile={args.compile} channels_last={args.channels_last} fold_batch_norm={not args.no_fold} "
          f"torch={torch.__version__}")  # fmt: skip
    print("| backbone | what | images/s | its forward (images/s) | ratio to inference | peak memory (MiB) "
          "| ImageNet epoch (h) |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, label, rate, forward_rate, ratio, peak in rows:
        epoch = IMAGENET_TRAIN_IMAGES / rate / 3600
        print(f"| {name} | {label} | {rate:.1f} | {forward_rate:.1f} | {ratio:.3f} | {peak:.0f} | {epoch:.2f} |")
    if IMAGENETTE.is_dir():
        rate = loading(args.batch, args.workers, batches=20)
        what = f"imagenette/train, JPEG decode + resize + crop, {args.workers} workers"
        print(f"\ndata loading ({what}): {rate:.1f} images/s")


if __name__ == "__main__":
    main()
