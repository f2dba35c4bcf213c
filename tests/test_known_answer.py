"""The known-answer benchmark (tame_lit.known_answer): synthetic images where a red square's position decides the
class, and tiny classifiers that learn them in seconds. On the trained tiny ViT, attention rollout and a TAME head
trained by tame-lit must peak on the square in >= 90 % of held-out images; on the same ViT untrained, they must
not (a method that finds the square there reads the image, not the model). The full table, every method on a ViT
and a CNN, is ``python benchmarks/known_answer.py`` (README, "A benchmark with a known answer")."""

from __future__ import annotations

import pytest
import torch

from tame_lit import backbones, explainers
from tame_lit.data.images import collate
from tame_lit.data.synthetic import CLASSES, OBJECT_COLOUR, QUADRANTS, ObjectPositionImages
from tame_lit.known_answer import KnownAnswer, backbone_config, pointing_scores, train_classifier, train_head


def test_each_image_has_its_red_square_in_the_quadrant_of_its_class_and_is_the_same_on_every_call():
    images = ObjectPositionImages(60, size=64, object_size=8, seed=3)
    counts = torch.zeros(len(CLASSES))
    for index in range(len(images)):
        image, label, reported, boxes = images[index]
        assert reported == index and image.shape == (3, 64, 64) and image.min() >= 0 and image.max() <= 1
        assert torch.equal(image, images[index][0])  # its own generator: the same image on every call
        counts[label] += 1
        red = (image[0] > 0.9) & (image[1] < 0.2)  # only the object is this red
        if label == CLASSES.index("no object"):
            assert boxes.shape == (0, 5) and not red.any()
            continue
        assert boxes.shape == (1, 5) and boxes[0, 0] == label
        x0, y0, x1, y1 = boxes[0, 1:].int().tolist()
        assert (x1 - x0, y1 - y0) == (8, 8)
        assert red[y0:y1, x0:x1].all() and red.sum() == 64
        torch.testing.assert_close(image[:, y0, x0], torch.tensor(OBJECT_COLOUR))
        row, column = divmod(label, 2)  # QUADRANTS: top left, top right, bottom left, bottom right
        assert (y0 >= 32) == bool(row) and (y1 <= 32) == (not row)
        assert (x0 >= 32) == bool(column) and (x1 <= 32) == (not column), QUADRANTS[label]
    assert (counts > 0).all()  # every class drawn
    assert not torch.equal(ObjectPositionImages(1, seed=4)[0][0], images[0][0])  # another seed, other images


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"length": 0}, "length"),
        ({"length": 4, "object_size": 31}, "object_size"),
        ({"length": 4, "noise": 2}, "noise"),
    ],
)
def test_impossible_synthetic_images_are_refused_naming_the_setting(options, message):
    with pytest.raises(ValueError, match=message):
        ObjectPositionImages(**options)


@pytest.fixture(scope="module")
def settings() -> KnownAnswer:
    return KnownAnswer(held_out_images=160)


def test_on_the_trained_tiny_vit_rollout_and_a_trained_head_find_the_object_and_not_on_the_untrained_one(
    settings, tmp_path
):
    found = {}
    for trained in (True, False):
        weights = tmp_path / f"vit_{trained}.safetensors"
        accuracy = train_classifier("vit", settings, weights, epochs=None if trained else 0)
        assert (accuracy >= 0.95) if trained else (accuracy <= 0.5), accuracy
        vit = backbones.create(**backbone_config("vit", weights))
        methods = {
            "attention_rollout": explainers.create("attention_rollout", vit),
            "tame": train_head("vit", weights, settings, tmp_path / str(trained)),
        }
        found[trained] = pointing_scores(vit, methods, settings)
    for name in ("attention_rollout", "tame"):
        trained, untrained = found[True][name], found[False][name]
        assert trained.images == untrained.images >= 100  # held-out images with an object
        assert trained.hits >= 0.9, (name, trained)
        assert untrained.hits <= 0.3 and untrained.high < trained.low, (name, untrained)


def test_the_held_out_images_are_not_the_training_images(settings):
    training = collate([settings.training_set()[i] for i in range(32)])["images"]
    held_out = collate([settings.held_out_set()[i] for i in range(32)])["images"]
    assert not any(torch.equal(a, b) for a in training for b in held_out)
