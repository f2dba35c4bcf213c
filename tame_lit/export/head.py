"""The head export: ``head.safetensors`` (the head's weights; loading runs nothing from the file) and
``explainer.json``, written from a checkpoint and loaded back on a backbone without Lightning or Hydra."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from tame_lit import __version__, backbones, heads
from tame_lit.backbones import Backbone
from tame_lit.checkpoints import (
    backbone_from_checkpoint,
    check_compatible,
    compatibility,
    head_from_checkpoint,
    head_options,
    read_checkpoint,
)
from tame_lit.explainers.head import HeadExplainer
from tame_lit.export.format import (
    FORMAT_VERSION,
    METADATA_FILE,
    ONNX_FILE,
    PROGRAM_FILE,
    WEIGHTS_FILE,
    ExportError,
    InvalidExportError,
    export_record,
    read_metadata,
    sha256,
    verify_maps,
    write_metadata,
)
from tame_lit.export.onnx import export_onnx
from tame_lit.export.program import export_program
from tame_lit.io import atomic_path

__all__ = ["export_head", "load_export"]


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

    checkpoint = Path(checkpoint)
    data = read_checkpoint(checkpoint)
    saved, settings = data["tame_lit"], data["hyper_parameters"]
    backbone = backbone_from_checkpoint(data)
    head = head_from_checkpoint(checkpoint, backbone, data)
    state = head.state_dict()
    broken = [name for name, value in state.items() if value.is_floating_point() and not value.isfinite().all()]
    if broken:
        raise ExportError(f"{checkpoint}: the head's {', '.join(broken[:5])}{' ...' if len(broken) > 5 else ''} "
                          "hold NaN or infinite values: nothing exported")  # fmt: skip
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
        "head": dict(settings["head"]),
        "layers": list(head.layers),
        "layer_shapes": saved["layer_shapes"],
        "num_classes": saved["num_classes"],
        "input_size": list(backbone.input_size),
        "normalization": {"mean": backbone.mean.flatten().tolist(), "std": backbone.std.flatten().tolist()},
        "weights_file": WEIGHTS_FILE,
        "sha256": sha256(weights),
        "source_checkpoint": str(checkpoint.resolve()),
    }
    write_metadata(out, metadata)
    eager = HeadExplainer(backbone, head.eval())
    if verify:
        images = torch.rand(4, 3, *backbone.input_size, generator=torch.Generator().manual_seed(0))
        with warnings.catch_warnings():  # other weights than the head's: head_from_checkpoint said so already
            warnings.filterwarnings("ignore", message=".*may not fit these weights")
            verify_maps(eager, load_export(out, backbone=backbone), images, atol)
    if program:
        metadata["program_sha256"] = sha256(export_program(eager, out / PROGRAM_FILE, metadata, verify, atol))
    if onnx:
        metadata["onnx_sha256"] = sha256(export_onnx(eager, out / ONNX_FILE, verify=verify, atol=atol))
    if program or onnx:
        write_metadata(out, metadata)
    return out


def load_export(
    folder: str | os.PathLike, backbone: Backbone | None = None, map_location: str | torch.device = "cpu"
) -> HeadExplainer:
    """An exported head as an ``Explainer``, on ``backbone`` or on the backbone its metadata describes.

    Needs neither Lightning nor Hydra. The weights are checked against the recorded SHA-256 before they are
    read; the backbone, its classes and the layer shapes against the metadata (``check_compatible``: another
    backbone raises ``IncompatibleCheckpointError``, other weights warn); the weights against the head's
    keys and shapes. Integrity problems raise ``InvalidExportError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    metadata = read_metadata(folder)
    weights = folder / metadata["weights_file"]
    if not weights.is_file():
        raise InvalidExportError(f"{folder}: weights file {weights.name} is missing")
    actual, expected = sha256(weights), metadata["sha256"]
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
    saved, layer_shapes = export_record(metadata), metadata["layer_shapes"]
    # the head's branches follow its layers' order, kept by "layers": explainer.json's objects have sorted keys
    # (blocks.10 before blocks.9)
    layers = list(metadata.get("layers") or layer_shapes)
    if sorted(layers) != sorted(layer_shapes):
        raise InvalidExportError(f"{folder}: layers {layers} and layer_shapes {sorted(layer_shapes)} disagree")
    check_compatible(saved, compatibility(backbone), folder)  # first: another backbone may lack the layers
    shapes = {name: list(shape) for name, shape in backbone.layer_shapes(layers).items()}
    check_compatible(saved, {"layer_shapes": shapes}, folder)
    config = metadata["head"]
    head = heads.create(config["name"], backbone, layers, **head_options(config))
    try:
        head.load_state_dict(state)
    except RuntimeError as error:
        raise InvalidExportError(f"{weights}: weights do not fit the {config['name']} head ({error})") from error
    return HeadExplainer(backbone.to(map_location), head.to(map_location).eval())
