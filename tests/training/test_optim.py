import pytest
import torch
from helpers import tiny_gpt2_config

from lmscale.config import OptimConfig
from lmscale.training.optim import build_optimizer, parameter_groups


def toy_model():
    return torch.nn.ModuleDict(
        {"wte": torch.nn.Embedding(10, 4), "proj": torch.nn.Linear(4, 4), "ln": torch.nn.LayerNorm(4)}
    )


def test_no_decay_on_biases_norms_and_embeddings():
    decay, no_decay = sorted(
        parameter_groups(toy_model(), OptimConfig(weight_decay=0.1)), key=lambda g: -g["weight_decay"]
    )
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4  # embedding, linear bias, norm weight and bias


def test_exemptions_are_configurable():
    groups = parameter_groups(toy_model(), OptimConfig(weight_decay=0.1, no_weight_decay=["bias"]))
    decayed = [p.shape for g in groups if g["weight_decay"] for p in g["params"]]
    # embedding, linear weight, and the norm's weight and bias: only the linear's bias is exempt
    assert sorted(decayed) == sorted([torch.Size(s) for s in ([10, 4], [4, 4], [4], [4])])


def test_layer_lr_decay_gives_lower_layers_geometrically_smaller_lrs():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_gpt2_config(64))  # 2 blocks
    groups = parameter_groups(model, OptimConfig(lr=1.0, layer_lr_decay=0.5))
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["transformer.ln_f.weight"])] == 1.0  # the top
    assert lr_of[id(named["transformer.h.1.attn.c_attn.weight"])] == 0.5
    assert lr_of[id(named["transformer.h.0.mlp.c_fc.weight"])] == 0.25
    assert lr_of[id(named["transformer.wte.weight"])] == 0.125  # embeddings (tied to the head) at the bottom
    assert sum(len(g["params"]) for g in groups) == len(named)  # every parameter once


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "lamb", "sgd"])
def test_every_optimizer_reduces_a_simple_loss(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    inputs = torch.randn(64, 8)
    targets = inputs.sum(dim=1, keepdim=True)
    optimizer = build_optimizer(model, OptimConfig(name=name, lr=1e-2, weight_decay=0.0), cpu_offload=False)
    first = None
    for _ in range(100):
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first, (name, first, loss.item())


def test_adamw_on_cpu_is_fused_and_steps_like_the_reference():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    reference = torch.nn.Linear(8, 8)
    reference.load_state_dict(model.state_dict())
    train = OptimConfig(lr=1e-2, weight_decay=0.1)
    optimizer = build_optimizer(model, train, cpu_offload=False)
    assert optimizer.defaults["fused"] is True
    expected = torch.optim.AdamW(parameter_groups(reference, train), lr=1e-2, betas=train.betas)
    inputs = torch.randn(16, 8)
    for _ in range(5):
        for net, opt in ((model, optimizer), (reference, expected)):
            opt.zero_grad()
            net(inputs).pow(2).mean().backward()
            opt.step()
    for fused, plain in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
