"""The two-stream encoder: text layers, region layers and co-attention layers, wired as
the official `BertEncoder`.

Co-attention block k runs after every text layer with index < t_biattention_id[k] and
every region layer with index < v_biattention_id[k]; the layers left over run after the
last block. `schedule()` spells that order out once, and `forward` simply walks it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from vilbert.config import ViLBERTConfig
from vilbert.modeling.layers import CoAttentionLayer, build_layer, run_layer


class Step(NamedTuple):
    kind: str  # "text", "region" or "co"
    index: int


def schedule(config: ViLBERTConfig) -> list[Step]:
    steps: list[Step] = []
    t = v = 0
    for k, (t_end, v_end) in enumerate(zip(config.t_biattention_id, config.v_biattention_id)):
        steps += [Step("text", i) for i in range(t, t_end)]
        steps += [Step("region", i) for i in range(v, v_end)]
        steps.append(Step("co", k))
        t, v = t_end, v_end
    steps += [Step("region", i) for i in range(v, config.v_num_hidden_layers)]
    steps += [Step("text", i) for i in range(t, config.num_hidden_layers)]
    return steps


@dataclass
class EncoderAttentions:
    text: list[torch.Tensor]
    region: list[torch.Tensor]
    co: list[tuple[torch.Tensor, torch.Tensor]]  # (text queries over regions, region queries over text)


class TwoStreamEncoder(nn.Module):
    def __init__(self, config: ViLBERTConfig):
        super().__init__()
        self.text_layers = nn.ModuleList(build_layer(config, "text") for _ in range(config.num_hidden_layers))
        self.region_layers = nn.ModuleList(build_layer(config, "region") for _ in range(config.v_num_hidden_layers))
        self.co_layers = nn.ModuleList(CoAttentionLayer(config) for _ in range(config.num_co_attention_layers))
        self.steps = schedule(config)
        # The official `fixed_t_layer`/`fixed_v_layer`: the first layers run without gradients.
        self.frozen = {"text": config.fixed_t_layer, "region": config.fixed_v_layer, "co": 0}
        self.activation_checkpointing = False  # model.activation_checkpointing: recompute each layer in backward

    def forward(self, text, region, text_bias, region_bias, output_attentions: bool = False):
        attentions = EncoderAttentions([], [], [])
        for step in self.steps:
            frozen = step.index < self.frozen[step.kind]
            with torch.no_grad() if frozen else contextlib.nullcontext():
                checkpointed = self.activation_checkpointing and not frozen
                if step.kind == "co":
                    text, region, probs = run_layer(self.co_layers[step.index], text, region, text_bias, region_bias,
                                                    output_attentions, checkpointed=checkpointed)
                    attentions.co.append(probs)
                elif step.kind == "text":
                    text, probs = run_layer(self.text_layers[step.index], text, text, text_bias, output_attentions,
                                            checkpointed=checkpointed)
                    attentions.text.append(probs)
                else:
                    region, probs = run_layer(self.region_layers[step.index], region, region, region_bias,
                                              output_attentions, checkpointed=checkpointed)
                    attentions.region.append(probs)
        return text, region, (attentions if output_attentions else None)
