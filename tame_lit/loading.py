"""Any trained explainer file as an ``Explainer``: ``load_explainer(path)`` for a Lightning checkpoint
(``.ckpt``), an export folder (or its ``explainer.json``), a ``torch.export`` program (``explainer.pt2``) or
an ONNX graph (``explainer.onnx``); ``describe(path)`` says what a report cites of each."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tame_lit import checkpoints
from tame_lit.backbones import Backbone
from tame_lit.explainers.base import Explainer
from tame_lit.explainers.head import HeadExplainer
from tame_lit.export.format import METADATA_FILE, ExportedExplainer, describe_export
from tame_lit.export.head import load_export
from tame_lit.export.onnx import OnnxExplainer
from tame_lit.export.program import ProgramExplainer

__all__ = ["EXPLAINER_SUFFIXES", "describe", "load_explainer"]

# the files load_explainer reads, beside export folders
EXPLAINER_SUFFIXES = (".ckpt", ".pt2", ".onnx")


def load_explainer(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    backbone: Backbone | None = None,
    *,
    trusted: bool = False,
    program_sha256: str | None = None,
) -> Explainer:
    """A trained head as an ``Explainer``, from any file tame-lit writes: a Lightning checkpoint (head-only,
    read with ``weights_only=True``), an export folder or its ``explainer.json`` (safetensors), an
    ``explainer.pt2`` program or an ``explainer.onnx`` graph (run by onnxruntime). None of them needs
    Lightning or Hydra. Only a program can run code when loaded (``torch.export.load`` unpickles): it is loaded
    only with ``program_sha256``, its SHA-256 from a source you trust, or with ``trusted=True``.

    Without ``backbone``, a checkpoint or export is attached to its backbone rebuilt from the saved config
    (a program or ONNX graph holds its own). With one (e.g. the model an evaluation already holds), every
    kind is checked against it first (``tame_lit.checkpoints.check_compatible``: another backbone, class
    count or layer shapes raise ``IncompatibleCheckpointError``; other weights warn), and a checkpoint or
    export head is attached to it. ``map_location``: where a checkpoint's or export's head (and a rebuilt
    backbone) goes; programs run where they were saved, ONNX graphs on the CPU.
    """
    path = Path(path)
    if program_sha256 is not None and path.suffix != ".pt2":
        raise ValueError(f"{path}: program_sha256 is for explainer.pt2 programs; this file loads without running code")
    if path.suffix in (".pt2", ".onnx"):
        exported: ExportedExplainer = (
            ProgramExplainer(path, trusted=trusted, sha256=program_sha256)
            if path.suffix == ".pt2"
            else OnnxExplainer(path)
        )
        if backbone is not None:
            exported.check_backbone(backbone)
        return exported
    if path.is_dir() or path.name == METADATA_FILE:
        return load_export(path if path.is_dir() else path.parent, backbone=backbone, map_location=map_location)
    checkpoint = checkpoints.read_checkpoint(path)
    if backbone is not None:
        return HeadExplainer(
            backbone, checkpoints.head_from_checkpoint(path, backbone, checkpoint).to(map_location).eval()
        )
    backbone = checkpoints.backbone_from_checkpoint(checkpoint)
    head = checkpoints.head_from_checkpoint(path, backbone, checkpoint)
    return HeadExplainer(backbone.to(map_location).eval(), head.to(map_location).eval())


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What tells trained heads apart in a report (an ablation table of variants): the file, the head, its
    layers and options, and for a checkpoint how long it trained. A program or ONNX graph is described by
    the ``explainer.json`` beside it, when there is one."""
    path = Path(path)
    if path.suffix == ".ckpt":
        return checkpoints.describe(path)
    if path.is_dir() or path.name == METADATA_FILE or (path.parent / METADATA_FILE).is_file():
        return describe_export(path)
    return {"checkpoint": str(path.resolve())}
