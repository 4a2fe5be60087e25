"""Pretraining objectives against hand-computed values."""

import math

import torch

from vilbert import losses


def test_masked_lm_loss_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(4.0), 0.0]])  # p(target) = 3/4 and 4/5
    loss = losses.masked_lm_loss(logits, torch.tensor([1, 0]))
    assert torch.isclose(loss, torch.tensor(-(math.log(0.75) + math.log(0.8)) / 2))


def test_empty_selections_give_zero_not_nan():
    logits = torch.randn(0, 10, requires_grad=True)
    assert losses.masked_lm_loss(logits, torch.zeros(0, dtype=torch.long)).item() == 0.0
    region_logits = torch.randn(2, 4, 5, requires_grad=True)
    none = torch.zeros(2, 4, dtype=torch.bool)
    for loss in (losses.masked_region_kl_loss(region_logits, torch.softmax(torch.randn(2, 4, 5), -1), none),
                 losses.masked_region_regression_loss(region_logits, torch.randn(2, 4, 5), none),
                 losses.masked_region_nce_loss(region_logits, torch.randn(2, 4, 5), none, ~none, 3)):
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(region_logits.grad).all()


def test_region_kl_averages_over_masked_regions():
    target = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]])
    logits = torch.log(torch.tensor([[[0.25, 0.25, 0.5], [0.2, 0.3, 0.5], [0.5, 0.25, 0.25]]]))
    masked = torch.tensor([[True, False, True]])
    kl_first = 0.5 * math.log(0.5 / 0.25) * 2  # zero-probability classes contribute nothing
    kl_third = 1.0 * math.log(1.0 / 0.5)
    loss = losses.masked_region_kl_loss(logits, target, masked)
    assert torch.isclose(loss, torch.tensor((kl_first + kl_third) / 2), atol=1e-6)


def test_region_regression_is_mse_over_masked_elements():
    predicted = torch.zeros(1, 3, 2)
    target = torch.tensor([[[1.0, 3.0], [5.0, 5.0], [2.0, 0.0]]])
    masked = torch.tensor([[True, False, True]])
    assert torch.isclose(losses.masked_region_regression_loss(predicted, target, masked),
                         torch.tensor((1 + 9 + 4 + 0) / 4.0))


def test_region_nce_with_a_single_possible_negative():
    # Two candidate regions: every negative drawn for region 0 must be region 1 and vice versa.
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    predicted = torch.tensor([[[2.0, 1.0], [0.5, 0.0]]])
    masked = torch.tensor([[True, True]])
    loss = losses.masked_region_nce_loss(predicted, target, masked, torch.ones_like(masked), num_negative=3)
    # region 0: scores [2 (own), 1, 1, 1]; region 1: scores [0 (own), 0.5, 0.5, 0.5]
    first = -math.log(math.exp(2) / (math.exp(2) + 3 * math.exp(1)))
    second = -math.log(1 / (1 + 3 * math.exp(0.5)))
    assert torch.isclose(loss, torch.tensor((first + second) / 2), atol=1e-6)


def test_alignment_loss_label_zero_is_aligned():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    assert losses.alignment_loss(logits, torch.tensor([0, 1])) < 0.01
    assert losses.alignment_loss(logits, torch.tensor([1, 0])) > 4.9
