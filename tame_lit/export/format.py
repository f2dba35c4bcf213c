"""The export format: file names, ``explainer.json`` (read and validated), checksums, verification of an
export's maps against the eager ones, and the base of explainers run from an exported file.

``explainer.json`` holds everything needed to rebuild and check a head: backbone name, weight source,
fingerprint and config, layers and their shapes, head type and hyperparameters, class count, input size,
normalisation, the tame-lit version and the SHA-256 of each file written beside it. Its backbone, class
count and layer shapes are checked with the same function as a checkpoint's
(``tame_lit.checkpoints.check_compatible``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from tame_lit.backbones import Backbone
from tame_lit.checkpoints import IncompatibleCheckpointError, check_compatible, compatibility, head_options
from tame_lit.explainers.base import Explainer

__all__ = [
    "FORMAT_VERSION",
    "HEAD_KEYS",
    "METADATA_FILE",
    "ONNX_FILE",
    "PROGRAM_FILE",
    "WEIGHTS_FILE",
    "ExportError",
    "ExportedExplainer",
    "InvalidExportError",
    "check_recorded_checksum",
    "describe_export",
    "export_record",
    "read_metadata",
    "sha256",
    "verify_maps",
]

FORMAT_VERSION = 1
WEIGHTS_FILE = "head.safetensors"
METADATA_FILE = "explainer.json"
PROGRAM_FILE = "explainer.pt2"
ONNX_FILE = "explainer.onnx"

# what explainer.json must hold to rebuild the head from head.safetensors
HEAD_KEYS = ("weights_file", "sha256", "head", "layer_shapes", "num_classes")


class ExportError(RuntimeError):
    """An export does not reproduce the eager explainer's maps, or could not be written."""


class InvalidExportError(IncompatibleCheckpointError):
    """An export is incomplete, tampered with, unreadable or of a newer format (a backbone it was not made
    for is refused by the compatibility check with ``IncompatibleCheckpointError``, its base class)."""


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_metadata(path: str | os.PathLike, required: tuple[str, ...] = HEAD_KEYS) -> dict[str, Any]:
    """The ``explainer.json`` of an export folder (``path``: the folder or the file itself), checked: it
    exists, parses, is of a format this tame-lit reads and holds the ``required`` keys."""
    path = Path(path)
    metadata_path = path if path.name == METADATA_FILE else path / METADATA_FILE
    if not metadata_path.is_file():
        raise InvalidExportError(f"{metadata_path.parent}: not a tame-lit export (no {METADATA_FILE})")
    try:
        metadata = json.loads(metadata_path.read_text())
        missing = [key for key in required if key not in metadata]
        if missing:
            raise KeyError(f"missing {missing}")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise InvalidExportError(f"{metadata_path}: unreadable or incomplete ({error!r})") from error
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise InvalidExportError(
            f"{metadata_path}: export format {metadata.get('format_version')} is newer than this tame-lit's "
            f"{FORMAT_VERSION}; upgrade tame-lit"
        )
    return metadata


def export_record(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """An export's compatibility record (as ``tame_lit.checkpoints.compatibility`` makes), from what its
    metadata says; a key the metadata lacks is left out, so it is not checked."""
    backbone = metadata.get("backbone") or {}
    record: dict[str, Any] = {}
    for key, source in (("backbone", "name"), ("weights", "weights"), ("weights_fingerprint", "weights_fingerprint")):
        if backbone.get(source) is not None:
            record[key] = backbone[source]
    for key in ("num_classes", "layer_shapes"):
        if key in metadata:
            record[key] = metadata[key]
    if isinstance(metadata.get("head"), Mapping):
        record["head"] = metadata["head"].get("name")
        record["head_options"] = head_options(metadata["head"])
    return record


def describe_export(path: str | os.PathLike) -> dict[str, Any]:
    """What tells trained heads apart in a report, for an export (its folder, ``explainer.json``, or a
    program or ONNX graph beside it): the file, the head, its layers and options."""
    path = Path(path).resolve()
    folder = path if path.is_dir() else path.parent
    metadata = read_metadata(folder, required=("head",))
    head = dict(metadata["head"])
    return {"checkpoint": str(path), "head": head.pop("name", None), **head}


def check_recorded_checksum(path: Path, key: str) -> None:
    """Refuse ``path`` unless the ``explainer.json`` beside it records its SHA-256 under ``key`` and it matches."""
    metadata_path = path.parent / METADATA_FILE
    try:
        expected = json.loads(metadata_path.read_text()).get(key)
    except (OSError, json.JSONDecodeError, AttributeError):
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


def verify_maps(eager: Explainer, exported: Explainer, images: Tensor, atol: float = 1e-4) -> float:
    """Max abs difference of the two explainers' maps on ``images``; raises ``ExportError`` above ``atol``."""
    difference = float((eager(images) - exported(images)).abs().max())
    if not difference <= atol:
        raise ExportError(f"the exported explainer's maps differ from the eager ones by {difference:.3g} (> {atol})")
    return difference


class ExportedExplainer(Explainer):
    """An explainer run from an exported file (a ``torch.export`` program or an ONNX graph) instead of
    tame-lit's model code. It carries the export's ``metadata`` (``explainer.json``), which names the
    backbone, and gives maps and logits from one graph: ``run_graph(images, targets) -> (maps, logits)``,
    a target < 0 meaning the image's top-1 class."""

    def __init__(self, path: str | os.PathLike, metadata: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.metadata = dict(metadata)

    @property
    def num_classes(self) -> int:
        return int(self.metadata["num_classes"])

    @property
    def backbone_name(self) -> str | None:
        return (self.metadata.get("backbone") or {}).get("name")

    @property
    def input_size(self) -> tuple[int, int]:
        if "input_size" not in self.metadata:
            raise ValueError(f"{self.path}: its metadata does not record the input size")
        height, width = self.metadata["input_size"]
        return int(height), int(width)

    def check_backbone(self, backbone: Backbone) -> None:
        """Refuse ``backbone`` unless it is the one the export was made for (``check_compatible``)."""
        check_compatible(export_record(self.metadata), compatibility(backbone), self.path)

    def run_graph(self, images: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def predict(self, images: Tensor) -> Tensor:
        self.check_images(images)
        return self.run_graph(images, None)[1].float().to(images.device)

    def compute_maps(self, images: Tensor, targets: Tensor | None) -> Tensor:
        return self.run_graph(images, targets)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, backbone={self.backbone_name!r})"
