"""optim.name=muon (which parameters Muon takes, by module type and block; what it refuses) and optim.state_dtype=bf16."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmscale.config import OptimConfig, load_config
from lmscale.errors import ConfigError
from lmscale.model.build import preset_config
from lmscale.parallel.ds_config import resolve
from lmscale.training.optim import build_optimizer, muon_parameters, parameter_groups


def model_of(preset: str, **config_changes) -> torch.nn.Module:
    config = preset_config(preset, vocab_size=128, max_seq_len=32, eos_id=0, pad_id=0)
    for key, value in config_changes.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_config(config)


def muon_names(model: torch.nn.Module) -> set[str]:
    chosen = muon_parameters(model)
    return {name for name, param in model.named_parameters() if id(param) in chosen}


def test_muon_takes_the_blocks_matrices_and_nothing_else():
    # GPT-2: its Conv1D matrices, not wte/wpe (which DeepSpeed's own "embed" name test would give Muon)
    gpt2 = model_of("tiny-gpt2")
    names = muon_names(gpt2)
    assert names and all(n.startswith("transformer.h.") and n.endswith(".weight") for n in names)
    assert {n.rsplit(".", 2)[-2] for n in names} == {"c_attn", "c_proj", "c_fc"}
    assert not {"transformer.wte.weight", "transformer.wpe.weight"} & names
    # Llama with an untied output layer: q/k/v/o and the MLP; not the embeddings, norms or lm_head
    llama = model_of("tiny-llama", tie_word_embeddings=False)
    llama_names = muon_names(llama)
    leaves = {n.rsplit(".", 2)[-2] for n in llama_names}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "lm_head.weight" in dict(llama.named_parameters()) and "lm_head.weight" not in llama_names


def test_muon_groups_are_tagged_and_take_their_own_learning_rate():
    model = model_of("tiny-gpt2")
    groups = parameter_groups(model, OptimConfig(name="muon", lr=1e-3, muon_lr=0.05))
    chosen = muon_parameters(model)
    for group in groups:
        assert all(p.use_muon is group["use_muon"] for p in group["params"])
        assert group["lr"] == (0.05 if group["use_muon"] else 1e-3)
        assert all((id(p) in chosen) is group["use_muon"] for p in group["params"])
    optimizer = build_optimizer(model, OptimConfig(name="muon"), cpu_offload=False)
    assert type(optimizer).__name__ == "MuonWithAuxAdam"


def test_muon_learns_a_small_regression():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    inputs = torch.randn(64, 8)
    targets = inputs.sum(dim=1, keepdim=True)
    # no blocks here, so every parameter is AdamW's: the auxiliary half alone must train
    optimizer = build_optimizer(model, OptimConfig(name="muon", lr=1e-2, weight_decay=0.0), cpu_offload=False)
    first = torch.nn.functional.mse_loss(model(inputs), targets).item()
    for _ in range(100):
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def resolved(*overrides: str):
    config, explicit = load_config(None, ["optim.name=muon", *overrides])
    return resolve(config, explicit, 2, False)


def test_muon_under_zero_trains_without_clipping_and_zero3_without_reduce_scatter():
    config, ds = resolved("zero.stage=2")
    assert config.train.grad_clip == 0 and ds["gradient_clipping"] == 0
    config, ds = resolved("zero.stage=0")  # no ZeRO: the gradients are clipped before Muon sees them
    assert config.train.grad_clip == 1.0 and ds["gradient_clipping"] == 1.0
    _, ds = resolved("zero.stage=3")
    assert ds["zero_optimization"]["reduce_scatter"] is False
    with pytest.raises(ConfigError, match=r"counts Muon's orthogonalized updates.*set train.grad_clip=0"):
        resolved("zero.stage=2", "train.grad_clip=1.0")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["zero.stage=2", "zero.offload=cpu"], "optim.name=muon does not go with zero.offload=cpu"),
        (["zero.stage=1", "parallel.tensor=2"], "which parallel.tensor=2 splits across ranks"),
    ],
)
def test_what_muon_does_not_combine_with_is_refused(overrides, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        resolved(*overrides)


def test_bf16_states_are_deepspeeds_two_switches_and_refused_where_they_do_not_apply():
    config, explicit = load_config(None, ["optim.state_dtype=bf16", "zero.stage=2"])
    _, ds = resolve(config, explicit, 2, False)
    assert ds["bf16"]["bf16_master_weights_and_grads"] and ds["bf16"]["bf16_optimizer_states"]
    for overrides, message in (
        (["precision=fp32", "zero.stage=2"], "needs precision=bf16"),
        (["zero.stage=0"], "set zero.stage=1, 2 or 3"),
        (["zero.stage=2", "optim.name=lion"], "tested with adamw and muon, not lion"),
    ):
        with pytest.raises((ConfigError, ValueError), match=message):
            load_config(None, ["optim.state_dtype=bf16", *overrides])
