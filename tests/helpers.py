"""Helpers shared by the tests."""

import torch

from vilbert import ViLBERTConfig


def make_inputs(config: ViLBERTConfig, batch=3, tokens=9, regions=6, generator_seed=0):
    """Random model inputs with some padding in both streams (the first sample unpadded)."""
    g = torch.Generator().manual_seed(generator_seed)
    input_ids = torch.randint(1, config.vocab_size, (batch, tokens), generator=g)
    attention_mask = torch.ones(batch, tokens, dtype=torch.long)
    region_mask = torch.ones(batch, regions, dtype=torch.long)
    for b in range(1, batch):
        attention_mask[b, tokens - 2 * b:] = 0
        region_mask[b, regions - b:] = 0
    return dict(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids), attention_mask=attention_mask,
                region_features=torch.randn(batch, regions, config.v_feature_size, generator=g),
                region_locations=torch.rand(batch, regions, 5, generator=g), region_mask=region_mask)
