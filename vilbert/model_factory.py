"""The `model:` section and the one place a run's model is built from it.

    model.arch     which model (vilbert.modeling.registry: vilbert | single_stream)
    model.preset   its size (vilbert.config.PRESETS), changed field by field in model.overrides
    model.bert     the BERT its text stream starts from (vilbert.bert_source: a directory,
                   `minilm`, or a Hugging Face name); empty: everything starts fresh
    model.init     fine-tuning: the pretrained model whose encoder it starts from
    model.activation_checkpointing   recompute the encoder's activations in backward (large micro batches)
    model.compile  torch.compile (inductor) the model in place; compiled kernels cached between runs
    model.kernels  NVIDIA apex's fused kernels: apex (where importable), torch, or a list of names
                   (vilbert.kernels)

Pretraining builds the pretraining heads, fine-tuning the task heads; both call `build_model`,
and so does nothing else (checkpoint export and `convert-official` take their classes from
the same registry).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from vilbert.config_schema import ConfigError, checked
from vilbert.kernels import KERNELS, KernelChoice, choose_kernels


@dataclass
class ModelConfig:
    arch: str = "vilbert"  # vilbert.modeling.registry.ARCHITECTURES: vilbert | single_stream
    preset: str = "small"
    bert: str | None = None  # the text stream's BERT: a directory, "minilm" (packaged), or a Hugging Face name
    init: str = ""  # fine-tuning: a pretrained model directory (save_pretrained, convert-official); empty: none
    single_stream: bool | None = None  # deprecated: model.arch=single_stream
    overrides: dict[str, Any] = field(default_factory=dict)  # any ViLBERTConfig field
    activation_checkpointing: bool = False  # keep no layer activations; recompute them in backward
    compile: bool = False  # torch.compile the model (in place: the same state dict); the first step compiles
    kernels: Any = checked("apex", lambda v: v in ("apex", "torch") or (isinstance(v, list) and set(v) <= set(KERNELS)),
                           f"apex, torch or a list of {', '.join(KERNELS)}")

    def __post_init__(self):
        if self.single_stream is not None:  # the old spelling: still read, with a warning
            warnings.warn("model.single_stream is deprecated: write model.arch=single_stream (or vilbert)",
                          DeprecationWarning, stacklevel=2)
            self.arch, self.single_stream = ("single_stream" if self.single_stream else "vilbert"), None


def check_model_config(model: ModelConfig) -> None:
    """ConfigError for a preset, arch or override that does not exist (before anything is built)."""
    import difflib

    from vilbert.config import PRESETS, ViLBERTConfig

    if model.preset not in PRESETS:
        raise ConfigError(f"model.preset={model.preset!r} is not a preset; choose from {sorted(PRESETS)}")
    from vilbert.modeling.registry import ARCHITECTURES

    if model.arch not in ARCHITECTURES:
        raise ConfigError(f"model.arch={model.arch!r} is not a model; choose from {sorted(ARCHITECTURES)}")
    fields = list(ViLBERTConfig.__annotations__)  # its own fields, not PretrainedConfig's
    for name in model.overrides:
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=3)
            raise ConfigError(f"model.overrides.{name} is not a ViLBERTConfig field" +
                              (f"; did you mean {', '.join(close)}?" if close else " (see vilbert/config.py)"))


def build_model(model: ModelConfig, heads: str, data_fields: dict[str, int], overrides: dict[str, Any] | None = None,
                device_type: str = "cpu"):
    """The model of `model.arch` with `heads` ("pretraining" or "tasks"), and the state-dict
    names loaded into it (from model.init's encoder or model.bert's text stream: they train
    at optim.lr, the rest at optim.fresh_lr).

    `data_fields` are what the shards fix (v_feature_size, v_target_size); `overrides` what
    the task asks for (e.g. its number of answers); model.overrides win over both. The
    model's `kernels` attribute is the KernelChoice of `model.kernels` on `device_type`."""
    built, loaded = _build(model, heads, data_fields, overrides, device_type)
    built.set_activation_checkpointing(model.activation_checkpointing)
    if model.compile:
        built.compile(dynamic=True)  # batch widths vary (text length, region count): one graph for all
    return built, loaded


def compile_cache() -> str:
    """Where torch.compile keeps compiled kernels between runs (TORCHINDUCTOR_CACHE_DIR sets it)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


# ViLBERTConfig's kernel switches -> the kernel each turns on; set from model.kernels only
KERNEL_SWITCHES = {"use_fused_layer_norm": "fused_layer_norm", "use_fused_dense": "fused_dense",
                   "use_fused_xentropy": "xentropy"}


def _kernels(config, model: ModelConfig, heads: str, device_type: str) -> KernelChoice:
    """Resolve model.kernels for this model and run, and switch the model's kernels to it."""
    from vilbert.modeling.registry import PRETRAINING

    chosen_elsewhere = sorted(KERNEL_SWITCHES.keys() & set(model.overrides))
    if chosen_elsewhere:
        raise ConfigError(f"model.overrides.{chosen_elsewhere[0]}: model.kernels chooses the kernels (apex, torch or "
                          f"a list of {', '.join(KERNELS)})")
    choice = choose_kernels(model.kernels, device_type, {config.hidden_act, config.v_hidden_act},
                            masked_lm=heads == PRETRAINING)
    for switch, kernel in KERNEL_SWITCHES.items():
        setattr(config, switch, kernel in choice.used)
    return choice


def _build(model: ModelConfig, heads: str, data_fields: dict[str, int], overrides: dict[str, Any] | None,
           device_type: str):
    from vilbert.bert_source import resolve_bert
    from vilbert.config import ViLBERTConfig
    from vilbert.convert import from_bert, load_encoder
    from vilbert.modeling.registry import PRETRAINING, arch_of, model_class

    cls = model_class(model.arch, heads)
    asked = {**(overrides or {}), **model.overrides}
    if model.init:
        if heads == PRETRAINING:
            raise ValueError("model.init (a pretrained model to start from) is for fine-tuning; pretraining starts "
                             "from model.bert")
        config = ViLBERTConfig.from_pretrained(model.init, **asked)
        saved = next((arch for arch in map(arch_of, config.architectures or []) if arch), None)
        if saved and saved != model.arch:
            raise ValueError(f"model.init={model.init} is a {saved} model: fine-tune it with model.arch={saved} "
                             f"(not {model.arch})")
        for name, value in data_fields.items():
            if getattr(config, name) != value:
                raise ValueError(f"model.init={model.init} does not fit the shards' region features: its {name} is "
                                 f"{getattr(config, name)}, theirs {value}")
        kernels = _kernels(config, model, heads, device_type)
        built = cls(config)
        loaded = load_encoder(built, model.init)
    else:
        config = ViLBERTConfig.from_preset(model.preset, **{**data_fields, **asked})
        kernels = _kernels(config, model, heads, device_type)
        if model.bert:
            built, report = from_bert(cls, resolve_bert(model.bert), config)  # logs what it loaded (rank 0)
            loaded = frozenset(report.loaded)
        else:
            built, loaded = cls(config), frozenset()
    built.kernels = kernels
    return built, loaded
