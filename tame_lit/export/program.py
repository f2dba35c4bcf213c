"""The standalone program: backbone and head as one ``torch.export`` program (``explainer.pt2``), loadable
with plain PyTorch, and ``ProgramExplainer`` that runs one as an ``Explainer``."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tame_lit.backbones import Backbone
from tame_lit.explainers.head import HeadExplainer
from tame_lit.export.format import (
    METADATA_FILE,
    ExportedExplainer,
    ExportError,
    InvalidExportError,
    check_program_is_vouched_for,
    verify_maps,
)
from tame_lit.heads import ExplanationHead, head_maps
from tame_lit.heads.base import target_maps
from tame_lit.io import atomic_path

__all__ = ["ExplainerProgram", "ProgramExplainer", "export_program"]


class ExplainerProgram(nn.Module):
    """Backbone and head as one module: ``(images in [0, 1], targets) -> (maps, logits)``; a target < 0
    means the image's top-1 class. What ``torch.export`` captures for ``explainer.pt2`` (and, with
    ``per_image_classes``, what the ONNX export traces)."""

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
        return target_maps(own, images.shape[-2:], self.head.explanation, self.head.smoothing), logits


def export_program(
    explainer: HeadExplainer,
    path: str | os.PathLike,
    metadata: dict[str, Any] | None = None,
    verify: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Save ``explainer`` (backbone + trained head) as one ``torch.export`` program, loadable with plain
    PyTorch (``torch.export.load(path).module()(images, targets)``), any batch size at the backbone's input
    size; ``metadata`` travels inside as ``explainer.json`` (default: the backbone's name, class count and
    input size). Verified like ``export_head``."""
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
    if metadata is None:
        metadata = {
            "backbone": {"name": backbone.name},
            "num_classes": backbone.num_classes,
            "input_size": list(backbone.input_size),
        }
    with atomic_path(path) as temporary:
        torch.export.save(exported, str(temporary), extra_files={METADATA_FILE: json.dumps(metadata)})
    if verify:
        verify_maps(explainer, ProgramExplainer(path, trusted=True), images, atol)
    return path


class ProgramExplainer(ExportedExplainer):
    """An ``explainer.pt2`` program as an ``Explainer`` (no tame-lit model code involved in the maps or
    logits); its metadata is the ``explainer.json`` stored inside the program.

    ``torch.export.load`` may unpickle objects stored in the file (running code), so a program is loaded only
    when the caller vouches for it: ``sha256`` (its SHA-256 from a source the caller trusts; the one recorded
    beside it cannot vouch, it comes from the same folder) or ``trusted=True``. The program runs on the
    device it was saved on; inputs are moved there and the results back.
    """

    def __init__(self, path: str | os.PathLike, *, trusted: bool = False, sha256: str | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"explainer program not found: {path.resolve()}")
        check_program_is_vouched_for(path, "program_sha256", trusted, sha256)
        extra = {METADATA_FILE: ""}
        try:
            self.program = torch.export.load(str(path), extra_files=extra).module()
            metadata = json.loads(extra[METADATA_FILE] or "{}")
        except Exception as error:  # a truncated or foreign file
            raise InvalidExportError(f"{path}: not a readable torch.export program ({error})") from error
        if "num_classes" not in metadata:
            raise InvalidExportError(f"{path}: the program's {METADATA_FILE} does not record num_classes")
        super().__init__(path, metadata)
        tensor = next(itertools.chain(self.program.parameters(), self.program.buffers()), None)
        self.device = tensor.device if tensor is not None else torch.device("cpu")

    def run_graph(self, images: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor]:
        if targets is None:
            targets = torch.full((images.shape[0],), -1, dtype=torch.long)
        with torch.no_grad():
            maps, logits = self.program(images.float().to(self.device), targets.to(self.device))
        return maps.float().to(images.device), logits.float().to(images.device)
