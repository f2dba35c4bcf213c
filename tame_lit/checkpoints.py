"""Trained-head files, once: reading a checkpoint, its compatibility record and the one check of it, and
building the head (and, when none is given, the backbone) from the file.

Every reader goes through here: resuming a training run (``HeadTrainingModule.on_load_checkpoint``),
``load_explainer``, exports and evaluation. A checkpoint stores, under ``checkpoint["tame_lit"]``, the
record of ``compatibility(backbone, head, head_config)``; ``check_compatible(saved, current)`` compares it
with the backbone and head at hand: another backbone, class count, set of layers (their shapes), head or
head options is refused with ``IncompatibleCheckpointError``, other weights of the same backbone only warn.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tame_lit import backbones, heads
from tame_lit.backbones import Backbone
from tame_lit.heads import ExplanationHead

__all__ = [
    "COMPATIBILITY_KEYS",
    "IncompatibleCheckpointError",
    "backbone_from_checkpoint",
    "check_compatible",
    "compatibility",
    "describe",
    "head_from_checkpoint",
    "head_options",
    "read_checkpoint",
    "saved_record",
]

# what must match between the run a head was trained in and the one that uses it, in the order checked
COMPATIBILITY_KEYS = ("backbone", "num_classes", "layer_shapes", "head", "head_options")


class IncompatibleCheckpointError(ValueError):
    """A trained head (checkpoint or export) does not fit the backbone or head it is loaded for, or the file
    is not a usable tame-lit file."""


def head_options(head_config: Mapping[str, Any]) -> dict[str, Any]:
    """A head config without its ``name`` and ``layers``: the options ``heads.create`` takes as keywords."""
    return {key: value for key, value in head_config.items() if key not in ("name", "layers")}


def compatibility(
    backbone: Backbone, head: ExplanationHead | None = None, head_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The record a checkpoint stores and ``check_compatible`` compares: the backbone's name, weight source,
    weight fingerprint and class count, and with ``head`` its type and options (from ``head_config``) and
    the shapes of the layers it reads."""
    record: dict[str, Any] = {
        "backbone": backbone.name,
        "weights": backbone.weights_source,
        "weights_fingerprint": backbone.fingerprint(),
        "num_classes": backbone.num_classes,
    }
    if head is not None:
        record["layer_shapes"] = {name: list(shape) for name, shape in head.layer_shapes.items()}
        record["num_classes"] = head.num_classes
    if head_config is not None:
        record["head"] = head_config["name"]
        record["head_options"] = head_options(head_config)
    return record


def check_compatible(
    saved: Mapping[str, Any], current: Mapping[str, Any], source: str | os.PathLike | None = None
) -> None:
    """Refuse a trained head whose ``saved`` record does not fit the ``current`` one (both as made by
    ``compatibility``; only keys present in both are compared). Raises ``IncompatibleCheckpointError``
    naming both sides and what to do; warns, naming both fingerprints, when only the backbone's weights
    differ. ``source``: the file, named at the start of the message."""
    prefix = f"{source}: " if source is not None else ""
    for key in COMPATIBILITY_KEYS:
        if key in saved and key in current and saved[key] != current[key]:
            raise IncompatibleCheckpointError(
                f"{prefix}the head was trained with {key}={saved[key]!r}, but this run has {key}={current[key]!r};"
                f" run with the head's settings (backbone={saved.get('backbone')}, head={saved.get('head')}, "
                f"layers {list(saved.get('layer_shapes', {}))}), or use a head trained for this run's settings (a "
                "resumed training run: start without ckpt_path)"
            )
    fingerprints = saved.get("weights_fingerprint"), current.get("weights_fingerprint")
    if None not in fingerprints and fingerprints[0] != fingerprints[1]:
        warnings.warn(
            f"{prefix}the head was trained on {saved.get('backbone')} weights {saved.get('weights')!r} (fingerprint "
            f"{fingerprints[0]}); this backbone has other weights ({current.get('weights')!r}, fingerprint "
            f"{fingerprints[1]}): its explanations may not fit these weights",
            stacklevel=2,
        )


def saved_record(checkpoint: Mapping[str, Any], source: str | os.PathLike | None = None) -> dict[str, Any]:
    """The compatibility record a checkpoint carries; a checkpoint without one was not written by tame-lit."""
    saved = checkpoint.get("tame_lit")
    if not isinstance(saved, Mapping):
        prefix = f"{source}: " if source is not None else ""
        raise IncompatibleCheckpointError(f"{prefix}this checkpoint was not written by tame-lit (no 'tame_lit' entry)")
    return dict(saved)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A tame-lit checkpoint's contents, read with ``weights_only=True`` (nothing in the file runs); a missing
    file raises ``FileNotFoundError``, a foreign or truncated one ``IncompatibleCheckpointError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path.resolve()}")
    size = path.stat().st_size
    if size == 0:
        raise IncompatibleCheckpointError(f"{path}: not a readable tame-lit checkpoint: the file is empty (0 bytes; "
                                          "a copy or a save that was cut off). Use another checkpoint")  # fmt: skip
    if not zipfile.is_zipfile(path):
        raise IncompatibleCheckpointError(
            f"{path}: not a readable tame-lit checkpoint: {size:,} bytes that are not a PyTorch checkpoint archive "
            "(truncated, damaged, or another kind of file). Use another checkpoint"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refused an object: loading it could run code
        raise IncompatibleCheckpointError(
            f"{path}: not a readable tame-lit checkpoint: it holds objects other than tensors and plain data, and "
            f"loading those could run code, so it was not loaded{_refused_object(error)}"
        ) from None
    except Exception as error:  # a damaged archive: say which file
        raise IncompatibleCheckpointError(f"{path}: not a readable tame-lit checkpoint ({error})") from error
    if not isinstance(checkpoint, dict) or "hyper_parameters" not in checkpoint:
        raise IncompatibleCheckpointError(f"{path}: not a tame-lit checkpoint (no 'tame_lit' entry)")
    saved_record(checkpoint, path)
    return checkpoint


def _refused_object(error: Exception) -> str:
    """What ``torch.load(weights_only=True)`` refused, from its message (e.g. ``: Unsupported global: ...``)."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    return f" (it names {found.group(1)})" if found else ""


def backbone_from_checkpoint(checkpoint: Mapping[str, Any]) -> Backbone:
    """The backbone a checkpoint's head was trained on, rebuilt from its saved config."""
    return backbones.create(**checkpoint["hyper_parameters"]["backbone"])


def head_from_checkpoint(
    path: str | os.PathLike, backbone: Backbone, checkpoint: Mapping[str, Any] | None = None
) -> ExplanationHead:
    """The trained head of a tame-lit checkpoint, built for ``backbone`` and checked against it with
    ``check_compatible``. ``checkpoint``: the file's contents when the caller has already read them."""
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    saved = saved_record(checkpoint, path)
    config = dict(checkpoint["hyper_parameters"]["head"])
    check_compatible(saved, compatibility(backbone), path)  # first: another backbone may lack the layers
    head = heads.create(config["name"], backbone, config.get("layers"), **head_options(config))
    shapes = {name: list(shape) for name, shape in head.layer_shapes.items()}
    check_compatible(saved, {"layer_shapes": shapes}, path)  # e.g. another input size
    state = {key[len("head.") :]: value for key, value in checkpoint["state_dict"].items() if key.startswith("head.")}
    try:
        head.load_state_dict(state)
    except RuntimeError as error:
        raise IncompatibleCheckpointError(f"{path}: head weights do not fit the head config ({error})") from error
    return head


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What tells trained heads apart in a report (an ablation table of variants): the file, the head, its
    layers and options, and how long it trained (epoch, step)."""
    path = Path(path).resolve()
    checkpoint = read_checkpoint(path)
    saved = saved_record(checkpoint, path)
    return {
        "checkpoint": str(path),
        "head": saved.get("head"),
        "layers": list(saved.get("layer_shapes", {})),
        **saved.get("head_options", {}),
        "epoch": checkpoint.get("epoch"),
        "step": checkpoint.get("global_step"),
    }
