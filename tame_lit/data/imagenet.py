"""ImageNet metadata: class names and the WordNet-id to class-index map (from timm), and bounding boxes
in ImageNet's validation XML format (PASCAL VOC), moved along with the image by the transforms.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch


@cache
def _imagenet_info() -> tuple[dict[str, int], list[str]]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    wnids = list(info.label_names())
    names = [info.index_to_description(i).split(",")[0] for i in range(len(wnids))]
    return {wnid: index for index, wnid in enumerate(wnids)}, names


def imagenet_class_names() -> list[str]:
    """Short names of the 1,000 ImageNet classes, by class index (from timm's metadata)."""
    return list(_imagenet_info()[1])


class BoxSource:
    """Bounding boxes in ImageNet's validation XML format (PASCAL VOC): one ``<image stem>.xml`` per image
    in ``root`` (as ``LOC_val``/``Annotations/CLS-LOC/val``) or in ``root/<class folder>/``.

    Object names that are WordNet ids get ImageNet class indices; other names the index ``class_index``
    gives them (e.g. the dataset's folder order), else -1. Boxes are scaled to the decoded image's size,
    so images stored smaller than the annotated originals (Imagenette, JPEG draft decoding) still fit.
    """

    def __init__(self, root: str | os.PathLike, class_index: dict[str, int] | None = None) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.boxes_dir: box directory not found: {self.root.resolve()}")
        self.class_index = {**(class_index or {}), **_imagenet_info()[0]}

    def path_for(self, image_path: str | os.PathLike) -> Path:
        image_path = Path(image_path)
        for candidate in (
            self.root / f"{image_path.stem}.xml",
            self.root / image_path.parent.name / f"{image_path.stem}.xml",
        ):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"no box file for {image_path}: expected {self.root / (image_path.stem + '.xml')} "
            f"or {self.root / image_path.parent.name / (image_path.stem + '.xml')}"
        )

    def check(self, image_paths: Sequence[str]) -> None:
        """Fail before any work when images lack a box file, naming the first few."""
        missing = []
        for path in image_paths:
            try:
                self.path_for(path)
            except FileNotFoundError:
                missing.append(str(path))
        if missing:
            raise FileNotFoundError(
                f"data.boxes_dir={self.root}: no <image stem>.xml box file for {len(missing)} of {len(image_paths)} "
                f"images, e.g. {missing[:3]}; point data.boxes_dir at the XML folder or set it to null"
            )

    def for_image(self, image_path: str | os.PathLike, size: tuple[int, int]) -> tuple[torch.Tensor, object]:
        """Class indices ``[n]`` and ``tv_tensors.BoundingBoxes`` (XYXY, continuous pixel edges) on an image
        of ``size`` = (width, height)."""
        import xml.etree.ElementTree as ElementTree

        from torchvision import tv_tensors

        xml_path = self.path_for(image_path)
        try:
            root = ElementTree.parse(xml_path).getroot()
            width = float(root.findtext("size/width") or size[0])
            height = float(root.findtext("size/height") or size[1])
            classes, coordinates = [], []
            for obj in root.iter("object"):
                box = obj.find("bndbox")
                x0, y0, x1, y1 = (float(box.findtext(key)) for key in ("xmin", "ymin", "xmax", "ymax"))
                classes.append(self.class_index.get((obj.findtext("name") or "").strip(), -1))
                coordinates.append([x0 - 1, y0 - 1, x1, y1])  # 1-based inclusive pixels -> pixel edges
        except (ElementTree.ParseError, AttributeError, TypeError, ValueError) as error:
            raise ValueError(f"{xml_path}: not a PASCAL VOC / ImageNet box file ({error})") from error
        scale = torch.tensor([size[0] / width, size[1] / height] * 2)
        boxes = torch.tensor(coordinates, dtype=torch.float32).view(-1, 4) * scale
        return torch.tensor(classes, dtype=torch.long), tv_tensors.BoundingBoxes(
            boxes, format="XYXY", canvas_size=(size[1], size[0])
        )


def visible_boxes(classes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``[n, 5]`` (class, x0, y0, x1, y1) clipped to the (cropped) canvas; boxes cropped away are dropped."""
    height, width = boxes.canvas_size
    xyxy = boxes.as_subclass(torch.Tensor).float().clone()
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    return torch.cat([classes[keep, None].float(), xyxy[keep]], dim=1)
