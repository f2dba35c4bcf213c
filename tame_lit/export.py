"""Export a trained head so it leaves the training run: ``head.safetensors`` + ``explainer.json``.

The export holds the head's weights (safetensors: loading runs nothing from the file) and everything
needed to rebuild and check it: backbone name, weight source and config, layers and their shapes, head
type and hyperparameters, class count, input size, normalisation, the tame-lit version, and the SHA-256
of the weights file. ``load_export`` refuses a file whose checksum, keys or shapes do not match.

    python -m tame_lit.export CHECKPOINT [--out DIR] [--format head program onnx]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tame_lit import __version__, heads
from tame_lit.backbones import Backbone
from tame_lit.explainers.base import Explainer
from tame_lit.explainers.head import HeadExplainer, head_from_checkpoint, head_maps, read_checkpoint
from tame_lit.heads import ExplanationHead
from tame_lit.io import atomic_path, write_json
from tame_lit.maps import normalize, upsample

__all__ = [
    "FORMAT_VERSION",
    "ExplainerProgram",
    "ExportError",
    "InvalidExportError",
    "OnnxExplainer",
    "ProgramExplainer",
    "export_head",
    "export_onnx",
    "export_program",
    "load_export",
    "verify_maps",
]

FORMAT_VERSION = 1
WEIGHTS_FILE = "head.safetensors"
METADATA_FILE = "explainer.json"
PROGRAM_FILE = "explainer.pt2"
ONNX_FILE = "explainer.onnx"


class ExportError(RuntimeError):
    """An export does not reproduce the eager explainer's maps."""


class InvalidExportError(ValueError):
    """An export folder is incomplete, tampered with, or made for another backbone."""


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_head(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike | None = None,
    verify: bool = True,
    atol: float = 1e-4,
    program: bool = False,
    onnx: bool = False,
) -> Path:
    """Write ``head.safetensors`` and ``explainer.json`` for a tame-lit checkpoint into ``out`` (default:
    ``export/`` beside the checkpoints folder); with ``program``, also ``explainer.pt2`` (backbone and head
    as one ``torch.export`` program); with ``onnx``, ``explainer.onnx``. With ``verify``, reload what was
    written and check that its maps equal the checkpoint's on a batch (max abs difference <= ``atol``).
    Returns the export folder."""
    from safetensors.torch import save_file

    from tame_lit import backbones

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint.resolve()}")
    data = read_checkpoint(checkpoint)
    saved, settings = data["tame_lit"], data["hyper_parameters"]
    head_config = dict(settings["head"])
    backbone = backbones.create(**settings["backbone"])
    head = head_from_checkpoint(checkpoint, backbone, data)
    out = Path(out) if out is not None else checkpoint.parent.parent / "export"
    weights = out / WEIGHTS_FILE
    with atomic_path(weights) as temporary:
        save_file({key: value.contiguous() for key, value in head.state_dict().items()}, str(temporary))
    metadata = {
        "format": "tame-lit-explainer",
        "format_version": FORMAT_VERSION,
        "tame_lit_version": __version__,
        "backbone": {
            "name": backbone.name,
            "weights": backbone.weights_source,
            "weights_fingerprint": saved.get("weights_fingerprint"),
            "config": settings["backbone"],
        },
        "head": head_config,
        "layers": list(head.layers),
        "layer_shapes": saved["layer_shapes"],
        "num_classes": saved["num_classes"],
        "input_size": list(backbone.input_size),
        "normalization": {"mean": backbone.mean.flatten().tolist(), "std": backbone.std.flatten().tolist()},
        "weights_file": WEIGHTS_FILE,
        "sha256": sha256(weights),
        "source_checkpoint": str(checkpoint.resolve()),
    }
    write_json(out / METADATA_FILE, metadata)
    eager = HeadExplainer(backbone, head.eval())
    if verify:
        images = torch.rand(4, 3, *backbone.input_size, generator=torch.Generator().manual_seed(0))
        verify_maps(eager, load_export(out, backbone=backbone), images, atol)
    if program:
        metadata["program_sha256"] = sha256(export_program(eager, out / PROGRAM_FILE, metadata, verify, atol))
    if onnx:
        metadata["onnx_sha256"] = sha256(export_onnx(eager, out / ONNX_FILE, verify=verify, atol=atol))
    if program or onnx:
        write_json(out / METADATA_FILE, metadata)
    return out


def export_onnx(explainer: HeadExplainer, path: str | os.PathLike, verify: bool = True, atol: float = 1e-4) -> Path:
    """Save backbone + head as ONNX (inputs ``images``, ``targets``; outputs ``maps``, ``logits``; dynamic
    batch), verified with onnxruntime when it is installed (``pip install onnxruntime``)."""
    import importlib.util
    import warnings

    backbone, head = explainer.backbone, explainer.head
    program = ExplainerProgram(backbone, head, per_image_classes=True).eval()
    images = torch.rand(2, 3, *backbone.input_size, generator=torch.Generator().manual_seed(0))
    targets = torch.full((2,), -1, dtype=torch.long)
    batch = {0: "batch"}
    path = Path(path)
    try:
        with atomic_path(path) as temporary, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape checks that are constant here
            torch.onnx.export(
                program, (images, targets), str(temporary), input_names=["images", "targets"],
                output_names=["maps", "logits"], opset_version=17, dynamo=False,
                dynamic_axes={"images": batch, "targets": batch, "maps": batch, "logits": batch},
            )  # fmt: skip
    except Exception as error:  # the exporter's many failure types: say what could not be exported
        hint = " (pip install 'tame-lit[onnx]')" if "not installed" in str(error) else ""
        raise ExportError(f"ONNX export of {backbone.name} + {type(head).__name__} failed: {error}{hint}") from error
    if verify and importlib.util.find_spec("onnxruntime") is not None:
        verify_maps(explainer, OnnxExplainer(path), torch.rand(3, 3, *backbone.input_size), atol)
    return path


def _check_recorded_checksum(path: Path, key: str) -> None:
    metadata_path = path.parent / METADATA_FILE
    try:
        expected = json.loads(metadata_path.read_text()).get(key)
    except (OSError, json.JSONDecodeError):
        expected = None
    if expected is None:
        raise InvalidExportError(
            f"{path}: no SHA-256 for it in {metadata_path}; torch.export.load can unpickle objects from a program "
            "file, so tame-lit loads only programs its export recorded (or pass trusted=True for one you made)"
        )
    actual = sha256(path)
    if actual != expected:
        raise InvalidExportError(
            f"{path}: checksum mismatch (sha256 {actual[:16]}..., {METADATA_FILE} says {expected[:16]}...): the file "
            "was changed or truncated after export"
        )


class OnnxExplainer(Explainer):
    """An ``explainer.onnx`` file run by onnxruntime, as an ``Explainer`` (maps come back as torch tensors)."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(backbone=None)  # type: ignore[arg-type]
        import onnxruntime

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX explainer not found: {self.path.resolve()}")
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as error:  # a truncated or foreign file
            raise InvalidExportError(f"{self.path}: not a readable ONNX model ({error})") from error
        self._num_classes = int(self.session.get_outputs()[1].shape[1])

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def __call__(self, images: Tensor, targets: Tensor | None = None) -> Tensor:
        self.check_images(images)
        if targets is None:
            targets = torch.full((images.shape[0],), -1, dtype=torch.long)
        targets = self.check_targets(targets, images.shape[0]) if (targets >= 0).all() else targets
        feeds = {"images": images.detach().float().cpu().numpy(), "targets": targets.long().cpu().numpy()}
        maps = self.session.run(["maps"], feeds)[0]
        return torch.from_numpy(maps).to(images.device).float()


class ExplainerProgram(nn.Module):
    """Backbone and head as one module: ``(images in [0, 1], targets) -> (maps, logits)``; a target < 0
    means the image's top-1 class. What ``torch.export`` captures for ``explainer.pt2``."""

    def __init__(self, backbone: Backbone, head: ExplanationHead, per_image_classes: bool = False) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.per_image_classes = per_image_classes

    def forward(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        logits, features = self.backbone.features(images, self.head.layers)
        targets = torch.where(targets < 0, logits.argmax(dim=1), targets)
        if not self.per_image_classes:
            return head_maps(self.head, features, targets, images.shape[-2:]), logits
        # ONNX has no unique/searchsorted: compute each image's target for every image (B x B maps), keep the
        # diagonal; the same maps, at a cost that grows with the batch
        rows = torch.arange(images.shape[0], device=images.device)
        own = self.head(features, targets)[rows, rows]
        return upsample(normalize(own), images.shape[-2:]), logits


def export_program(
    explainer: HeadExplainer,
    path: str | os.PathLike,
    metadata: dict[str, Any] | None = None,
    verify: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Save ``explainer`` (backbone + trained head) as one ``torch.export`` program, loadable with plain
    PyTorch (``torch.export.load(path).module()(images, targets)``), any batch size at the backbone's input
    size; ``metadata`` travels inside as ``explainer.json``. Verified like ``export_head``."""
    backbone, head = explainer.backbone, explainer.head
    program = ExplainerProgram(backbone, head).eval()
    images = torch.rand(4, 3, *backbone.input_size, generator=torch.Generator().manual_seed(0))
    targets = torch.full((4,), -1, dtype=torch.long)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        exported = torch.export.export(
            program, (images, targets), dynamic_shapes={"images": {0: batch}, "targets": {0: batch}}
        )
    except Exception as error:  # torch.export's many failure types: say what could not be exported
        raise ExportError(f"torch.export could not capture {backbone.name} + {type(head).__name__}: {error}") from error
    path = Path(path)
    extra = {METADATA_FILE: json.dumps(metadata or {"num_classes": backbone.num_classes})}
    with atomic_path(path) as temporary:
        torch.export.save(exported, str(temporary), extra_files=extra)
    if verify:
        verify_maps(explainer, ProgramExplainer(path, trusted=True), images, atol)
    return path


class ProgramExplainer(Explainer):
    """An ``explainer.pt2`` program as an ``Explainer`` (no tame-lit model code involved in the maps).

    ``torch.export.load`` may unpickle objects stored in the file, so a program is loaded only when the
    ``explainer.json`` beside it (written by the export) records its SHA-256, or with ``trusted=True``.
    """

    def __init__(self, path: str | os.PathLike, trusted: bool = False) -> None:
        super().__init__(backbone=None)  # type: ignore[arg-type]
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"explainer program not found: {path.resolve()}")
        if not trusted:
            _check_recorded_checksum(path, "program_sha256")
        extra = {METADATA_FILE: ""}
        try:
            self.program = torch.export.load(str(path), extra_files=extra).module()
            self.metadata = json.loads(extra[METADATA_FILE] or "{}")
        except Exception as error:  # a truncated or foreign file
            raise InvalidExportError(f"{path}: not a readable torch.export program ({error})") from error
        self.path = path

    @property
    def num_classes(self) -> int:
        return int(self.metadata["num_classes"])

    def __call__(self, images: Tensor, targets: Tensor | None = None) -> Tensor:
        self.check_images(images)
        if targets is None:
            targets = torch.full((images.shape[0],), -1, dtype=torch.long, device=images.device)
        else:
            targets = self.check_targets(targets, images.shape[0]).to(images.device)
        with torch.no_grad():
            maps, _ = self.program(images.float(), targets)
        return maps.float()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


def verify_maps(eager: Explainer, exported: Explainer, images: Tensor, atol: float = 1e-4) -> float:
    """Max abs difference of the two explainers' maps on ``images``; raises ``ExportError`` above ``atol``."""
    difference = float((eager(images) - exported(images)).abs().max())
    if not difference <= atol:
        raise ExportError(f"the exported explainer's maps differ from the eager ones by {difference:.3g} (> {atol})")
    return difference


def load_export(
    folder: str | os.PathLike, backbone: Backbone | None = None, map_location: str | torch.device = "cpu"
) -> HeadExplainer:
    """An exported head as an ``Explainer``, on ``backbone`` or on the backbone its metadata describes.

    Needs neither Lightning nor Hydra. The weights are checked against the recorded SHA-256 before they are
    read, then against the head's keys and shapes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from tame_lit import backbones

    folder = Path(folder)
    metadata_path = folder / METADATA_FILE
    if not metadata_path.is_file():
        raise InvalidExportError(f"{folder}: not a tame-lit export (no {METADATA_FILE})")
    try:
        metadata = json.loads(metadata_path.read_text())
        weights = folder / metadata["weights_file"]
        expected = metadata["sha256"]
        head_config, layer_shapes, num_classes = metadata["head"], metadata["layer_shapes"], metadata["num_classes"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise InvalidExportError(f"{metadata_path}: unreadable or incomplete ({error!r})") from error
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise InvalidExportError(
            f"{metadata_path}: export format {metadata.get('format_version')} is newer than this tame-lit's "
            f"{FORMAT_VERSION}; upgrade tame-lit"
        )
    if not weights.is_file():
        raise InvalidExportError(f"{folder}: weights file {weights.name} is missing")
    actual = sha256(weights)
    if actual != expected:
        raise InvalidExportError(
            f"{weights}: checksum mismatch (sha256 {actual[:16]}..., {METADATA_FILE} says {expected[:16]}...): the "
            "file was changed or truncated after export; re-export it from the checkpoint"
        )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise InvalidExportError(f"{weights}: not a readable safetensors file ({error})") from error
    if backbone is None:
        backbone = backbones.create(**metadata["backbone"]["config"])
    elif backbone.name != metadata["backbone"]["name"] or backbone.num_classes != num_classes:
        raise InvalidExportError(
            f"{folder}: the head was trained on backbone {metadata['backbone']['name']!r} ({num_classes} classes), "
            f"not {backbone.name!r} ({backbone.num_classes} classes)"
        )
    shapes = {name: list(shape) for name, shape in backbone.layer_shapes(list(layer_shapes)).items()}
    if shapes != layer_shapes:
        raise InvalidExportError(f"{folder}: the head reads layers {layer_shapes}, but this backbone gives {shapes}")
    options = {key: value for key, value in head_config.items() if key not in ("name", "layers")}
    head = heads.create(head_config["name"], backbone, list(layer_shapes), **options)
    try:
        head.load_state_dict(state)
    except RuntimeError as error:
        raise InvalidExportError(f"{weights}: weights do not fit the {head_config['name']} head ({error})") from error
    return HeadExplainer(backbone.to(map_location), head.to(map_location).eval())


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
