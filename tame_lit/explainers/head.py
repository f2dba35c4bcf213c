"""A trained head as an explainer: min-max of its pre-sigmoid map of the class, upsampled (tame.md §1.4)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from tame_lit.backbones import Backbone
from tame_lit.explainers.base import Explainer
from tame_lit.features import preserved_state
from tame_lit.heads import ExplanationHead, select_classes
from tame_lit.maps import normalize, upsample

__all__ = ["HeadExplainer", "head_from_checkpoint", "head_maps", "load_explainer", "read_checkpoint"]


def head_maps(head: ExplanationHead, features: dict[str, Tensor], targets: Tensor, size: tuple[int, int]) -> Tensor:
    """Each image's explanation for its target: min-max at the head's resolution, then bilinear upsampling."""
    classes = torch.unique(targets)
    logits = head(features, classes)
    return upsample(normalize(select_classes(logits, classes, targets)), size)


class HeadExplainer(Explainer):
    """Explanations of a trained head; one backbone pass per batch, no gradients."""

    def __init__(self, backbone: Backbone, head: ExplanationHead) -> None:
        super().__init__(backbone)
        self.head = head

    @torch.no_grad()
    def explain(self, images: Tensor, targets: Tensor | None) -> Tensor:
        with preserved_state(self.head):  # the backbone's state is restored by Explainer.__call__
            self.head.eval()
            logits, features = self.backbone.features(images, self.head.layers)
            if targets is None:
                targets = logits.argmax(dim=1)
            return head_maps(self.head, features, targets, images.shape[-2:])


def load_explainer(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", backbone: Backbone | None = None
) -> Explainer:
    """A trained head as an ``Explainer``, from a tame-lit Lightning checkpoint (head-only) or an export
    folder or an ``explainer.pt2`` program (``tame_lit.export``: no Lightning needed).

    Without ``backbone`` the backbone is rebuilt from the checkpoint's config; with one (e.g. the model an
    evaluation already holds) the head is attached to it after checking that it is the backbone the head
    was trained on. Read with ``weights_only=True``: nothing in the file runs.
    """
    from tame_lit.training import HeadTrainingModule

    path = Path(path)
    if path.suffix == ".onnx":  # run by onnxruntime (tame_lit.export.export_onnx)
        from tame_lit.export import OnnxExplainer

        return OnnxExplainer(path)
    if path.suffix == ".pt2":  # a standalone program (tame_lit.export.export_program)
        from tame_lit.export import ProgramExplainer

        return ProgramExplainer(path)
    if path.is_dir() or path.name == "explainer.json":  # an export folder (tame_lit.export)
        from tame_lit.export import load_export

        return load_export(path if path.is_dir() else path.parent, backbone=backbone, map_location=map_location)
    if not path.is_file():
        raise FileNotFoundError(f"explainer checkpoint not found: {path.resolve()}")
    if backbone is not None:
        return HeadExplainer(backbone, head_from_checkpoint(path, backbone).to(map_location).eval())
    module = HeadTrainingModule.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    return HeadExplainer(module.backbone.eval(), module.head.eval())


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A tame-lit checkpoint's contents, read with ``weights_only=True``; foreign or broken files are
    refused with the reason."""
    from tame_lit.training import IncompatibleCheckpointError

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which
        raise IncompatibleCheckpointError(f"{path}: not a readable tame-lit checkpoint ({error})") from error
    if not isinstance(checkpoint, dict) or "tame_lit" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise IncompatibleCheckpointError(f"{path}: not a tame-lit checkpoint (no 'tame_lit' entry)")
    return checkpoint


def head_from_checkpoint(
    path: str | os.PathLike, backbone: Backbone, checkpoint: dict | None = None
) -> ExplanationHead:
    """The trained head of a tame-lit checkpoint, built for ``backbone`` (which must be the one it was trained
    on: same architecture, classes and layer shapes; other weights only warn). ``checkpoint``: the file's
    contents when the caller has already read them."""
    from tame_lit import heads
    from tame_lit.training import IncompatibleCheckpointError

    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    saved = checkpoint["tame_lit"]
    if saved.get("backbone") != backbone.name or saved.get("num_classes") != backbone.num_classes:
        raise IncompatibleCheckpointError(
            f"{path}: the head was trained on backbone {saved.get('backbone')!r} ({saved.get('num_classes')} "
            f"classes), but this run's backbone is {backbone.name!r} ({backbone.num_classes} classes); evaluate it "
            f"with backbone={saved.get('backbone')} or pick a checkpoint trained on {backbone.name}"
        )
    config = dict(checkpoint["hyper_parameters"]["head"])
    options = {key: value for key, value in config.items() if key not in ("name", "layers")}
    head = heads.create(config["name"], backbone, config.get("layers"), **options)
    shapes = {name: list(shape) for name, shape in head.layer_shapes.items()}
    if shapes != saved.get("layer_shapes"):
        raise IncompatibleCheckpointError(
            f"{path}: the head reads layers {saved.get('layer_shapes')}, but on this backbone they are {shapes}"
        )
    state = {key[len("head.") :]: value for key, value in checkpoint["state_dict"].items() if key.startswith("head.")}
    try:
        head.load_state_dict(state)
    except RuntimeError as error:
        raise IncompatibleCheckpointError(f"{path}: head weights do not fit the head config ({error})") from error
    if saved.get("weights_fingerprint") != backbone.fingerprint():
        warnings.warn(
            f"{path}: the head was trained on {saved['backbone']} weights {saved.get('weights')!r} (fingerprint "
            f"{saved.get('weights_fingerprint')}); this backbone has other weights ({backbone.weights_source!r}, "
            f"fingerprint {backbone.fingerprint()}): its explanations may not fit these weights",
            stacklevel=2,
        )
    return head
