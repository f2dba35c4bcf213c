"""End-to-end training epochs on imagenette/train with each data option, against the compute-only rate.

Each row is one run of ``HeadTrainingModule`` (TAME on EfficientNet-Lite0, real weights) through a Lightning
``Trainer`` in a fresh process, with the README's loader (``--workers`` decoding processes), no validation:
an epoch's wall time includes decoding, collation, the steps and the loader's waits. Rows:

- ``JPEG``: TAME's random crop and flip, every image decoded each epoch (the default);
- ``image cache``: the same, the images read from ``data.image_cache`` (built before the timed epoch; its
  build time is printed);
- ``clean pass cached``: ``data.augment=false``, the second epoch, whose clean pass is read from
  ``clean_pass_cache`` (the first epoch, which fills it, is timed too), with and without the image cache.

``compute only`` is ``train_throughput.py``'s rate on one preloaded batch (the step alone, in a fresh process):
the limit an epoch can reach; ``of compute`` is the epoch's rate over it.

    python benchmarks/epoch_time.py [--limit 9469] [--batch 16] [--workers 2] [--cache-dir /tmp/tame_lit_cache]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import steady_allocator

HERE = Path(__file__).resolve().parent
IMAGENETTE = HERE.parents[1] / "shared" / "data" / "imagenette" / "train"
IMAGENET_TRAIN_IMAGES = 1_281_167

CONFIGS = {
    "JPEG": {"augment": True, "image_cache": False, "clean_pass_cache": False, "epochs": 1},
    "image cache": {"augment": True, "image_cache": True, "clean_pass_cache": False, "epochs": 1},
    "clean pass cached, JPEG": {"augment": False, "image_cache": False, "clean_pass_cache": True, "epochs": 2},
    "clean pass cached, image cache": {"augment": False, "image_cache": True, "clean_pass_cache": True, "epochs": 2},
}


def run(config: dict, limit: int, batch: int, workers: int, cache_dir: str) -> dict:
    """Train ``config['epochs']`` epochs; returns each epoch's seconds and images, and the caches' build time."""
    import lightning as L
    import torch

    from tame_lit.data import ImageDataModule
    from tame_lit.training import HeadTrainingModule

    torch.manual_seed(0)
    data = ImageDataModule(
        train_root=str(IMAGENETTE), train_limit=limit, batch_size=batch, num_workers=workers,
        augment=config["augment"], image_cache=cache_dir if config["image_cache"] else None,
    )  # fmt: skip
    started = time.perf_counter()
    data.setup("fit")  # builds the image cache when missing: timed apart from the epochs
    build = time.perf_counter() - started
    module = HeadTrainingModule(
        backbone={"name": "efficientnet_lite0"}, head={"name": "tame"},
        clean_pass_cache=tempfile.mkdtemp(dir=cache_dir) if config["clean_pass_cache"] else None,
    )  # fmt: skip
    epochs: list[dict] = []

    class EpochClock(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            epochs.append({"start": time.perf_counter(), "images": 0})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            epochs[-1]["images"] += int(batch["images"].shape[0])

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            epochs[-1]["seconds"] = time.perf_counter() - epochs[-1].pop("start")

    trainer = L.Trainer(
        max_epochs=config["epochs"], accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[EpochClock()],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return {"epochs": epochs, "build_s": build}


def compute_only(batch: int, mode: str) -> float:
    command = [sys.executable, str(HERE / "train_throughput.py"), "--one", "efficientnet_lite0", mode,
               "--device", "cpu", "--batch", str(batch), "--steps", "10"]  # fmt: skip
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["images_per_s"]


def main() -> None:
    steady_allocator()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=9469, help="the first N images of imagenette/train")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache-dir", default=None, help="where the caches go (default: a new temporary folder)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="tame_lit_epoch_")
    if args.one:
        print(json.dumps(run(CONFIGS[args.one], args.limit, args.batch, args.workers, cache_dir)))
        return
    rates = {"step": compute_only(args.batch, "tame"), "cached": compute_only(args.batch, "tame:cached")}
    rows = []
    for name in args.configs:
        command = [sys.executable, __file__, "--one", name, "--limit", str(args.limit), "--batch", str(args.batch),
                   "--workers", str(args.workers), "--cache-dir", cache_dir]  # fmt: skip
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        for number, epoch in enumerate(result["epochs"], start=1):
            cached = CONFIGS[name]["clean_pass_cache"] and number > 1
            label = f"{name}, epoch {number}" + (
                " (fills the cache)" if CONFIGS[name]["clean_pass_cache"] and number == 1 else ""
            )
            rate = epoch["images"] / epoch["seconds"]
            limit = rates["cached" if cached else "step"]
            rows.append(
                (label, epoch["images"], epoch["seconds"], rate, limit, result["build_s"] if number == 1 else 0)
            )
    print(f"\nEfficientNet-Lite0, TAME, batch {args.batch}, {args.workers} loader workers, 224 px, CPU, first "
          f"{args.limit} images of imagenette/train; compute only: step {rates['step']:.1f} images/s, "
          f"cached step {rates['cached']:.1f}")  # fmt: skip
    print("| epoch | images | seconds | images/s | compute only | of compute | set-up (s) | ImageNet epoch (h) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, images, seconds, rate, limit, build in rows:
        hours = IMAGENET_TRAIN_IMAGES / rate / 3600
        print(
            f"| {label} | {images} | {seconds:.0f} | {rate:.1f} | {limit:.1f} | {rate / limit:.2f} | {build:.0f} | "
            f"{hours:.1f} |"
        )


if __name__ == "__main__":
    main()
