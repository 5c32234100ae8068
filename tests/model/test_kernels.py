import pytest
import torch
from helpers import tiny_gpt2_config
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.activations import ACT2CLS

from lmscale.config import ModelConfig
from lmscale.model.build import build_model
from lmscale.model.kernels import FUSED_TANH_GELU, describe_fused, fuse_activations


def tiny_gpt2(activation: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_gpt2_config(64)
    config.activation_function = activation
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def logits_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_fast", "gelu_accurate"])
def test_fused_module_is_the_same_function_over_a_wide_range(activation):
    # Pre-activations of a freshly initialised model are tiny, where even erf GELU looks alike: test
    # the function itself over the range trained models reach, values and gradients.
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64, requires_grad=True)
    fused_x = x.detach().clone().requires_grad_()
    reference, fused = ACT2CLS[activation]()(x), FUSED_TANH_GELU()(fused_x)
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-7)
    reference.sum().backward()
    fused.sum().backward()
    torch.testing.assert_close(fused_x.grad, x.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_fast", "gelu_accurate"])
def test_fused_gelu_model_matches_hf_logits_and_gradients(activation):
    reference, fused = tiny_gpt2(activation), tiny_gpt2(activation)
    assert fuse_activations(fused) == 2  # one MLP activation per layer
    assert all(not isinstance(m, ACT2CLS[activation]) for m in fused.modules())
    ids = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grads = logits_and_grads(reference, ids)
    fused_logits, fused_grads = logits_and_grads(fused, ids)
    torch.testing.assert_close(fused_logits, ref_logits, rtol=1e-5, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_swapping_leaves_parameters_and_config_alone():
    reference, fused = tiny_gpt2("gelu_new"), tiny_gpt2("gelu_new")
    fuse_activations(fused)
    assert reference.state_dict().keys() == fused.state_dict().keys()
    assert all(torch.equal(reference.state_dict()[k], v) for k, v in fused.state_dict().items())
    assert fused.config.activation_function == "gelu_new"  # exports keep the model's own config


def test_models_without_composed_gelu_are_untouched():
    model = tiny_gpt2("gelu")  # exact erf GELU: already one kernel, and not the tanh function
    assert fuse_activations(model) == 0
    assert describe_fused(model) == "no fused activations"


@pytest.fixture
def tokenizer():
    vocab = {f"t{i}": i for i in range(100)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), eos_token="t1", pad_token="t2"
    )


@pytest.mark.parametrize("fused", [True, False])
def test_model_fused_kernels_switch(tokenizer, fused):
    model = build_model(ModelConfig(preset="tiny-gpt2", fused_kernels=fused), tokenizer, 32, seed=0)
    layers = model.config.n_layer
    assert sum(isinstance(m, FUSED_TANH_GELU) for m in model.modules()) == (layers if fused else 0)
    assert sum(isinstance(m, ACT2CLS["gelu_new"]) for m in model.modules()) == (0 if fused else layers)
