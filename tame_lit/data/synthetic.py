"""Synthetic images with a known answer: a small object whose position decides the class, among clutter.

Nothing but the object's pixels tells the classes apart (the clutter is placed at random, whatever the class), so a
classifier that has learned the task decides from the object, and a faithful explanation of its decision peaks on
the object's box. A tiny ViT or CNN learns it in seconds on a CPU, which makes it tame-lit's check that the
explanations of a model are right without any downloadable weights (``tame_lit.known_answer``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["CLASSES", "QUADRANTS", "ObjectPositionImages"]

QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
CLASSES = (*QUADRANTS, "no object")
OBJECT_COLOUR = (1.0, 0.1, 0.1)  # red: the only red squares of the images
CLUTTER_COLOURS = ((0.1, 0.85, 0.1), (0.15, 0.2, 1.0), (0.1, 0.9, 0.9))  # green, blue, cyan


class ObjectPositionImages(Dataset):
    """``length`` images ``[3, size, size]`` in [0, 1]: a dark, noisy background (uniform in [0, ``noise``]),
    ``distractors`` squares of the clutter colours anywhere, and one red square of ``object_size`` pixels inside one
    quadrant, whose class is the quadrant; or, in one image of five, no red square: the class ``no object``
    (``CLASSES``). That class matters: with four classes a model can learn "no red square in the other three
    quadrants" for the fourth, and the object would then not be the evidence of that class; with it, every
    quadrant's class needs the object. Image ``i`` is the same on every call and machine (its own generator, seeded
    by ``seed`` and ``i``), so a training and a held-out set are two seeds.

    Items are ``(image, class, index, boxes)`` with ``boxes`` ``[1, 5]`` = (class, x0, y0, x1, y1), the object's
    pixel edges (``[0, 5]`` without object): the item format of tame-lit's datasets with boxes
    (``tame_lit.data.images.collate``), which the pointing game reads.

    The background is dark on purpose: the masked images that TAME's training, AD/IC and deletion show the model
    (zeros outside the mask) then stay close to the training images, so keeping the object keeps the decision.
    """

    classes = CLASSES

    def __init__(
        self,
        length: int,
        size: int = 64,
        object_size: int = 8,
        distractors: int = 5,
        noise: float = 0.3,
        seed: int = 0,
    ) -> None:
        if length < 1:
            raise ValueError(f"length must be >= 1 image, got {length}")
        if not 1 <= object_size <= size // 2 - 2:
            raise ValueError(
                f"object_size must be in [1, size / 2 - 2] = [1, {size // 2 - 2}] pixels, got {object_size}"
            )
        if distractors < 0 or not 0.0 <= noise <= 1.0:
            raise ValueError(f"distractors must be >= 0 and noise in [0, 1], got {distractors} and {noise}")
        self.length, self.size, self.object_size = int(length), int(size), int(object_size)
        self.distractors, self.noise, self.seed = int(distractors), float(noise), int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, int, int, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"image {index} of {self.length}")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)

        def draw(high: int) -> int:
            return int(torch.randint(high, (1,), generator=generator))

        size, side = self.size, self.object_size
        image = self.noise * torch.rand(3, size, size, generator=generator)
        label = draw(len(CLASSES))
        half = size // 2
        row, column = divmod(label % len(QUADRANTS), 2)
        top = row * half + 1 + draw(half - side - 1)  # a pixel away from the quadrant's edges
        left = column * half + 1 + draw(half - side - 1)
        placed = [(top, left)] if label < len(QUADRANTS) else []
        for _ in range(self.distractors):
            for _attempt in range(20):  # clutter does not cover the object or other clutter (when there is room)
                y, x = draw(size - side), draw(size - side)
                if all(abs(y - py) > side or abs(x - px) > side for py, px in placed):
                    break
            placed.append((y, x))
            colour = torch.tensor(CLUTTER_COLOURS[draw(len(CLUTTER_COLOURS))])
            image[:, y : y + side, x : x + side] = colour[:, None, None]
        if label == len(QUADRANTS):
            return image.clamp_(0.0, 1.0), label, index, torch.zeros(0, 5)
        image[:, top : top + side, left : left + side] = torch.tensor(OBJECT_COLOUR)[:, None, None]
        boxes = torch.tensor([[label, left, top, left + side, top + side]], dtype=torch.float32)
        return image.clamp_(0.0, 1.0), label, index, boxes
