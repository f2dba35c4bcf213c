from __future__ import annotations

import math

import pytest
import torch

from tame_lit.losses import MaskingLoss, area_loss, top_fraction_indicator, top_fraction_mask, variation_loss
from tame_lit.maps import keep_top, normalize, smooth, upsample
from tame_lit.metrics.deletion import blurred, pixel_ranks
from tame_lit.training import HeadTrainingModule
from tests.helpers import TINY_BACKBONE


def recorded_masking_pass(head: dict, loss: dict) -> tuple:
    """A tiny head's ``masking_pass`` on two random images: ``(module, images, labels, features, terms, seen,
    forward)``, ``seen`` the input of every backbone pass in order, ``forward`` the backbone's own, unrecorded."""
    torch.manual_seed(0)
    module = HeadTrainingModule(TINY_BACKBONE, head, loss=loss)
    images, labels = torch.rand(2, 3, 64, 64), torch.tensor([1, 4])
    _, features = module.backbone.features(images, module.head.layers)
    forward, seen = module.backbone.forward, []

    def recording(x):
        seen.append(x.detach())
        return forward(x)

    module.backbone.forward = recording
    terms, _ = module.masking_pass(images, features, labels)
    return module, images, labels, features, terms, seen, forward


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


@pytest.mark.parametrize("selection", ["batch", "diagonal"])
def test_two_halves_with_the_whole_batch_columns_average_to_the_whole_batch_loss(selection):
    """What DDP computes (each process its half, gradients averaged) is the one-process loss when each half is
    regularised on the maps of the whole batch's labels (``batch_columns``), in any order."""
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 4, 5, 5, generator=generator)  # 4 classes' maps of 6 images
    logits = torch.randn(6, 10, generator=generator)
    labels = torch.tensor([3, 7, 3, 1, 9, 7])
    columns = torch.tensor([1, 2, 1, 0, 3, 2])  # each label's column among the classes [1, 3, 7, 9]
    loss = MaskingLoss(selection=selection)
    whole = loss(logits, labels, masks, columns)
    everything = torch.tensor([0, 1, 1, 2, 2, 3])  # the whole batch's columns, sorted as the all-reduce gives
    halves = [loss(logits[part], labels[part], masks[part], columns[part], batch_columns=everything)
              for part in (slice(0, 3), slice(3, 6))]  # fmt: skip
    for term in ("ce", "area", "variation", "loss"):
        torch.testing.assert_close((halves[0][term] + halves[1][term]) / 2, whole[term])
    if selection == "batch":  # each half on its own labels only is not the same objective
        alone = [loss(logits[part], labels[part], masks[part], columns[part]) for part in (slice(0, 3), slice(3, 6))]
        assert not torch.allclose((alone[0]["area"] + alone[1]["area"]) / 2, whole["area"])


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


# ---- kept terms: cross-entropy on the image masked as AD/IC@p masks it ------------------------------------------

# a hand-made 1x4x4 map with 16 distinct values; its 4 largest (p = 0.25) are 0.95, 0.9, 0.85, 0.8
HAND_MAP = torch.tensor(
    [
        [
            [0.10, 0.95, 0.20, 0.30],
            [0.80, 0.05, 0.60, 0.15],
            [0.25, 0.70, 0.90, 0.35],
            [0.40, 0.45, 0.85, 0.50],
        ]
    ]
)


@pytest.mark.parametrize("gradient", ["straight_through", "hard"])
def test_top_fraction_mask_forward_is_what_ad_ic_keeps(gradient):
    own, q = HAND_MAP.clone(), 0.80  # q: the 4th largest value, the (1 - 0.25) quantile, by hand
    expected = own * (own >= q)
    assert int((expected > 0).sum()) == 4
    mask = top_fraction_mask(own.requires_grad_(), 0.25, gradient)
    assert mask.dtype == torch.float32
    assert torch.equal(mask.detach(), expected)  # bit-exact, not close
    assert torch.equal(mask.detach(), keep_top(HAND_MAP, 0.25))
    # 15 % of 16 pixels: ceil(2.4) = 3 kept, the threshold is the 3rd largest value
    three = top_fraction_mask(HAND_MAP, 0.15, gradient)
    assert torch.equal(three, HAND_MAP * (HAND_MAP >= 0.85))
    assert torch.equal(three, keep_top(HAND_MAP, 0.15))


def test_top_fraction_mask_breaks_ties_as_keep_top():
    """Saturated maps tie at 1.0: the mask keeps exactly keep_top's ceil(p * HW) pixels, not every tie."""
    maps = torch.tensor([[[1.0, 1.0, 1.0, 0.2], [1.0, 0.5, 0.1, 0.3]]])  # 4 ties at the top, keep 2 of 8
    for gradient in ("straight_through", "hard"):
        mask = top_fraction_mask(maps, 0.25, gradient)
        assert torch.equal(mask, keep_top(maps, 0.25)) and int(mask.count_nonzero()) == 2


def test_straight_through_gradient_is_that_of_the_sigmoid_relaxation():
    temperature = 0.05
    own = HAND_MAP.clone().requires_grad_()
    weights = torch.linspace(-1.0, 2.0, 16).view(1, 4, 4)  # an arbitrary upstream gradient
    (top_fraction_mask(own, 0.25, "straight_through", temperature) * weights).sum().backward()

    # analytic: d/dx [x * sigmoid((x - q) / T)] = s + x * s * (1 - s) / T, with q = 0.8 held fixed
    s = torch.sigmoid((HAND_MAP - 0.80) / temperature)
    torch.testing.assert_close(own.grad, weights * (s + HAND_MAP * s * (1 - s) / temperature))
    # and a separate autograd of the soft formula
    soft_own = HAND_MAP.clone().requires_grad_()
    (soft_own * torch.sigmoid((soft_own - 0.80) / temperature) * weights).sum().backward()
    torch.testing.assert_close(own.grad, soft_own.grad)
    outside = HAND_MAP < 0.80
    assert (own.grad[outside] != 0).all()  # pixels outside the top set get a signal to enter it


def test_hard_gradient_reaches_only_the_kept_pixels():
    own = HAND_MAP.clone().requires_grad_()
    weights = torch.linspace(-1.0, 2.0, 16).view(1, 4, 4)
    (top_fraction_mask(own, 0.25, "hard") * weights).sum().backward()
    torch.testing.assert_close(own.grad, weights * (HAND_MAP >= 0.80))
    assert (own.grad[HAND_MAP < 0.80] == 0).all()


@pytest.mark.parametrize("gradient", ["straight_through", "hard"])
def test_keeping_every_pixel_is_the_plain_mask(gradient):
    own = torch.rand(2, 5, 5, requires_grad=True)
    mask = top_fraction_mask(own, 1.0, gradient)
    assert torch.equal(mask, own)
    mask.sum().backward()
    assert torch.equal(own.grad, torch.ones_like(own))


def test_top_fraction_mask_is_float32_per_image_under_bf16_autocast():
    maps = torch.rand(3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask = top_fraction_mask(maps.bfloat16().float().requires_grad_(), 0.15)
    assert mask.dtype == torch.float32
    assert torch.equal(mask.detach(), keep_top(maps.bfloat16().float(), 0.15))
    assert (mask.detach().flatten(1).count_nonzero(dim=1) == math.ceil(0.15 * 64)).all()


def test_loss_with_kept_terms_by_hand():
    loss = MaskingLoss(ce=1.5, area=2.0, variation=0.01, kept=[0.5, 0.15], kept_ce=0.7)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    kept_50 = torch.tensor([[1.0, 0.5], [0.2, 0.1]])
    kept_15 = torch.tensor([[0.0, 3.0], [-1.0, 1.0]])
    labels = torch.tensor([0, 1])
    masks = torch.full((2, 2, 2, 2), 0.5)
    terms = loss(logits, labels, masks, labels, [kept_50, kept_15])

    def ce(z):  # CE by hand: mean over the batch of log-sum-exp - the label's logit
        rows = zip(z.tolist(), [0, 1], strict=True)
        return sum(math.log(math.exp(row[0]) + math.exp(row[1])) - row[y] for row, y in rows) / 2

    area = 0.5005**0.3
    # constant 2x2 maps, B x B = 4 of them: no differences; 8 border values of 0.5^2 each per map
    variation = (0 + 0 + 0.3 * 4 * 8 * 0.25) / (2 * 2)
    assert list(terms) == ["ce", "area", "variation", "loss", "ce@50", "ce@15"]
    assert terms["ce@50"].item() == pytest.approx(0.7 * ce(kept_50))
    assert terms["ce@15"].item() == pytest.approx(0.7 * ce(kept_15))
    expected = 1.5 * ce(logits) + 0.7 * ce(kept_50) + 0.7 * ce(kept_15) + 2.0 * area + 0.01 * variation
    assert terms["loss"].item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="needs 2 kept logits, got 1"):
        loss(logits, labels, masks, labels, [kept_50])


def test_no_kept_fraction_is_exactly_the_old_objective():
    torch.manual_seed(0)
    logits, labels, masks = torch.randn(3, 4), torch.tensor([0, 3, 0]), torch.rand(3, 2, 6, 6)
    columns = torch.tensor([0, 1, 0])
    for loss in (MaskingLoss(), MaskingLoss(kept=())):
        terms = loss(logits, labels, masks, columns)
        regularised = masks[:, columns]
        old = {
            "ce": 1.5 * torch.nn.functional.cross_entropy(logits.float(), labels),
            "area": 2.0 * area_loss(regularised, 0.3),
            "variation": 0.01 * variation_loss(regularised, 0.3),
        }
        old["loss"] = old["ce"] + old["area"] + old["variation"]
        assert list(terms) == list(old)
        for key, value in old.items():
            assert torch.equal(terms[key], value), key


def test_masking_pass_runs_one_backbone_pass_per_kept_fraction():
    calls = []
    for kept in ((), (0.5, 0.15)):
        run = recorded_masking_pass({"name": "tame"}, {"kept": kept})
        module, images, labels, features, terms, seen, forward = run
        calls.append(len(seen))
        terms["loss"].backward()
        assert all(p.grad is not None for p in module.head.parameters() if p.requires_grad)
        if kept:
            assert {"ce@50", "ce@15"} <= set(terms)
            expected = terms["ce"] + terms["area"] + terms["variation"] + terms["ce@50"] + terms["ce@15"]
            torch.testing.assert_close(terms["loss"], expected)
            own = torch.nn.functional.interpolate(
                torch.sigmoid(module.head(features))[torch.arange(2), labels][:, None], size=(64, 64),
                mode="bilinear", align_corners=False,
            )[:, 0]  # fmt: skip
            ce15 = torch.nn.functional.cross_entropy(forward(images * keep_top(own, 0.15)[:, None]), labels)
            torch.testing.assert_close(terms["ce@15"], 1.5 * ce15)
    assert calls == [1, 3]  # no extra pass without kept fractions


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kept": [0.5, 0.0]}, r"loss\.kept .*\(0, 1\], got 0\.0"),
        ({"kept": [1.5]}, r"loss\.kept .*\(0, 1\], got 1\.5"),
        ({"kept": [0.15, 0.15]}, r"loss\.kept lists a fraction twice"),
        ({"kept_gradient": "soft"}, r"loss\.kept_gradient .*'soft'"),
        ({"kept_temperature": 0.0}, r"loss\.kept_temperature must be > 0"),
        ({"deleted": [1.0]}, r"loss\.deleted .*\(0, 1\).*got 1\.0"),
        ({"deleted": [0.1, 0.1]}, r"loss\.deleted lists a fraction twice"),
        ({"inserted": [1.0]}, r"loss\.inserted .*\(0, 1\).*got 1\.0"),
        ({"inserted": [0.0]}, r"loss\.inserted .*\(0, 1\).*got 0\.0"),
        ({"inserted": [0.15, 0.15]}, r"loss\.inserted lists a fraction twice"),
    ],
)
def test_kept_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        MaskingLoss(**options)


# ---- deleted terms: the label's probability once the map's top pixels are deleted ------------------------------


def test_top_fraction_indicator_marks_what_deletion_deletes_first():
    own = HAND_MAP.clone().requires_grad_()
    indicator = top_fraction_indicator(own, 0.25)
    assert indicator.dtype == torch.float32
    assert torch.equal(indicator.detach(), (HAND_MAP >= 0.80).float())  # the 4 largest, exactly 0/1
    # the same pixels the deletion curve removes first
    first = torch.zeros(16).scatter_(0, pixel_ranks(HAND_MAP)[0, :4], 1.0).view(1, 4, 4)
    assert torch.equal(indicator.detach(), first)
    saturated = torch.tensor([[[1.0, 1.0, 1.0, 0.2], [1.0, 0.5, 0.1, 0.3]]])  # ties: exactly 2 of 8 marked
    assert int(top_fraction_indicator(saturated, 0.25).sum()) == 2


def test_top_fraction_indicator_gradient_is_that_of_the_sigmoid_relaxation():
    temperature = 0.05
    own = HAND_MAP.clone().requires_grad_()
    weights = torch.linspace(-1.0, 2.0, 16).view(1, 4, 4)
    (top_fraction_indicator(own, 0.25, temperature) * weights).sum().backward()
    s = torch.sigmoid((HAND_MAP - 0.80) / temperature)  # q = 0.8, the 4th largest, held fixed
    torch.testing.assert_close(own.grad, weights * s * (1 - s) / temperature)


def test_loss_with_deleted_terms_by_hand():
    loss = MaskingLoss(ce=1.5, area=2.0, variation=0.01, deleted=[0.1, 0.3], deleted_weight=0.4)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    deleted_10 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    deleted_30 = torch.tensor([[0.0, 2.0], [3.0, 1.0]])
    labels = torch.tensor([0, 1])
    masks = torch.full((2, 2, 2, 2), 0.5)
    terms = loss(logits, labels, masks, labels, deleted_logits=[deleted_10, deleted_30])
    assert list(terms) == ["ce", "area", "variation", "loss", "del@10", "del@30"]

    def probability(a, b):  # softmax probability of the first of two logits
        return 1 / (1 + math.exp(b - a))

    # image 0 (label 0) and image 1 (label 1): the label's probability after deletion, averaged
    del_10 = (probability(1.0, 0.0) + probability(0.0, 0.0)) / 2
    del_30 = (probability(0.0, 2.0) + probability(1.0, 3.0)) / 2
    assert terms["del@10"].item() == pytest.approx(0.4 * del_10)
    assert terms["del@30"].item() == pytest.approx(0.4 * del_30)
    base = terms["ce"] + terms["area"] + terms["variation"]
    assert terms["loss"].item() == pytest.approx(base.item() + 0.4 * (del_10 + del_30))
    with pytest.raises(ValueError, match="needs 2 deleted logits, got 0"):
        loss(logits, labels, masks, labels)


@pytest.mark.parametrize("smoothing", [0.0, 1.0])
def test_masking_pass_deletes_the_top_pixels_in_one_extra_pass(smoothing):
    """The deleted pixels are the explanation's top ones: with ``head.smoothing``, those of the blurred map."""
    run = recorded_masking_pass({"name": "tame", "smoothing": smoothing}, {"deleted": [0.2]})
    module, images, labels, features, terms, seen, forward = run
    assert len(seen) == 2  # the masked image, then the deleted one
    # the masked image: times the sigmoid mask of each image's label, upsampled, blurred as the explanation is
    own_logits = module.head(features)[torch.arange(2), labels]
    mask = upsample(torch.sigmoid(own_logits), (64, 64))
    if smoothing:
        mask = smooth(mask, (smoothing * 64 / own_logits.shape[-1],) * 2)
    torch.testing.assert_close(seen[0], images * mask[:, None], rtol=0, atol=1e-6)
    own = torch.nn.functional.interpolate(  # the logits, upsampled: the explanations' pixel order
        module.head(features)[torch.arange(2), labels][:, None], size=(64, 64), mode="bilinear", align_corners=False,
    )[:, 0]  # fmt: skip
    if smoothing:  # blurred by `smoothing` cells of the head's map, in pixels of the image
        low = module.head(features).shape[-1]
        own = smooth(normalize(own), (smoothing * 64 / low,) * 2)
    # the deleted pixels: exactly ceil(20 %) per image, none less salient than any pixel left (bilinear maps tie)
    deleted = (seen[1] == 0).all(dim=1) & (images != 0).all(dim=1)
    assert deleted.flatten(1).sum(dim=1).tolist() == [math.ceil(0.2 * 64 * 64)] * 2
    for b in range(2):
        assert own[b][deleted[b]].min() >= own[b][~deleted[b]].max()
    torch.testing.assert_close(seen[1], images * (~deleted)[:, None].float())
    expected = forward(seen[1]).softmax(dim=1)[torch.arange(2), labels].mean()
    torch.testing.assert_close(terms["del@20"], expected)
    terms["del@20"].backward()  # the probability's gradient reaches the head through the relaxed threshold
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.head.parameters())


# ---- inserted terms: the label's probability missing once only the map's top pixels are put back ------------------


def test_loss_with_inserted_terms_by_hand():
    loss = MaskingLoss(ce=1.5, area=2.0, variation=0.01, deleted=[0.1], inserted=[0.05, 0.2], inserted_weight=0.6)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    deleted_10 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    inserted_5 = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    inserted_20 = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    labels = torch.tensor([0, 1])
    masks = torch.full((2, 2, 2, 2), 0.5)
    terms = loss(logits, labels, masks, labels, [], [deleted_10], inserted_logits=[inserted_5, inserted_20])
    assert list(terms) == ["ce", "area", "variation", "loss", "del@10", "ins@5", "ins@20"]

    def probability(a, b):  # softmax probability of the first of two logits
        return 1 / (1 + math.exp(b - a))

    # 1 - the label's probability once the top pixels are back in the blurred image, averaged over the images
    ins_5 = ((1 - probability(0.0, 1.0)) + (1 - probability(0.0, 2.0))) / 2
    ins_20 = ((1 - probability(3.0, 0.0)) + (1 - probability(0.5, 0.0))) / 2
    assert terms["ins@5"].item() == pytest.approx(0.6 * ins_5)
    assert terms["ins@20"].item() == pytest.approx(0.6 * ins_20)
    base = terms["ce"] + terms["area"] + terms["variation"] + terms["del@10"]
    assert terms["loss"].item() == pytest.approx(base.item() + 0.6 * (ins_5 + ins_20))
    with pytest.raises(ValueError, match="needs 2 inserted logits, got 1"):
        loss(logits, labels, masks, labels, [], [deleted_10], inserted_logits=[inserted_5])


def test_masking_pass_inserts_the_top_pixels_into_the_blurred_image():
    """One extra pass on insertion's blurred start with the explanation's top pixels put back, as the curve does."""
    run = recorded_masking_pass({"name": "tame"}, {"inserted": [0.2]})
    module, images, labels, features, terms, seen, forward = run
    assert len(seen) == 2  # the masked image, then the inserted one
    start = blurred(images)
    inserted = (seen[1] - images).abs().amax(dim=1) < 1e-6  # the pixels put back
    assert ((seen[1] - start).abs().amax(dim=1)[~inserted] < 1e-6).all()  # the rest: the blurred start
    assert inserted.flatten(1).sum(dim=1).tolist() == [math.ceil(0.2 * 64 * 64)] * 2
    own = torch.nn.functional.interpolate(  # the explanations' pixel order: the upsampled logits
        module.head(features)[torch.arange(2), labels][:, None], size=(64, 64), mode="bilinear", align_corners=False,
    )[:, 0]  # fmt: skip
    for b in range(2):
        assert own[b][inserted[b]].min() >= own[b][~inserted[b]].max()
    expected = 1 - forward(seen[1]).softmax(dim=1)[torch.arange(2), labels].mean()
    torch.testing.assert_close(terms["ins@20"], expected)
    assert "del@20" not in terms
    terms["ins@20"].backward()  # the probability's gradient reaches the head through the relaxed threshold
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.head.parameters())
