"""ViLBERT configuration: the official fields, our own switches, and named presets.

Field names follow the official `config/bert_base_6layer_6conect.json` of
facebookresearch/vilbert-multi-task so that an official JSON loads unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PretrainedConfig

# Masked-region objectives, as the official `visual_target` field numbers them.
VISUAL_TARGET_KL = 0  # KL to the detector's class distribution (the paper's default)
VISUAL_TARGET_REGRESSION = 1  # regress the masked region's feature vector
VISUAL_TARGET_NCE = 2  # contrast the masked region's feature against sampled negatives

ATTENTION_BACKENDS = ("sdpa", "eager", "fused")
FUSION_METHODS = ("mul", "sum")

# Official fields that switch on research code paths we do not carry; any other
# value than the default is refused so that a config never silently means less.
_UNSUPPORTED_OFFICIAL_SWITCHES = {
    "fast_mode": False,
    "in_batch_pairs": False,
    "dynamic_attention": False,
    "task_specific_tokens": False,
    "with_coattention": True,
}


class ViLBERTConfig(PretrainedConfig):
    model_type = "vilbert"

    # --- text stream (BERT) ---
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    # --- visual stream ---
    v_feature_size: int = 2048
    v_target_size: int = 1601
    v_hidden_size: int = 1024
    v_num_hidden_layers: int = 6
    v_num_attention_heads: int = 8
    v_intermediate_size: int = 1024
    v_hidden_act: str = "gelu"
    v_hidden_dropout_prob: float = 0.1
    v_attention_probs_dropout_prob: float = 0.1
    v_initializer_range: float = 0.02
    # --- co-attention ---
    bi_hidden_size: int = 1024
    bi_num_attention_heads: int = 8
    bi_intermediate_size: int = 1024  # present in official JSONs, unused by the official model
    bi_attention_type: int = 1
    v_biattention_id: list[int] | None = None
    t_biattention_id: list[int] | None = None
    fixed_v_layer: int = 0
    fixed_t_layer: int = 0
    # --- heads and objectives ---
    fusion_method: str = "mul"
    visual_target: int = VISUAL_TARGET_KL
    num_negative: int = 128
    objective: int = 0
    model: str = "bert"
    fast_mode: bool = False
    in_batch_pairs: bool = False
    dynamic_attention: bool = False
    task_specific_tokens: bool = False
    with_coattention: bool = True
    visualization: bool = False
    # --- ours ---
    layer_norm_eps: float = 1e-12
    attention_backend: str = "sdpa"  # "sdpa", "eager" (can return attention maps) or "fused" (Triton kernels)
    # apex's kernels (vilbert.kernels; a run's model.kernels sets them), used where importable
    use_fused_layer_norm: bool = True  # apex FusedLayerNorm, else torch's
    use_fused_dense: bool = False  # apex fused_dense for the feed-forward, on GPU (tanh-GELU models only)
    use_fused_xentropy: bool = False  # apex xentropy for the masked-LM loss, on GPU
    num_vqa_answers: int = 3129
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        # Older official JSONs call the fusion `pooling_method`.
        if "pooling_method" in kwargs:
            self.fusion_method = kwargs.pop("pooling_method")
        if self.v_biattention_id is None:
            self.v_biattention_id = list(range(self.v_num_hidden_layers))
        if self.t_biattention_id is None:
            first = self.num_hidden_layers - len(self.v_biattention_id)
            self.t_biattention_id = list(range(first, self.num_hidden_layers))
        self.v_biattention_id = list(self.v_biattention_id)
        self.t_biattention_id = list(self.t_biattention_id)
        super().__post_init__(**kwargs)
        self.validate_vilbert()

    def validate_vilbert(self) -> None:
        def fail(msg):
            raise ValueError(f"ViLBERTConfig: {msg}")

        if len(self.v_biattention_id) != len(self.t_biattention_id):
            fail(f"v_biattention_id {self.v_biattention_id} and t_biattention_id "
                 f"{self.t_biattention_id} must have the same length (one entry per co-attention layer)")
        for name, ids, n in (("t_biattention_id", self.t_biattention_id, self.num_hidden_layers),
                             ("v_biattention_id", self.v_biattention_id, self.v_num_hidden_layers)):
            if any(b < a for a, b in zip(ids, ids[1:])) or any(not 0 <= i <= n for i in ids):
                fail(f"{name} {ids} must be non-decreasing layer indices in [0, {n}]")
        for dim, heads, name in ((self.hidden_size, self.num_attention_heads, "hidden_size"),
                                 (self.v_hidden_size, self.v_num_attention_heads, "v_hidden_size"),
                                 (self.bi_hidden_size, self.bi_num_attention_heads, "bi_hidden_size")):
            if dim % heads:
                fail(f"{name}={dim} is not a multiple of its number of attention heads ({heads})")
        if self.fusion_method not in FUSION_METHODS:
            fail(f"fusion_method must be one of {FUSION_METHODS}, got {self.fusion_method!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            fail(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.visual_target not in (VISUAL_TARGET_KL, VISUAL_TARGET_REGRESSION, VISUAL_TARGET_NCE):
            fail(f"visual_target must be 0 (KL), 1 (regression) or 2 (NCE), got {self.visual_target}")
        if self.visual_target != VISUAL_TARGET_KL and self.v_target_size != self.v_feature_size:
            fail(f"visual_target={self.visual_target} predicts features: v_target_size "
                 f"({self.v_target_size}) must equal v_feature_size ({self.v_feature_size})")
        if self.fixed_t_layer > min(self.t_biattention_id, default=self.num_hidden_layers) or \
                self.fixed_v_layer > min(self.v_biattention_id, default=self.v_num_hidden_layers):
            fail("fixed_t_layer/fixed_v_layer may only freeze layers before the first co-attention layer")
        for name, default in _UNSUPPORTED_OFFICIAL_SWITCHES.items():
            if getattr(self, name) != default:
                fail(f"{name}={getattr(self, name)!r} selects an official research code path that this "
                     f"implementation does not provide (only {default!r} is supported)")

    @property
    def num_co_attention_layers(self) -> int:
        return len(self.t_biattention_id)

    @classmethod
    def from_official_json(cls, path: str | Path, **overrides) -> ViLBERTConfig:
        """Read an official ViLBERT config (e.g. `bert_base_6layer_6conect.json`)."""
        fields = json.loads(Path(path).read_text())
        fields.pop("vocab_size_or_config_json_file", None)
        return cls(**{**fields, **overrides})

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ViLBERTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown ViLBERT preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def _depth_ablation(num_co_layers: int, text_layers: int = 12) -> dict:
    """The paper's depth ablation: co-attention on the last k text layers, k visual layers
    (official `bert_base_{k}layer_{k}conect.json`)."""
    return dict(v_num_hidden_layers=num_co_layers,
                v_biattention_id=list(range(num_co_layers)),
                t_biattention_id=list(range(text_layers - num_co_layers, text_layers)))


_SMALL = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
              v_hidden_size=256, v_num_attention_heads=4, v_intermediate_size=512,
              bi_hidden_size=256, bi_num_attention_heads=4, bi_intermediate_size=512)


PRESETS: dict[str, dict] = {
    # The paper's model: BERT-base text stream, 6 visual layers, 6 co-attention layers.
    "base": _depth_ablation(6),
    "depth2": _depth_ablation(2),
    "depth4": _depth_ablation(4),
    "depth8": _depth_ablation(8),
    # CPU-sized model whose text stream has the shape of MiniLM-L6 (384 wide, 6 layers,
    # bert-base-uncased vocab), so it can start from that real BERT checkpoint; 2 co-attention
    # layers, and the toy depth ablation's 1 and 4.
    "small": {**_SMALL, **_depth_ablation(2, text_layers=6)},
    "small_depth1": {**_SMALL, **_depth_ablation(1, text_layers=6)},
    "small_depth4": {**_SMALL, **_depth_ablation(4, text_layers=6)},
    # For unit tests: a few thousand parameters per layer.
    "tiny": dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=64, v_feature_size=24, v_target_size=11, v_hidden_size=16,
                 v_num_hidden_layers=2, v_num_attention_heads=2, v_intermediate_size=32, bi_hidden_size=16,
                 bi_num_attention_heads=2, bi_intermediate_size=32, v_biattention_id=[0, 1],
                 t_biattention_id=[1, 3], num_vqa_answers=7),
}
