"""Export a trained head so it leaves the training run: ``head.safetensors`` + ``explainer.json``, and
optionally the whole explainer as a ``torch.export`` program (``explainer.pt2``) or an ONNX graph.

One module per format over ``format.py`` (file names, ``explainer.json``, checksums, verification):
``head.py`` (``export_head``, ``load_export``), ``program.py``, ``onnx.py``. The command line is
``tame-export`` / ``python -m tame_lit.export`` (``tame_lit.cli.export``); loading any kind of file is
``tame_lit.load_explainer``.
"""

from tame_lit.export.format import (
    FORMAT_VERSION,
    METADATA_FILE,
    ONNX_FILE,
    PROGRAM_FILE,
    WEIGHTS_FILE,
    ExportedExplainer,
    ExportError,
    InvalidExportError,
    read_metadata,
    sha256,
    verify_maps,
)
from tame_lit.export.head import export_head, load_export
from tame_lit.export.onnx import OnnxExplainer, export_onnx
from tame_lit.export.program import ExplainerProgram, ProgramExplainer, export_program

__all__ = [
    "FORMAT_VERSION",
    "METADATA_FILE",
    "ONNX_FILE",
    "PROGRAM_FILE",
    "WEIGHTS_FILE",
    "ExplainerProgram",
    "ExportError",
    "ExportedExplainer",
    "InvalidExportError",
    "OnnxExplainer",
    "ProgramExplainer",
    "export_head",
    "export_onnx",
    "export_program",
    "load_export",
    "read_metadata",
    "sha256",
    "verify_maps",
]
