"""The ONNX export (``explainer.onnx``: inputs ``images``, ``targets``; outputs ``maps``, ``logits``) and
``OnnxExplainer`` that runs one in onnxruntime (optional: ``pip install 'tame-lit[onnx]'``)."""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tame_lit.explainers.head import HeadExplainer
from tame_lit.export.format import (
    METADATA_FILE,
    ExportedExplainer,
    ExportError,
    InvalidExportError,
    read_metadata,
    sha256,
    verify_maps,
)
from tame_lit.export.program import ExplainerProgram
from tame_lit.io import atomic_path

__all__ = ["OnnxExplainer", "export_onnx"]


def export_onnx(explainer: HeadExplainer, path: str | os.PathLike, verify: bool = True, atol: float = 1e-4) -> Path:
    """Save backbone + head as ONNX (inputs ``images``, ``targets``; outputs ``maps``, ``logits``; dynamic
    batch), verified with onnxruntime when it is installed (``pip install onnxruntime``)."""
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
        metadata = {"backbone": {"name": backbone.name}, "num_classes": backbone.num_classes}
        verify_maps(explainer, OnnxExplainer(path, metadata), torch.rand(3, 3, *backbone.input_size), atol)
    return path


class OnnxExplainer(ExportedExplainer):
    """An ``explainer.onnx`` file run by onnxruntime (on the CPU), as an ``Explainer``; maps and logits come
    back as torch tensors on the images' device.

    ``metadata``: what the graph explains; by default the ``explainer.json`` beside the file (when it records
    the file's SHA-256, the file must match it), else only what the graph itself tells (class count, input
    size). Loading an ONNX file runs no Python code from it.
    """

    def __init__(self, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> None:
        import onnxruntime

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX explainer not found: {path.resolve()}")
        if metadata is None:
            metadata = read_metadata(path.parent, required=()) if (path.parent / METADATA_FILE).is_file() else {}
            expected = metadata.get("onnx_sha256")
            if expected is not None and sha256(path) != expected:
                raise InvalidExportError(
                    f"{path}: checksum mismatch ({METADATA_FILE} says {expected[:16]}...): the file was changed or "
                    "truncated after export"
                )
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:  # a truncated or foreign file
            raise InvalidExportError(f"{path}: not a readable ONNX model ({error})") from error
        graph = {"num_classes": self.session.get_outputs()[1].shape[1]}
        size = self.session.get_inputs()[0].shape[2:]
        if all(isinstance(side, int) for side in size):
            graph["input_size"] = list(size)
        if metadata.get("num_classes", graph["num_classes"]) != graph["num_classes"]:
            raise InvalidExportError(
                f"{path}: the graph has {graph['num_classes']} classes, its metadata says {metadata['num_classes']}"
            )
        super().__init__(path, {**graph, **metadata})

    def run_graph(self, images: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor]:
        if targets is None:
            targets = torch.full((images.shape[0],), -1, dtype=torch.long)
        feeds = {"images": images.detach().float().cpu().numpy(), "targets": targets.long().cpu().numpy()}
        maps, logits = self.session.run(["maps", "logits"], feeds)
        return torch.from_numpy(maps).to(images.device), torch.from_numpy(logits).to(images.device)
