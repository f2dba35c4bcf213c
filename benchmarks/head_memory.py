"""Peak memory of one training step of a head (forward with the batch's classes + backward), by attention kernel.

The head reads the backbone's real layer shapes (random features; memory does not depend on the values).
``sdpa`` is what SA-CAM runs (``scaled_dot_product_attention``, fused kernel); ``math`` forces the
reference kernel, which holds the ``(h*w)^2`` score matrices. Tensor memory above what was allocated before
the step (``tame_lit.system.peak_memory``: CUDA allocator statistics, or the CPU profiler's allocation events).
tests/test_sacam.py checks the Lite0 SA-CAM number of this table at batch 32.

    python benchmarks/head_memory.py [--device cuda] [--batch 32]
"""

from __future__ import annotations

import contextlib
import time

import torch
from common import benchmark_parser, steady_allocator
from torch.nn.attention import SDPBackend, sdpa_kernel

from tame_lit import backbones, heads
from tame_lit.system import peak_memory

CONFIGS = [
    ("efficientnet_lite0", "tame", {}),
    ("efficientnet_lite0", "sacam", {}),
    ("efficientnet_lite0", "sacam", {"attention_layers": ["blocks.4", "bn2"]}),
    ("resnet50", "tame", {}),
    ("resnet50", "sacam", {}),
]


def measure(backbone: backbones.Backbone, name: str, options: dict, batch: int, device: str) -> dict[str, float]:
    torch.manual_seed(0)
    head = heads.create(name, backbone, **options).to(device)
    features = {layer: torch.randn(batch, *shape, device=device) for layer, shape in head.layer_shapes.items()}
    classes = (torch.arange(batch, device=device) * 31) % backbone.num_classes

    def step() -> None:
        head(features, classes).square().mean().backward()

    results = {}
    kernels = {"sdpa": None, "math": [SDPBackend.MATH]} if name == "sacam" else {"sdpa": None}
    for kernel, backends in kernels.items():
        with sdpa_kernel(backends) if backends else contextlib.nullcontext():
            step()
            results[f"{kernel}_mib"] = peak_memory(step, device) / 2**20
            start = time.perf_counter()
            for _ in range(3):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
            results[f"{kernel}_ms"] = (time.perf_counter() - start) / 3 * 1000
    return results


def main() -> None:
    steady_allocator()
    parser = benchmark_parser(__doc__, batch=32)
    args = parser.parse_args()
    print(f"\ndevice={args.device} batch={args.batch} size={args.size}px torch={torch.__version__}")
    print("| backbone | head | layers (attention) | peak MiB | step ms | peak MiB, math attention | step ms, math |")
    print("|---|---|---|---:|---:|---:|---:|")
    built: dict[str, backbones.Backbone] = {}
    for backbone_name, name, options in CONFIGS:
        if backbone_name not in built:
            built[backbone_name] = backbones.create(backbone_name, weights=None, input_size=args.size)
        backbone = built[backbone_name]
        head = heads.create(name, backbone, **options)
        shapes = ", ".join(f"{layer} {'x'.join(map(str, shape))}" for layer, shape in head.layer_shapes.items())
        if name == "sacam":
            shapes += f" ({', '.join(head.attention_layers) or 'none'})"
        r = measure(backbone, name, options, args.batch, args.device)
        math_cols = f"{r['math_mib']:.0f} | {r['math_ms']:.0f}" if "math_mib" in r else "- | -"
        print(f"| {backbone_name} | {name} | {shapes} | {r['sdpa_mib']:.0f} | {r['sdpa_ms']:.0f} | {math_cols} |")


if __name__ == "__main__":
    main()
