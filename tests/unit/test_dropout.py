"""The CPU dropout: four 16-bit masks per 64-bit draw from torch's generator."""

import pytest
import torch

from vilbert import ViLBERTConfig, ViLBERTForPretraining, ViLBERTForTasks
from vilbert.modeling.dropout import Dropout, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_each_of_the_four_lanes_of_a_draw_keeps_at_the_rate_asked(p):
    """Every lane separately: a lane from a draw's top bits, were they not random (torch's
    default range leaves the sign bit 0), would keep at another rate."""
    torch.manual_seed(0)
    per_lane = 250_000
    kept = keep_mask(torch.Size([per_lane * 4]), p).view(per_lane, 4).double().mean(0)
    expected = 1 - round(p * 65536) / 65536
    sigma = (expected * (1 - expected) / per_lane) ** 0.5
    assert (kept - expected).abs().max() < 5 * sigma, kept


def test_kept_elements_are_scaled_and_the_gradient_follows_the_mask():
    torch.manual_seed(0)
    x = (torch.rand(64, 33) + 0.5).requires_grad_()  # no zeros: a zero output means dropped
    y = dropout(x, 0.25)
    kept = y != 0
    assert 0.6 < kept.double().mean() < 0.9
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)


def test_a_seed_repeats_the_mask_and_the_next_call_draws_another():
    x = torch.ones(1000, dtype=torch.bfloat16)
    torch.manual_seed(3)
    first, second = dropout(x, 0.1), dropout(x, 0.1)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.1), first) and not torch.equal(first, second)
    assert first.dtype == torch.bfloat16


def test_identity_in_evaluation_and_at_zero_and_all_dropped_at_one():
    x = torch.randn(10, 7)
    module = Dropout(0.3).eval()
    assert module(x) is x and dropout(x, 0.0) is x and dropout(x, 0.3, training=False) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))


@pytest.mark.parametrize("cls", [ViLBERTForPretraining, ViLBERTForTasks])
def test_every_dropout_of_the_models_is_the_cpu_one(cls):
    model = cls(ViLBERTConfig.from_preset("tiny"))
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(type(m) is Dropout for m in dropouts)
