"""Shared by the benchmark scripts."""

from __future__ import annotations

import os
import sys

# glibc hands every tensor above 32 MB back to the kernel when it is freed (mmap/munmap), and the next
# allocation of it page-faults again: on the 2-core CI machine that was about 3/4 of the CPU time of a
# batch-64 forward pass, and it made timings jump by 2x from one call to the next. Keeping freed memory
# in the heap measures the computation, for every library alike (jemalloc or tcmalloc do the same).
STEADY_ALLOCATOR = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def steady_allocator() -> None:
    """Re-run this script with the allocator settings above, unless they are set (call it first)."""
    if any(os.environ.get(key) != value for key, value in STEADY_ALLOCATOR.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STEADY_ALLOCATOR})


def benchmark_parser(doc: str | None, batch: int):
    """The options every benchmark takes: ``--device``, ``--batch``, ``--size``."""
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--size", type=int, default=224)
    return parser


def timed(call, device: str) -> float:
    """Seconds one ``call()`` takes, the device synchronised before and after (CUDA runs asynchronously)."""
    import time

    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
