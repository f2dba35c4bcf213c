"""Where samples come from: ``(path, label)`` lists built from ImageFolder trees, TAME/L-CAM list files or
the photos embedded in scikit-image and matplotlib, a class-balanced subset of them, and a held-out split.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from tame_lit.data.imagenet import _imagenet_info

Sample = tuple[str, int]


def _check_dir(root: str | os.PathLike, what: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {path.resolve()}")
    return path


def folder_samples(root: str | os.PathLike, class_index: str = "auto") -> tuple[list[Sample], list[str]]:
    """Samples of an ImageFolder tree (``root/<class>/<image>``) and its class names.

    ``class_index``: ``"folder"`` numbers classes by sorted folder name (torchvision's ImageFolder);
    ``"imagenet"`` maps WordNet-id folders (``n01440764``) to ImageNet class indices; ``"auto"`` does the
    latter when every folder is an ImageNet WordNet id.
    """
    path = _check_dir(root, "image")
    try:
        classes, folder_index = find_classes(str(path))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"no class folders in {path.resolve()} (expected {path}/<class>/<image>)") from error
    wnid_index, _ = _imagenet_info()
    if class_index not in ("auto", "imagenet", "folder"):
        raise ValueError(f"data.class_index must be 'auto', 'imagenet' or 'folder', got {class_index!r}")
    if imagenet_indexed(classes, class_index):
        unknown = [name for name in classes if name not in wnid_index]
        if unknown:
            raise ValueError(f"folders {unknown[:5]} in {path} are not ImageNet WordNet ids")
        mapping = {name: wnid_index[name] for name in classes}
    else:
        mapping = folder_index
    try:
        samples = make_dataset(str(path), mapping, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"no images found in {path.resolve()}: {error}") from error
    return samples, classes


def imagenet_indexed(classes: Sequence[str], class_index: str = "auto") -> bool:
    """Whether ``folder_samples`` labels these class folders by ImageNet index (else by sorted folder name)."""
    wnid_index, _ = _imagenet_info()
    return class_index == "imagenet" or (class_index == "auto" and all(name in wnid_index for name in classes))


def list_samples(root: str | os.PathLike, list_file: str | os.PathLike) -> list[Sample]:
    """Samples of a TAME/L-CAM list file: one ``relative/path label`` per line, paths under ``root``."""
    base = _check_dir(root, "image")
    list_path = Path(list_file).expanduser()
    if not list_path.is_file():
        raise FileNotFoundError(f"list file not found: {list_path.resolve()}")
    samples = []
    for number, line in enumerate(list_path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        relative, _, label = line.strip().rpartition(" ")
        if not relative:
            relative, label = label, "-1"
        try:
            samples.append((str(base / relative.strip()), int(label)))
        except ValueError as error:
            raise ValueError(f"{list_path}:{number}: expected 'path label', got {line.strip()!r}") from error
    if not samples:
        raise ValueError(f"list file {list_path.resolve()} has no entries")
    return samples


# Photos that ship inside scikit-image and matplotlib: the data of the default run, no download needed.
_EMBEDDED = {
    "skimage": [
        "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
        "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png",
        "coins.png", "moon.png", "horse.png", "page.png", "brick.png", "grass.png", "gravel.png",
        "logo.png", "color.png",
    ],
    "matplotlib": ["grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"],
}  # fmt: skip


def embedded_samples() -> list[Sample]:
    """The embedded sample photos (label -1: no ground truth; training uses the model's predictions)."""
    import matplotlib
    import skimage

    folders = {
        "skimage": Path(skimage.__file__).parent / "data",
        "matplotlib": Path(matplotlib.get_data_path()) / "sample_data",
    }
    samples = [
        (str(folders[package] / name), -1)
        for package, names in _EMBEDDED.items()
        for name in names
        if (folders[package] / name).is_file()
    ]
    if len(samples) < 8:
        raise FileNotFoundError(f"only {len(samples)} embedded sample images found in {list(folders.values())}")
    return samples


def first_per_class_indices(labels: Sequence[int], count: int) -> list[int]:
    """The positions of the first ``count`` items of each label, in the original order."""
    seen: dict[int, int] = {}
    kept = []
    for position, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= count:
            kept.append(position)
    return kept


def first_per_class(samples: Sequence[Sample], count: int) -> list[Sample]:
    """The first ``count`` samples of each label, in the original order."""
    return [samples[i] for i in first_per_class_indices([label for _, label in samples], count)]


def _relative_key(path: str, root: str | os.PathLike) -> str:
    """``path`` relative to ``root`` as a posix string: the same on every machine and under any prefix."""
    return Path(os.path.relpath(path, Path(root).expanduser())).as_posix()


def holdout_split(
    samples: Sequence[Sample], per_class: int, root: str | os.PathLike
) -> tuple[list[Sample], list[Sample]]:
    """Split ``samples`` into ``(train, held_out)``: ``per_class`` images of each label held out, the rest kept.

    Deterministic and machine-independent, and not the first files of a class (file order often follows the
    source): within each label, images are ordered by the SHA-1 of their path relative to ``root`` (posix
    form; ties broken by that path) and the first ``per_class`` are held out. A path listed more than once
    lands, every time, on one side, so the two sides never share an image. Both sides keep the input order.
    Raises ``ValueError`` when ``per_class < 1`` or a label has ``per_class`` images or fewer (training
    would lose that class), naming each such class, its count and the largest valid value.
    """
    if int(per_class) < 1:
        raise ValueError(f"data.holdout_per_class must be >= 1, got {per_class}")
    per_class = int(per_class)
    keys: dict[str, str] = {}  # path -> relative posix path
    by_label: dict[int, set[str]] = {}
    for path, label in samples:
        if path not in keys:
            keys[path] = _relative_key(path, root)
        by_label.setdefault(label, set()).add(keys[path])
    too_small = {label: relatives for label, relatives in by_label.items() if len(relatives) <= per_class}
    if too_small:
        smallest = min(len(relatives) for relatives in by_label.values())
        named = []
        for label, relatives in sorted(too_small.items(), key=lambda item: (len(item[1]), item[0]))[:5]:
            folders = {relative.split("/", 1)[0] for relative in relatives if "/" in relative}
            folder = f"{folders.pop()} " if len(folders) == 1 else ""
            named.append(f"class {folder}(label {label}) has {len(relatives)}")
        more = f" and {len(too_small) - 5} more" if len(too_small) > 5 else ""
        valid = (
            f"use data.holdout_per_class <= {smallest - 1}"
            if smallest > 1
            else "no value works while a class has a single image"
        )
        raise ValueError(
            f"data.holdout_per_class={per_class} would hold out every training image of some classes in {root}: "
            f"{'; '.join(named)}{more} image(s); each class needs more images than are held out ({valid}, "
            "or remove those classes from the training folder)"
        )
    held: set[str] = set()
    for relatives in by_label.values():
        ordered = sorted(relatives, key=lambda relative: (hashlib.sha1(relative.encode()).hexdigest(), relative))
        held.update(ordered[:per_class])
    train = [(path, label) for path, label in samples if keys[path] not in held]
    held_out = [(path, label) for path, label in samples if keys[path] in held]
    return train, held_out
