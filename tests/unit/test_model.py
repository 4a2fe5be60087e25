"""Model behaviour: shapes, masks, attention backends, wiring, heads, save/load."""

import pytest
import torch

from helpers import make_inputs
from vilbert import (
    PRESETS,
    SingleStreamForPretraining,
    ViLBERTConfig,
    ViLBERTForPretraining,
    ViLBERTForTasks,
    ViLBERTModel,
)
from vilbert.losses import IGNORE_INDEX
from vilbert.modeling.encoder import schedule


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_shapes(backend):
    config = ViLBERTConfig.from_preset("tiny", attention_backend=backend)
    out = ViLBERTModel(config).eval()(**make_inputs(config))
    assert out.text_sequence.shape == (3, 9, config.hidden_size)
    assert out.region_sequence.shape == (3, 6, config.v_hidden_size)
    assert out.text_pooled.shape == out.region_pooled.shape == (3, config.bi_hidden_size)
    assert (out.text_pooled >= 0).all() and (out.region_pooled >= 0).all()  # ReLU poolers


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_padding_changes_nothing_for_real_positions(backend):
    config = ViLBERTConfig.from_preset("tiny", attention_backend=backend)
    model = ViLBERTForTasks(config).eval()
    inputs = make_inputs(config)
    changed = {k: v.clone() for k, v in inputs.items()}
    pad_t, pad_r = inputs["attention_mask"] == 0, inputs["region_mask"] == 0
    assert pad_t.any() and pad_r.any()
    changed["input_ids"][pad_t] = 7
    changed["region_features"][pad_r] = 100.0
    changed["region_locations"][pad_r] = 0.5
    with torch.no_grad():
        a, b = model(**inputs), model(**changed)
    assert torch.allclose(a.text_sequence[~pad_t], b.text_sequence[~pad_t], atol=1e-6)
    assert torch.allclose(a.region_sequence[~pad_r], b.region_sequence[~pad_r], atol=1e-6)
    assert torch.allclose(a.vqa_logits, b.vqa_logits, atol=1e-6)
    assert torch.allclose(a.pair_logits, b.pair_logits, atol=1e-6)
    # ... and the change is visible where it is not masked: the test can fail.
    changed["region_mask"] = torch.ones_like(changed["region_mask"])
    with torch.no_grad():
        c = model(**changed)
    assert not torch.allclose(a.text_sequence[~pad_t], c.text_sequence[~pad_t], atol=1e-3)
    assert (a.region_logits[pad_r] < -5000).all()


@pytest.mark.parametrize("single_stream", [False, True])
def test_batch_width_padding_changes_no_output_at_real_positions(single_stream):
    """A batch padded only to its longest caption / largest region count (the collator) and
    the same batch padded to the paper's fixed 36 tokens and 37 regions give the same outputs."""
    config = ViLBERTConfig.from_preset("tiny", max_position_embeddings=64)
    model = (SingleStreamForPretraining if single_stream else ViLBERTForPretraining)(config).eval()
    inputs = make_inputs(config, batch=3, tokens=9, regions=6)
    labels = inputs["input_ids"].masked_fill(torch.rand(3, 9, generator=torch.Generator().manual_seed(1)) > 0.3,
                                             IGNORE_INDEX).masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
    masked_regions = torch.zeros(3, 6, dtype=torch.bool)
    masked_regions[:, 1] = True
    targets = torch.softmax(torch.randn(3, 6, config.v_target_size), -1)
    widened = dict(inputs, masked_lm_labels=labels, masked_regions=masked_regions, region_targets=targets)
    text_pad, region_pad = 36 - 9, 37 - 6
    for key, pad in [("input_ids", text_pad), ("token_type_ids", text_pad), ("attention_mask", text_pad)]:
        widened[key] = torch.nn.functional.pad(widened[key], (0, pad))
    widened["masked_lm_labels"] = torch.nn.functional.pad(labels, (0, text_pad), value=IGNORE_INDEX)
    for key in ("region_mask", "masked_regions"):
        widened[key] = torch.nn.functional.pad(widened[key], (0, region_pad))
    for key in ("region_features", "region_locations", "region_targets"):
        widened[key] = torch.nn.functional.pad(widened[key], (0, 0, 0, region_pad))
    with torch.no_grad():
        tight = model(**inputs, masked_lm_labels=labels, masked_regions=masked_regions, region_targets=targets,
                      alignment_labels=torch.tensor([0, 1, 0]))
        wide = model(**widened, alignment_labels=torch.tensor([0, 1, 0]))
    real_text, real_regions = inputs["attention_mask"].bool(), inputs["region_mask"].bool()
    assert torch.allclose(tight.text_sequence[real_text], wide.text_sequence[:, :9][real_text], atol=1e-5)
    assert torch.allclose(tight.region_sequence[real_regions], wide.region_sequence[:, :6][real_regions], atol=1e-5)
    for name in ("loss", "mlm_loss", "region_loss", "alignment_loss", "masked_lm_logits", "alignment_logits"):
        assert torch.allclose(tight[name], wide[name], atol=1e-5), name


def test_bf16_outputs_stay_within_bf16_tolerance_of_fp32():
    """bf16 weights and inputs (DeepSpeed's bf16 mode) against fp32, on the small preset:
    the pretraining losses and pooled vectors agree to a few bf16 roundings."""
    torch.manual_seed(0)
    config = ViLBERTConfig.from_preset("small", v_feature_size=64, v_target_size=20, vocab_size=1000)
    model = ViLBERTForPretraining(config).eval()
    inputs = make_inputs(config, batch=4, tokens=16, regions=10)
    labels = inputs["input_ids"].masked_fill(torch.arange(16) % 5 != 2, IGNORE_INDEX)
    extra = dict(masked_lm_labels=labels, masked_regions=torch.arange(10).expand(4, 10) % 4 == 1,
                 alignment_labels=torch.tensor([0, 1, 0, 1]))
    targets = torch.softmax(torch.randn(4, 10, config.v_target_size), -1)
    with torch.no_grad():
        full = model(**inputs, **extra, region_targets=targets)
        model.to(torch.bfloat16)
        half = model(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()},
                     **extra, region_targets=targets.to(torch.bfloat16))
    for name in ("mlm_loss", "region_loss", "alignment_loss"):
        assert abs(half[name].item() - full[name].item()) <= 0.02 * abs(full[name].item()) + 1e-3, name
    for name in ("text_pooled", "region_pooled", "text_sequence"):
        error = (half[name].float() - full[name]).norm() / full[name].norm()
        assert error < 0.03, (name, error)  # bf16 has 8 mantissa bits: 0.4% per rounding
    assert half.text_sequence.dtype == torch.bfloat16


def test_sdpa_matches_eager(tiny_config):
    inputs = make_inputs(tiny_config)
    sdpa = ViLBERTForPretraining(tiny_config).eval()
    eager = ViLBERTForPretraining(ViLBERTConfig.from_preset("tiny", attention_backend="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    with torch.no_grad():
        a, b = sdpa(**inputs), eager(**inputs)
    for name in ("text_sequence", "region_sequence", "text_logits", "region_logits", "alignment_logits"):
        assert (a[name] - b[name]).abs().max() <= 1e-5, name


def test_eager_attention_maps(tiny_config):
    config = ViLBERTConfig.from_preset("tiny", attention_backend="eager")
    inputs = make_inputs(config)
    out = ViLBERTModel(config).eval()(**inputs, output_attentions=True)
    maps = out.attentions
    assert len(maps.text) == config.num_hidden_layers and len(maps.region) == config.v_num_hidden_layers
    assert len(maps.co) == config.num_co_attention_layers
    text_over_regions, regions_over_text = maps.co[0]
    assert text_over_regions.shape == (3, config.bi_num_attention_heads, 9, 6)
    assert regions_over_text.shape == (3, config.bi_num_attention_heads, 6, 9)
    assert torch.allclose(text_over_regions.sum(-1), torch.ones(()), atol=1e-5)
    padded = inputs["region_mask"][:, None, None, :].expand_as(text_over_regions) == 0
    assert text_over_regions[padded].max() < 1e-6


def _run_order(config):
    model = ViLBERTModel(config).eval()
    order = []
    for kind, layers in (("t", model.encoder.text_layers), ("r", model.encoder.region_layers),
                         ("c", model.encoder.co_layers)):
        for i, layer in enumerate(layers):
            layer.register_forward_hook(lambda *_, name=f"{kind}{i}": order.append(name))
    with torch.no_grad():
        model(**make_inputs(config, batch=1, tokens=4, regions=3))
    return order


def _shrunk(preset):
    """The preset's wiring (layer counts, co-attention ids) at a width that builds quickly."""
    fields = {k: PRESETS[preset][k] for k in ("num_hidden_layers", "v_num_hidden_layers", "v_biattention_id",
                                               "t_biattention_id") if k in PRESETS[preset]}
    return ViLBERTConfig.from_preset("tiny", **{"num_hidden_layers": 12, **fields})


def test_wiring_of_the_base_model_follows_the_official_encoder():
    expected = ("t0 t1 t2 t3 t4 t5 c0 t6 r0 c1 t7 r1 c2 t8 r2 c3 t9 r3 c4 t10 r4 c5 r5 t11").split()
    assert _run_order(_shrunk("base")) == expected


def test_wiring_of_the_reference_config():
    # v_biattention_id [0, 1], t_biattention_id [2, 3]: co0 after text layers 0-1 and no visual layer.
    config = ViLBERTConfig.from_official_json("tests/data/reference_vilbert_a.config.json")
    assert _run_order(config) == "t0 t1 c0 t2 r0 c1 r1 t3".split()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_wiring_counts_for_every_preset(preset):
    config = _shrunk(preset)
    order = _run_order(config)
    assert sorted(order) == sorted([f"t{i}" for i in range(config.num_hidden_layers)] +
                                   [f"r{i}" for i in range(config.v_num_hidden_layers)] +
                                   [f"c{k}" for k in range(config.num_co_attention_layers)])
    for k, (t_end, v_end) in enumerate(zip(config.t_biattention_id, config.v_biattention_id)):
        before = order[:order.index(f"c{k}")]
        assert sum(s.startswith("t") for s in before) == t_end
        assert sum(s.startswith("r") for s in before) == v_end
    assert [f"{s.kind[0]}{s.index}" for s in schedule(config)] == order


def test_depth_presets_put_co_attention_on_the_last_text_layers():
    for depth in (2, 4, 8):
        config = ViLBERTConfig.from_preset(f"depth{depth}")
        assert config.num_co_attention_layers == depth == config.v_num_hidden_layers
        assert config.t_biattention_id == list(range(12 - depth, 12))


def test_base_parameter_count():
    config = ViLBERTConfig.from_preset("base")
    model = ViLBERTForPretraining(config)
    count = sum(p.numel() for p in model.parameters())  # the tied decoder counted once
    print(f"\nbase preset: {count:,} parameters")
    assert count == 239_023_229
    # The official model also creates biOutput.q_dense1 (bi -> v) and q_dense2 (bi -> text)
    # in every co-attention layer and never uses them.
    bi, v, t = config.bi_hidden_size, config.v_hidden_size, config.hidden_size
    q_dense = config.num_co_attention_layers * ((bi * v + v) + (bi * t + t))
    assert q_dense == 11_020_800
    assert count + q_dense == 250_044_029


def test_frozen_first_layers_get_no_gradient(tiny_config):
    config = ViLBERTConfig.from_preset("tiny", fixed_t_layer=1)
    model = ViLBERTForPretraining(config)
    model(**make_inputs(config), alignment_labels=torch.tensor([0, 1, 0])).loss.backward()
    assert model.vilbert.encoder.text_layers[0].attention.query.weight.grad is None
    assert model.vilbert.encoder.text_layers[1].attention.query.weight.grad.abs().sum() > 0


def test_official_switches_we_do_not_support_are_refused():
    with pytest.raises(ValueError, match="in_batch_pairs"):
        ViLBERTConfig.from_preset("tiny", in_batch_pairs=True)
    with pytest.raises(ValueError, match="same length"):
        ViLBERTConfig.from_preset("tiny", v_biattention_id=[0])


def test_save_and_load_pretrained(tmp_path, tiny_config):
    model = ViLBERTForPretraining(tiny_config).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    again = ViLBERTForPretraining.from_pretrained(tmp_path).eval()
    assert again.heads.mlm.decoder.weight is again.vilbert.text_embeddings.word_embeddings.weight
    inputs = make_inputs(tiny_config)
    with torch.no_grad():
        assert torch.equal(model(**inputs).text_logits, again(**inputs).text_logits)
    # A task model starts from the pretrained streams; only its heads are new.
    tasks = ViLBERTForTasks.from_pretrained(tmp_path)
    assert torch.equal(tasks.vilbert.region_embeddings.feature.weight, model.vilbert.region_embeddings.feature.weight)


def test_single_stream_baseline(tiny_config):
    model = SingleStreamForPretraining(tiny_config)
    inputs = make_inputs(tiny_config)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, 1] = 5
    masked = torch.zeros_like(inputs["region_mask"], dtype=torch.bool)
    masked[:, 1] = True
    out = model(**inputs, masked_lm_labels=labels, masked_regions=masked,
                region_targets=torch.softmax(torch.randn(3, 6, tiny_config.v_target_size), -1),
                alignment_labels=torch.tensor([0, 1, 0]))
    assert out.region_sequence.shape == (3, 6, tiny_config.hidden_size)
    out.loss.backward()
    assert model.vilbert.region_embeddings.feature.weight.grad.abs().sum() > 0
    assert not hasattr(model.vilbert, "co_layers")


def with_pretraining_labels(inputs: dict) -> dict:
    """`inputs` with masked-LM labels on every third real token and alignment labels."""
    ids = inputs["input_ids"]
    masked = (torch.arange(ids.numel()).view(ids.shape) % 3 == 0) & (inputs["attention_mask"] == 1)
    return {**inputs, "masked_lm_labels": ids.masked_fill(~masked, IGNORE_INDEX),
            "alignment_labels": torch.arange(ids.shape[0]) % 2}


@pytest.mark.parametrize("cls", [ViLBERTForPretraining, SingleStreamForPretraining])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_config, cls):
    """In training (dropout on: the recomputation must replay its masks), with every encoder
    layer recomputed in backward, the loss and every gradient are those of the plain model."""
    from vilbert.model_factory import ModelConfig, build_model
    from vilbert.modeling.registry import PRETRAINING, arch_of

    inputs = with_pretraining_labels(make_inputs(tiny_config))
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model, _ = build_model(ModelConfig(arch=arch_of(cls.__name__), preset="tiny",
                                           activation_checkpointing=checkpointed), PRETRAINING, {})
        model.train()
        torch.manual_seed(1)
        loss = model(**inputs).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (plain_loss, plain), (loss, grads) = results
    assert any(getattr(m, "activation_checkpointing", False) for m in model.modules())
    assert torch.equal(loss, plain_loss) and plain.keys() == grads.keys() and len(grads) > 20
    for name, grad in grads.items():
        assert torch.allclose(grad, plain[name], rtol=1e-5, atol=1e-7), name


def test_a_compiled_model_gives_the_eager_loss_and_gradients_on_batches_of_other_shapes(tiny_config):
    """model.compile: torch.compile in place (the state dict keeps its names), one graph for
    batches of any width; dropout off (compiled dropout draws its own random numbers)."""
    from vilbert.model_factory import ModelConfig, build_model
    from vilbert.modeling.registry import PRETRAINING

    no_dropout = {name: 0.0 for name in ("hidden_dropout_prob", "attention_probs_dropout_prob",
                                         "v_hidden_dropout_prob", "v_attention_probs_dropout_prob")}
    batches = [with_pretraining_labels(make_inputs(tiny_config, batch=3, tokens=tokens, regions=regions))
               for tokens, regions in ((9, 6), (16, 11))]
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model, _ = build_model(ModelConfig(preset="tiny", compile=compiled, overrides=no_dropout), PRETRAINING, {})
        for module in model.modules():  # the pretraining heads' fixed dropout too (compiled before the first call)
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        for inputs in batches:
            loss = model(**inputs).loss
            loss.backward()
            results.append((compiled, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                      if p.grad is not None}))
            model.zero_grad()
    assert "vilbert.encoder.text_layers.0.attention.query.weight" in model.state_dict()  # names unchanged
    eager, compiled = [r for r in results if not r[0]], [r for r in results if r[0]]
    for (_, eager_loss, eager_grads), (_, loss, grads) in zip(eager, compiled):
        assert torch.allclose(loss, eager_loss, rtol=1e-4) and len(eager_grads) > 20
        # Inductor sums in other orders: all the gradients together within 1e-4 of their norm.
        names = sorted(grads.keys() | eager_grads.keys())  # a parameter without a gradient in one: zeros in the other
        flat, eager_flat = (torch.cat([g.get(n, torch.zeros_like(eager_grads.get(n, grads.get(n)))).flatten()
                                       for n in names]) for g in (grads, eager_grads))
        assert (flat - eager_flat).norm() <= 1e-4 * eager_flat.norm()
