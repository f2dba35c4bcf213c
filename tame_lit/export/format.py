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
from tame_lit.io import strict_json, write_json

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
    "UntrustedFileError",
    "check_program_is_vouched_for",
    "describe_export",
    "export_record",
    "metadata_checksum",
    "read_metadata",
    "sha256",
    "verify_maps",
    "write_metadata",
]

FORMAT_VERSION = 2  # 2: explainer.json records metadata_sha256, a checksum of its own content
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


def metadata_checksum(metadata: Mapping[str, Any]) -> str:
    """The SHA-256 of ``metadata`` without its ``metadata_sha256``, as canonical strict JSON."""
    content = {key: value for key, value in metadata.items() if key != "metadata_sha256"}
    text = json.dumps(strict_json(content), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def write_metadata(folder: str | os.PathLike, metadata: dict[str, Any]) -> None:
    """Write ``folder/explainer.json`` (atomically) with ``metadata_sha256``: the weights' checksum it records
    is covered too, so a changed or damaged metadata file is refused on loading (an accident check: anyone
    who edits the file can recompute it)."""
    metadata["metadata_sha256"] = metadata_checksum(metadata)
    write_json(Path(folder) / METADATA_FILE, metadata)


def read_metadata(path: str | os.PathLike, required: tuple[str, ...] = HEAD_KEYS) -> dict[str, Any]:
    """The ``explainer.json`` of an export folder (``path``: the folder or the file itself), checked: it
    exists, parses, is of a format this tame-lit reads, matches its own checksum (format 2 on) and holds the
    ``required`` keys."""
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
    if metadata.get("format_version", 0) >= 2 and metadata.get("metadata_sha256") != metadata_checksum(metadata):
        raise InvalidExportError(
            f"{metadata_path}: its content does not match its metadata_sha256: the file was edited or damaged after "
            "export; re-export it from the checkpoint"
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
    program or ONNX graph beside it): the file, the head, its layers and options, and the weights' SHA-256, so
    that runs of two heads trained into the same folder are never taken for one (``tame-merge`` compares it)."""
    path = Path(path).resolve()
    folder = path if path.is_dir() else path.parent
    metadata = read_metadata(folder, required=("head",))
    head = dict(metadata["head"])
    return {"checkpoint": str(path), "head": head.pop("name", None), **head, "weights_sha256": metadata.get("sha256")}


class UntrustedFileError(InvalidExportError):
    """A file that can run code when loaded (``explainer.pt2``) without the caller vouching for it."""


def check_program_is_vouched_for(path: Path, key: str, trusted: bool, expected_sha256: str | None) -> None:
    """Refuse to load ``path`` (a file whose loader may unpickle, so may run code) unless the caller vouches for
    it: ``trusted=True``, or ``expected_sha256`` (from a source other than the file's folder) that it matches.

    The SHA-256 that ``explainer.json`` records under ``key`` comes from the same folder as the file, so it
    only catches accidents (a truncated copy): it is checked when present, and it never vouches on its own.
    """
    actual = sha256(path)
    if expected_sha256 is not None:
        if actual != expected_sha256.strip().lower():
            raise UntrustedFileError(
                f"{path}: checksum mismatch (sha256 {actual}, expected {expected_sha256.strip()}): not the file "
                "you vouched for; it was not loaded"
            )
        return
    if not trusted:
        raise UntrustedFileError(
            f"{path}: not loaded: torch.export.load can unpickle objects from a program file, which runs code, and "
            f"the checksum in its {METADATA_FILE} comes from the same folder, so it cannot vouch for it. Load it "
            f"only if you trust its source: pass its SHA-256 from that source (sha256 {actual[:16]}... now; "
            "load_explainer(..., program_sha256=HEX), tame-explain --program-sha256 HEX, evaluate.py "
            "heads.<name>.sha256=HEX), or trusted=True (tame-explain --trust-program, heads.<name>.trusted=true); "
            f"or load the safetensors export in {path.parent} instead, which runs no code"
        )
    metadata_path = path.parent / METADATA_FILE
    try:
        recorded = json.loads(metadata_path.read_text()).get(key)
    except (OSError, json.JSONDecodeError, AttributeError):
        recorded = None
    if recorded is not None and actual != recorded:
        raise InvalidExportError(
            f"{path}: checksum mismatch (sha256 {actual[:16]}..., {METADATA_FILE} says {recorded[:16]}...): the file "
            "was changed or truncated after export"
        )


def verify_maps(eager: Explainer, exported: Explainer, images: Tensor, atol: float = 1e-4) -> float:
    """Max abs difference of the two explainers' maps on ``images``; raises ``ExportError`` above ``atol``."""
    expected, actual = eager(images), exported(images)
    for maps, which in ((expected, "eager"), (actual, "exported")):
        if not bool(maps.isfinite().all()):
            raise ExportError(f"the {which} explainer's maps hold NaN or infinite values: nothing to verify against")
    difference = float((expected - actual).abs().max())
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
