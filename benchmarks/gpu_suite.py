"""The GPU figures of the README in one command: training and explaining throughput of VGG-16, ResNet-50 and
EfficientNet-Lite0 at batch 32 and 64 in bf16, eager and compiled (with channels-last), each step uncached and
with its clean pass cached (``clean_pass_cache``), their peak memory and one ImageNet epoch extrapolated, then
every explainer's throughput and the evaluation's per-explainer cost.

Each part is one of the other benchmark scripts, run in a fresh process; their tables are printed as they
come and collected into ``--out`` (markdown). Nothing is downloaded: backbones other than Lite0 have random
weights, which cost the same as trained ones.

    python benchmarks/gpu_suite.py [--out /tmp/gpu_suite.md] [--steps 20]
    python benchmarks/gpu_suite.py --device cpu --quick   # a smoke run of every part (tiny settings)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BACKBONES = ["vgg16", "resnet50", "efficientnet_lite0"]


def parts(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(title, command) of each measurement."""
    device = ["--device", args.device]
    backbones = ["efficientnet_lite0"] if args.quick else BACKBONES
    batches = [2] if args.quick else [32, 64]
    size = ["--size", "64"] if args.quick else []
    steps = ["--steps", "1" if args.quick else str(args.steps)]
    precision = ["--precision", "bf16-mixed"]
    runs = []
    for batch in batches:
        for speed, flags in (("eager", []), ("compiled, channels-last", ["--compile", "--channels-last"])):
            if args.quick and flags:
                speed, flags = "channels-last (--quick: not compiled)", ["--channels-last"]  # minutes on a CPU
            command = ["train_throughput.py", *device, "--batch", str(batch), *size, *steps, *precision, *flags,
                       "--heads", "tame", "--backbones", *backbones]  # fmt: skip
            runs.append((f"Training and explaining, batch {batch}, bf16, {speed}", command))
    explain = ["explainer_throughput.py", *device, "--batch", "2" if args.quick else "32", *size,
               "--backbones", *(["efficientnet_lite0"] if args.quick else ["resnet50", "efficientnet_lite0"]),
               "--repeats", "1" if args.quick else "3", *(["--rise-masks", "50"] if args.quick else [])]  # fmt: skip
    if args.quick:
        explain += ["--methods", "gradcam", "cam"]
    runs.append(("Explainers", explain))
    evaluation = ["evaluation_throughput.py", *device, "--batch", "2" if args.quick else "32", *size,
                  "--repeats", "1"]  # fmt: skip
    runs.append(("Evaluation, per explainer", evaluation))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu_suite.md"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny settings: check that every part runs")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu --quick for a smoke run)")
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = [f"# tame-lit GPU suite: {where}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}\n"]
    failed = []
    for title, command in parts(args):
        print(f"\n## {title}\n$ python benchmarks/{' '.join(command)}", flush=True)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        print(result.stdout, flush=True)
        if result.returncode != 0:
            failed.append(title)
            print(result.stderr[-3000:], file=sys.stderr, flush=True)
        report.append(f"## {title} ({seconds:.0f} s)\n\n`python benchmarks/{' '.join(command)}`\n\n{result.stdout}")
    args.out.write_text("\n".join(report))
    print(f"\nwritten to {args.out}")
    if failed:
        sys.exit(f"failed: {failed}")


if __name__ == "__main__":
    main()
