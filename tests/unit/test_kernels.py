"""`model.kernels`: which of apex's kernels a run uses, and that each equals torch's op.

The choice and the wiring are tested with stand-ins registered under apex's module names (torch's
ops: apex is not built here). The exactness tests need NVIDIA apex and a GPU; elsewhere they are
skipped with that reason.
"""

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from vilbert.config_schema import ConfigError, build_section
from vilbert.kernels import KERNELS, choose_kernels, load
from vilbert.model_factory import ModelConfig, build_model
from vilbert.modeling.layers import FeedForward
from vilbert.modeling.registry import PRETRAINING

TANH = {"hidden_act": "gelu_new", "v_hidden_act": "gelu_new"}


class StandInLayerNorm(torch.nn.LayerNorm):
    pass


class StandInAdam(torch.optim.AdamW):
    def __init__(self, params, adam_w_mode: bool, **kwargs):
        assert adam_w_mode
        super().__init__(params, **kwargs)


def stand_in_dense_gelu_dense(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


class StandInXentropy:
    @staticmethod
    def apply(logits, labels, smoothing, ignored, half_to_float):
        return F.cross_entropy(logits.float(), labels, reduction="none", ignore_index=ignored)


STAND_INS = {"fused_layer_norm": StandInLayerNorm, "fused_dense": stand_in_dense_gelu_dense,
             "xentropy": StandInXentropy, "fused_adam": StandInAdam}


@pytest.fixture
def fake_apex(monkeypatch):
    """install(*names): those kernels importable under apex's names; the rest not."""
    def install(*names):
        modules = {"apex": types.ModuleType("apex")}
        for name in names:
            parts = KERNELS[name].module.split(".")
            for end in range(2, len(parts) + 1):
                modules.setdefault(".".join(parts[:end]), types.ModuleType(".".join(parts[:end])))
            setattr(modules[KERNELS[name].module], KERNELS[name].attribute, STAND_INS[name])
        for module_name, module in modules.items():
            monkeypatch.setitem(sys.modules, module_name, module)
        load.cache_clear()

    yield install
    load.cache_clear()


def test_on_cpu_none_is_used_and_a_named_one_is_an_error(fake_apex):
    fake_apex(*KERNELS)
    choice = choose_kernels("apex", "cpu", {"gelu"}, masked_lm=True)
    assert choice.used == () and set(choice.not_used) == set(KERNELS)
    assert all("GPU" in why for why in choice.not_used.values())
    with pytest.raises(ValueError, match="asks for fused_layer_norm .* run on GPUs"):
        choose_kernels(["fused_layer_norm"], "cpu", {"gelu"}, masked_lm=True)


def test_apex_uses_what_is_importable_and_applies_and_says_why_not_the_rest(fake_apex):
    fake_apex("fused_layer_norm", "fused_adam")
    choice = choose_kernels("apex", "cuda", {"gelu"}, masked_lm=True)
    assert choice.used == ("fused_layer_norm", "fused_adam")
    assert "tanh approximation" in choice.not_used["fused_dense"] and "gelu" in choice.not_used["fused_dense"]
    assert "apex.contrib.xentropy.SoftmaxCrossEntropyLoss is not importable" in choice.not_used["xentropy"]
    line = choice.describe()
    assert "\n" not in line and line.startswith("apex kernels used: fused_layer_norm (apex.normalization), "
                                                "fused_adam (apex.optimizers). Not used: fused_dense:")
    assert choose_kernels("torch", "cuda", {"gelu"}, masked_lm=True).used == ()


def test_a_named_kernel_that_is_missing_is_one_line_saying_what_to_build(fake_apex):
    fake_apex("fused_layer_norm")
    with pytest.raises(ValueError) as error:
        choose_kernels(["fused_layer_norm", "xentropy"], "cuda", {"gelu"}, masked_lm=True)
    message = str(error.value)
    assert "\n" not in message and "asks for xentropy" in message
    assert "--build-option=--xentropy" in message and "github.com/NVIDIA/apex" in message
    with pytest.raises(ValueError, match="fused_dense .* tanh approximation"):
        choose_kernels(["fused_dense"], "cuda", {"gelu"}, masked_lm=True)
    with pytest.raises(ValueError, match="the run has no masked-LM loss"):
        choose_kernels(["xentropy"], "cuda", {"gelu"}, masked_lm=False)


def test_fused_dense_serves_tanh_gelu_models_only(fake_apex):
    fake_apex("fused_dense")
    assert choose_kernels("apex", "cuda", {"gelu_new"}, masked_lm=True).used == ("fused_dense",)
    assert choose_kernels("apex", "cuda", {"gelu_new", "gelu"}, masked_lm=True).used == ()
    with pytest.raises(ValueError, match="tanh approximation"):
        FeedForward(8, 16, "gelu", 0.0, 1e-12, fused_layer_norm=False, fused_dense=True)


@pytest.mark.parametrize("value", ["cuda", ["fused_layer_norm", "flash"], 3])
def test_the_config_refuses_what_is_no_kernel(value):
    with pytest.raises(ConfigError, match="model.kernels"):
        build_section(ModelConfig, {"kernels": value}, "model.")


def test_the_kernel_switches_are_not_overrides():
    with pytest.raises(ConfigError, match="model.kernels chooses"):
        build_model(ModelConfig(preset="tiny", overrides={"use_fused_dense": True}), PRETRAINING, {})


def test_the_model_is_built_with_the_chosen_kernels_and_keeps_torchs_state_dict(fake_apex):
    """On a GPU run the modules hold apex's kernels; the state dict is the torch model's, and
    where the tensors are not on a GPU the same weights give the same loss."""
    from helpers import make_inputs

    fake_apex("fused_layer_norm", "fused_dense", "xentropy")
    built = {}
    for device_type in ("cuda", "cpu"):
        torch.manual_seed(0)
        built[device_type], _ = build_model(ModelConfig(preset="tiny", overrides=TANH), PRETRAINING, {},
                                            device_type=device_type)
    gpu, cpu = built["cuda"], built["cpu"]
    assert gpu.kernels.used == ("fused_layer_norm", "fused_dense", "xentropy") and cpu.kernels.used == ()
    assert gpu.config.use_fused_dense and gpu.config.use_fused_xentropy and not cpu.config.use_fused_layer_norm
    assert any(isinstance(m, StandInLayerNorm) for m in gpu.modules())
    assert not any(isinstance(m, StandInLayerNorm) for m in cpu.modules())
    feed_forwards = [m for m in gpu.modules() if isinstance(m, FeedForward)]
    assert feed_forwards and all(m.fused_dense is stand_in_dense_gelu_dense for m in feed_forwards)
    assert list(gpu.state_dict()) == list(cpu.state_dict())
    inputs = make_inputs(gpu.config)
    labels = inputs["input_ids"].masked_fill(torch.arange(9) % 3 != 0, -100)
    losses = [m.eval()(**inputs, masked_lm_labels=labels).loss for m in (gpu, cpu)]
    torch.testing.assert_close(losses[0], losses[1])


# -- exactness against torch, where NVIDIA apex is built and a GPU is present ---------------------------------------

def needs(name: str):
    return pytest.mark.skipif(not torch.cuda.is_available() or load(name) is None,
                              reason=f"needs a GPU and NVIDIA apex's {KERNELS[name].module}.{KERNELS[name].attribute}"
                                     " (apex is built from source on GPU clusters; not here)")


@needs("fused_layer_norm")
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_apex_layer_norm_equals_torchs(dtype, tolerance):
    torch.manual_seed(0)
    plain = torch.nn.LayerNorm(768, eps=1e-12).cuda().to(dtype)
    fused = load("fused_layer_norm")(768, eps=1e-12).cuda().to(dtype)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(4, 37, 768, device="cuda", dtype=dtype, requires_grad=True)
    outputs = []
    for module in (plain, fused):
        y = module(x)
        y.square().sum().backward()
        outputs.append((y, x.grad, module.weight.grad))
        x.grad = None
    for mine, theirs in zip(*outputs):
        torch.testing.assert_close(theirs, mine, rtol=tolerance, atol=tolerance)


@needs("fused_dense")
def test_apex_dense_gelu_dense_equals_torchs_tanh_gelu_feed_forward():
    torch.manual_seed(0)
    x = torch.randn(64, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weights = [torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) * 0.02
               for shape in ((3072, 768), (3072,), (768, 3072), (768,))]
    weights = [w.detach().requires_grad_() for w in weights]
    results = []
    for fn in (stand_in_dense_gelu_dense, load("fused_dense")):
        y = fn(x, *weights)
        y.float().square().sum().backward()
        results.append([y, x.grad] + [w.grad for w in weights])
        x.grad = None
        for w in weights:
            w.grad = None
    for mine, theirs in zip(*results):
        torch.testing.assert_close(theirs, mine, rtol=2e-2, atol=2e-2)


@needs("xentropy")
def test_apex_xentropy_equals_torchs_cross_entropy():
    from vilbert.losses import masked_lm_loss

    torch.manual_seed(0)
    logits = torch.randn(41, 30522, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 30522, (41,), device="cuda")
    results = []
    for fused in (False, True):
        loss = masked_lm_loss(logits, labels, fused=fused)
        loss.backward()
        results.append((loss, logits.grad))
        logits.grad = None
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=2e-2, atol=1e-4)


@needs("fused_adam")
def test_apex_fused_adam_takes_torchs_adamw_step():
    torch.manual_seed(0)
    params = [torch.randn(1000, device="cuda", requires_grad=True) for _ in range(2)]
    copies = [p.detach().clone().requires_grad_() for p in params]
    settings = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    optimizers = [torch.optim.AdamW(params, **settings), load("fused_adam")(copies, adam_w_mode=True, **settings)]
    for _ in range(3):
        for group in (params, copies):
            for p in group:
                p.grad = torch.ones_like(p) * p.detach().sin()
        for optimizer in optimizers:
            optimizer.step()
    for mine, theirs in zip(params, copies):
        torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-6)
