"""Which part of the training step ``compile=true`` speeds up: the backbone, the head, both or neither compiled.

The four variants live in one process and take turns, one step and one plain forward each per round, so that
the drift of a shared machine falls on all of them alike (separate processes, as in ``train_throughput.py``,
moved by up to 1.7x from one run to the next on the 2-core CI machine). Compute only, on one preloaded batch;
the first rounds pay the compilations and are not counted. The masked passes run the backbone itself, with its
batch norms (as with ``fold_batch_norm=false``; the module's set-up, which builds the folded copy, is not run).

    python benchmarks/compile_parts.py [--device cuda] [--backbone efficientnet_lite0] [--batch 16]
        [--rounds 8] [--warmup 3] [--profile]

``--profile`` then prints the operations and inductor kernels that take the most time in one step of each
variant (``torch.profiler``, with inductor's per-kernel records turned on).
"""

from __future__ import annotations

import torch
import torch._inductor.config
from common import benchmark_parser, steady_allocator, timed
from train_throughput import batch_of_images, head_options

from tame_lit.acceleration import Acceleration, accelerate
from tame_lit.training import HeadTrainingModule

VARIANTS = {"eager": (), "head": ("head",), "backbone": ("backbone",), "both": ("backbone", "head")}


def main() -> None:
    steady_allocator()
    parser = benchmark_parser(__doc__, batch=16)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print each variant's slowest operations")
    args = parser.parse_args()
    if args.profile:
        torch._inductor.config.cpp.enable_kernel_profile = True
    images = batch_of_images(args.batch, args.size).to(args.device)
    weights = "imagenet" if args.backbone == "efficientnet_lite0" else None

    variants = {}
    for name, parts in VARIANTS.items():
        torch.manual_seed(0)
        module = HeadTrainingModule(backbone={"name": args.backbone, "weights": weights}, head=head_options("tame"))
        module.to(args.device).train()
        accelerate(Acceleration(compile=True), *(getattr(module, part) for part in parts))
        variants[name] = module, torch.optim.SGD(module.head.parameters(), lr=1e-4)

    def forward(module: HeadTrainingModule) -> None:
        with torch.inference_mode():
            module.backbone(images)

    def train_step(module: HeadTrainingModule, optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            logits, features = module.backbone.features(images, module.head.layers)
        terms, _ = module.masking_pass(images, features, logits.argmax(dim=1))
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()

    seconds = {(name, what): 0.0 for name in variants for what in ("forward", "step")}
    for round_ in range(args.warmup + args.rounds):
        for name, (module, optimizer) in variants.items():
            step_time = timed(lambda: train_step(module, optimizer), args.device)  # noqa: B023 (called at once)
            forward_time = timed(lambda: forward(module), args.device)  # noqa: B023
            if round_ >= args.warmup:
                seconds[name, "step"] += step_time
                seconds[name, "forward"] += forward_time

    images_seen = args.batch * args.rounds
    print(f"\n{args.backbone} device={args.device} batch={args.batch} size={args.size}px rounds={args.rounds} "
          f"torch={torch.__version__}")  # fmt: skip
    print("| compiled | inference forward (images/s) | tame step (images/s) | step ratio to its forward |")
    print("|---|---:|---:|---:|")
    for name in variants:
        forward_rate = images_seen / seconds[name, "forward"]
        step_rate = images_seen / seconds[name, "step"]
        print(f"| {name} | {forward_rate:.1f} | {step_rate:.1f} | {step_rate / forward_rate:.3f} |")
    if args.profile:
        for name, (module, optimizer) in variants.items():
            with torch.profiler.profile() as profiler:
                train_step(module, optimizer)
            slowest = sorted(profiler.key_averages(), key=lambda event: -event.self_cpu_time_total)[:8]
            print(f"\n{name}: the step's slowest operations (self CPU ms, calls)")
            for event in slowest:
                print(f"  {event.self_cpu_time_total / 1000:8.1f} {event.count:4d}  {event.key[:110]}")


if __name__ == "__main__":
    main()
