from __future__ import annotations

import pytest
import torch

from tame_lit.losses import MaskingLoss, area_loss, variation_loss
from tame_lit.training import HeadTrainingModule
from tests.helpers import TINY_BACKBONE


def test_area_loss_by_hand():
    masks = torch.full((2, 3, 4, 4), 0.5)
    torch.testing.assert_close(area_loss(masks), torch.tensor(0.5005**0.3))


def test_variation_loss_by_hand():
    masks = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])  # B=1, one 2x2 map
    # differences: rows (1-0)^2 + 0 = 1, columns (1-0)^2 + 0 = 1; border: each edge once, corners twice:
    # top 0+1, bottom 1+1, left 0+1, right 1+1 = 6
    expected = (1 + 1 + 0.3 * 6) / (2 * 1)
    torch.testing.assert_close(variation_loss(masks), torch.tensor(expected))


def test_selection_batch_is_b_by_b_and_diagonal_is_b_by_1():
    masks = torch.rand(3, 2, 5, 5)  # maps of the 2 distinct labels in the batch
    columns = torch.tensor([1, 0, 1])
    assert MaskingLoss(selection="batch").regularised_maps(masks, columns).shape == (3, 3, 5, 5)
    diagonal = MaskingLoss(selection="diagonal").regularised_maps(masks, columns)
    torch.testing.assert_close(diagonal[:, 0], masks[torch.arange(3), columns])
    with pytest.raises(ValueError, match="'batch' or 'diagonal'"):
        MaskingLoss(selection="random")


def test_loss_combines_the_terms_with_their_weights():
    loss = MaskingLoss(ce=1.5, area=2.0, variation=0.01)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    masks = torch.rand(2, 2, 4, 4)
    terms = loss(logits, labels, masks, label_columns=labels)
    regularised = masks[:, labels]
    torch.testing.assert_close(terms["ce"], 1.5 * torch.nn.functional.cross_entropy(logits, labels))
    torch.testing.assert_close(terms["area"], 2.0 * area_loss(regularised))
    torch.testing.assert_close(terms["variation"], 0.01 * variation_loss(regularised))
    torch.testing.assert_close(terms["loss"], terms["ce"] + terms["area"] + terms["variation"])


@pytest.mark.parametrize("selection", ["batch", "diagonal"])
def test_label_maps_only_give_the_loss_of_all_class_maps(selection):
    """The training step computes maps of the batch's labels only; the loss equals the naive one."""
    torch.manual_seed(0)
    module = HeadTrainingModule(TINY_BACKBONE, {"name": "tame"}, loss={"selection": selection})
    images = torch.rand(4, 3, 64, 64)
    labels = torch.tensor([3, 7, 3, 0])
    _, features = module.backbone.features(images, module.head.layers)
    terms, _ = module.masking_pass(images, features, labels)

    all_masks = torch.sigmoid(module.head(features))  # [B, 10, h, w], the original code's a
    own = torch.nn.functional.interpolate(
        all_masks[torch.arange(4), labels][:, None], size=(64, 64), mode="bilinear", align_corners=False
    )
    logits = module.backbone(images * own)
    regularised = all_masks[:, labels] if selection == "batch" else all_masks[torch.arange(4), labels][:, None]
    expected = (
        1.5 * torch.nn.functional.cross_entropy(logits, labels)
        + 2.0 * area_loss(regularised)
        + 0.01 * variation_loss(regularised)
    )
    torch.testing.assert_close(terms["loss"], expected)
