import pytest
import torch

from vilbert import ViLBERTConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    return ViLBERTConfig.from_preset("tiny")
