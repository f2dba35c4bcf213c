"""``tame-export`` / ``python -m tame_lit.export``: export a trained head from its checkpoint.

    tame-export CHECKPOINT [--out DIR] [--format head program onnx]

Writes ``head.safetensors`` + ``explainer.json`` (and with ``--format``, ``explainer.pt2`` and/or
``explainer.onnx``), each reloaded and compared with the checkpoint's maps unless ``--no-verify``.
"""

from __future__ import annotations

import argparse

from tame_lit.export import ExportError, export_head
from tame_lit.io import output_folder_problem

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tame-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a tame-lit checkpoint (.ckpt)")
    parser.add_argument("--out", help="export folder (default: export/ beside the checkpoints folder)")
    parser.add_argument("--no-verify", action="store_true", help="skip reloading and comparing the maps")
    parser.add_argument(
        "--format",
        nargs="+",
        choices=["head", "program", "onnx"],
        default=["head"],
        help="head: head.safetensors + explainer.json (always written); program: also explainer.pt2, backbone "
        "and head as one torch.export program; onnx: also explainer.onnx (verified with onnxruntime if installed)",
    )
    args = parser.parse_args(argv)
    problem = output_folder_problem(args.out) if args.out else None
    if problem:
        parser.error(f"--out {args.out}: {problem}")
    try:
        out = export_head(
            args.checkpoint,
            args.out,
            verify=not args.no_verify,
            program="program" in args.format,
            onnx="onnx" in args.format,
        )
    except (FileNotFoundError, ValueError, ExportError) as error:  # ValueError: bad checkpoint or export
        parser.exit(1, f"tame-export: error: {error}\n")
    print(f"exported to {out}")


if __name__ == "__main__":
    main()
