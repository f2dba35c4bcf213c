"""``tame-explain`` / ``python -m tame_lit.cli.explain``: explanations of your own images, as files.

    tame-explain PHOTOS/ cat.jpg 'shots/*.png' --explainer gradcam --out explained/ [--topk 3]
    tame-explain PHOTOS/ --explainer outputs/train/runs/<time>/export --out explained/

``--explainer`` is a method name, or a trained explainer file: a checkpoint, an export folder, an
``explainer.pt2`` program or an ``explainer.onnx`` graph (``tame_lit.load_explainer``).

For every readable image and each explained class: an overlay PNG (heatmap over the image, colour bar,
class name and probability in the title) and the raw map as ``.npy``; for the run: ``summary.csv`` and
``summary.json`` (top-k classes and probabilities per image) and ``index.html`` with every overlay. An
unreadable file is reported and skipped; the exit code is 1 when any input failed.
"""

from __future__ import annotations

import argparse
import csv
import glob
import html
import io
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.datasets.folder import IMG_EXTENSIONS

from tame_lit import backbones, explainers
from tame_lit.acceleration import Acceleration
from tame_lit.data import (
    PIXEL_LIMIT,
    ImageDataset,
    UnreadableImageWarning,
    collate,
    eval_transform,
    imagenet_class_names,
)
from tame_lit.explainers import Explainer
from tame_lit.io import atomic_path, output_folder_problem, write_json
from tame_lit.loading import load_explainer
from tame_lit.viz import overlay_figure, save_figure

__all__ = ["build_explainer", "collect_inputs", "explain_files", "main", "resolve_target"]


def collect_inputs(paths: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Image files named by ``paths`` (files, folders searched recursively, glob patterns), in order and
    without repeats; and the paths that matched nothing."""
    found: list[Path] = []
    missing: list[str] = []
    for text in paths:
        path = Path(text).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        elif path.is_file():
            matches = [path]
        elif any(char in text for char in "*?["):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        else:
            matches = []
        if not matches:
            missing.append(text)
        found.extend(matches)
    return list(dict.fromkeys(found)), missing


def resolve_target(text: str | None, names: Sequence[str] | None, num_classes: int) -> int | None:
    """A class index from ``--target``: an index, or a class name (exact, else a unique prefix)."""
    if text is None:
        return None
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < num_classes:
            raise ValueError(f"--target {index} is not a class index in [0, {num_classes})")
        return index
    if not names:
        raise ValueError(f"--target {text!r}: this model has no class names; give a class index")
    lowered = [name.lower() for name in names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    candidates = [i for i, name in enumerate(lowered) if name.startswith(text.lower())]
    if len(candidates) == 1:
        return candidates[0]
    shown = [names[i] for i in candidates[:8]]
    raise ValueError(f"--target {text!r} matches {len(candidates)} class names{': ' + str(shown) if shown else ''}")


def build_explainer(
    spec: str,
    backbone_name: str | None = None,
    options: dict | None = None,
    *,
    trusted: bool = False,
    program_sha256: str | None = None,
) -> Explainer:
    """``--explainer``: a registered method on ``--backbone`` (default EfficientNet-Lite0), or a trained
    explainer file of any kind (checked against ``--backbone`` when one is given; a program only with
    ``--program-sha256`` or ``--trust-program``)."""
    options = options or {}
    if spec in explainers.available():
        return explainers.create(spec, backbones.create(backbone_name or "efficientnet_lite0", **options))
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"--explainer {spec!r} is neither a method {explainers.available()} nor an existing path")
    backbone = backbones.create(backbone_name, **options) if backbone_name else None
    return load_explainer(path, backbone=backbone, trusted=trusted, program_sha256=program_sha256)


def explain_files(
    files: Sequence[Path],
    explainer: Explainer,
    out: Path,
    target: int | None = None,
    topk: int = 1,
    batch_size: int = 8,
    size: int | None = None,
    device: str = "cpu",
    max_pixels: int | None = PIXEL_LIMIT,
) -> tuple[list[dict], list[str]]:
    """Explain ``files``; write overlays and maps into ``out``. Returns (summary rows, unreadable files)."""
    from tqdm.auto import tqdm

    size = size or explainer.input_size[0]
    names = imagenet_class_names() if explainer.num_classes == 1000 else None
    dataset = ImageDataset([(str(path), -1) for path in files], eval_transform(size, size), max_pixels=max_pixels)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    explainer = explainer.to(device)
    rows: list[dict] = []
    failed: list[str] = []
    seen = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnreadableImageWarning)
        for batch in tqdm(loader, desc="explaining", unit="batch"):
            indices = batch["indices"].tolist()
            expected = range(seen, min(seen + batch_size, len(files)))
            failed.extend(str(files[i]) for i in expected if i not in indices)
            seen += batch_size
            if not indices:
                continue
            images = batch["images"].to(device)
            probabilities = explainer.predict(images).softmax(dim=1)
            top = probabilities.topk(min(topk, probabilities.shape[1]), dim=1)
            ranks = [torch.full_like(top.indices[:, 0], target)] if target is not None else top.indices.unbind(1)
            for rank, classes in enumerate(ranks, start=1):
                maps = explainer(images, classes).cpu()
                for row, index in enumerate(indices):
                    rows.append(_write_one(files[index], index, rank, int(classes[row]), probabilities[row],
                                           images[row].cpu(), maps[row], names, out))  # fmt: skip
    for warning in caught:
        if not issubclass(warning.category, UnreadableImageWarning):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return rows, failed


def _write_one(path, index, rank, cls, probabilities, image, saliency, names, out: Path) -> dict:
    stem = f"{index:05d}_{path.stem}"
    name = names[cls] if names else str(cls)
    probability = float(probabilities[cls])
    overlay_path = out / f"{stem}_{rank}.png"
    map_path = out / f"{stem}_{rank}.npy"
    save_figure(overlay_figure(image, saliency, f"{name}: p = {probability:.3f}"), overlay_path)
    with atomic_path(map_path) as temporary, open(temporary, "wb") as handle:
        np.save(handle, saliency.numpy().astype(np.float32))
    return {"file": str(path), "rank": rank, "class": cls, "name": name, "probability": probability,
            "overlay": overlay_path.name, "map": map_path.name}  # fmt: skip


def _write_summary(rows: list[dict], failed: list[str], out: Path, explainer_name: str) -> None:
    buffer = io.StringIO()
    columns = ["file", "rank", "class", "name", "probability", "overlay", "map"]
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(out / "summary.csv") as temporary:
        temporary.write_text(buffer.getvalue())
    write_json(out / "summary.json", {"explainer": explainer_name, "explanations": rows, "failed": failed})
    cells = "\n".join(
        f'<figure><img src="{html.escape(quote(r["overlay"]))}" width="280">'  # a "#" or "?" in a name stays a name
        f"<figcaption>{html.escape(Path(r['file']).name)}"
        f" #{r['rank']}: {html.escape(r['name'])} ({r['probability']:.3f})</figcaption></figure>"
        for r in rows
    )
    problems = "".join(f"<li>{html.escape(f)}</li>" for f in failed)
    page = (
        f"<!doctype html><meta charset='utf-8'><title>tame-explain: {html.escape(explainer_name)}</title>"
        "<style>body{font-family:sans-serif} figure{display:inline-block;margin:6px} "
        "figcaption{font-size:12px;max-width:280px}</style>"
        f"<h1>{html.escape(explainer_name)}: {len(rows)} explanations</h1>{cells}"
        + (f"<h2>Unreadable inputs ({len(failed)})</h2><ul>{problems}</ul>" if failed else "")
    )
    with atomic_path(out / "index.html") as temporary:
        temporary.write_text(page)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tame-explain", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    parser.add_argument("--explainer", default="gradcam", help=f"a method {explainers.available()} or a trained "
                        "explainer: checkpoint, export folder, explainer.pt2 or explainer.onnx")  # fmt: skip
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--program-sha256",
        help="an explainer.pt2's SHA-256, from a source you trust: loading a "
        "program can run code, so it is loaded only when it matches (or with --trust-program)",
    )
    parser.add_argument("--trust-program", action="store_true", help="load the explainer.pt2 without a checksum")
    parser.add_argument("--backbone", help="backbone name (default: efficientnet_lite0, or the trained head's)")
    parser.add_argument("--weights", help="backbone weights: 'imagenet', a file, or 'none'")
    parser.add_argument("--target", help="explain this class (index or name) instead of the top-k")
    parser.add_argument("--topk", type=int, default=1, help="explain the k most probable classes")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, help="resize + centre-crop size (default: the backbone's input size)")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=PIXEL_LIMIT,
        help="skip larger images, unread (default: %(default)s, PIL's decompression-bomb limit; 0: no limit)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone and the head (the "
                        "first batch pays the compilation)")  # fmt: skip
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format (NHWC)")
    args = parser.parse_args(argv)
    if args.topk < 1:
        parser.error(f"--topk must be >= 1, got {args.topk}")
    options = {} if args.weights is None else {"weights": None if args.weights.lower() == "none" else args.weights}
    out = Path(args.out)
    problem = output_folder_problem(out)
    if problem:
        parser.error(f"--out {out}: {problem}")
    try:
        explainer = build_explainer(
            args.explainer, args.backbone, options, trusted=args.trust_program, program_sha256=args.program_sha256
        )
        names = imagenet_class_names() if explainer.num_classes == 1000 else None
        target = resolve_target(args.target, names, explainer.num_classes)
        explainers.accelerate_explainers(Acceleration(args.compile, args.channels_last), [explainer])
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    files, missing = collect_inputs(args.paths)
    out.mkdir(parents=True, exist_ok=True)
    max_pixels = args.max_pixels if args.max_pixels > 0 else None
    rows, failed = explain_files(
        files, explainer, out, target, args.topk, args.batch_size, args.size, args.device, max_pixels
    )
    readable = len(files) - len(failed)
    failed = [*missing, *failed]
    _write_summary(rows, failed, out, args.explainer)
    print(f"{len(rows)} explanations of {readable} images in {out / 'index.html'}")
    if failed:
        print(f"{len(failed)} input(s) failed (unreadable or not found):", *failed, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
