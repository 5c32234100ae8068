"""DeepSeek-V3's auxiliary-loss-free balancing (lmscale.model.router_balance) on a real HF DeepSeek-V3 model."""

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from lmscale.config import load_config
from lmscale.errors import ConfigError
from lmscale.model.build import preset_config
from lmscale.model.expert_routing import routed_tokens, watch_routing
from lmscale.model.router_balance import (
    RouterBiasBalancer,
    check_routing_bias,
    keep_routing_bias_in_fp32,
    routing_biases,
)

TOKENS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def one_rank_group():
    """A one-rank gloo group (an in-memory store, no port) for the balancer's all-reduce; torn down after."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def tiny(preset: str = "tiny-deepseek-v3"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(preset_config(preset, 256, 32, 0, 0))


def test_each_layers_bias_moves_by_the_speed_toward_its_mean_load(one_rank_group):
    """DeepSeek-V3's rule (report, section 2.1.2): b_i += gamma * sign(mean load - load_i), per MoE layer."""
    model = tiny()
    balancer = RouterBiasBalancer(model, speed=0.001)
    counts = torch.tensor([[10, 10, 2, 2], [3, 5, 4, 4], [0, 0, 0, 0]], dtype=torch.float64)
    balancer.after_step(counts)
    balancer.after_step(counts)
    expected = 0.002 * torch.tensor([[-1, -1, 1, 1], [1, -1, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(torch.stack(routing_biases(model)), expected)
    assert all(bias.dtype == torch.float32 for bias in routing_biases(model))
    assert balancer.figures() == {"router_bias_absmax": pytest.approx(0.002)}
    assert torch.equal(
        counts[0], torch.tensor([10, 10, 2, 2], dtype=torch.float64)
    )  # the caller's, untouched
    balancer.after_step(None)  # a step in which no router ran moves nothing
    assert torch.equal(torch.stack(routing_biases(model)), expected)


def test_the_routers_choose_with_the_bias_the_balancer_moved(one_rank_group):
    """Every token went to the first group: a large step makes the second group every token's choice."""
    model = tiny()
    watch_routing(model)
    RouterBiasBalancer(model, speed=0.5).after_step(torch.tensor([[9.0, 9.0, 1.0, 1.0]] * 3))
    with torch.no_grad():
        model(TOKENS)
    tokens = TOKENS.numel()
    assert routed_tokens(model).tolist() == [[0, 0, tokens, tokens]] * 3


def test_the_bias_stays_float32_and_registered():
    model = tiny().to(torch.bfloat16)  # what DeepSpeed before 0.19 did to every buffer
    routing_biases(model)[0].fill_(0.125)
    keep_routing_bias_in_fp32(model)
    assert [bias.dtype for bias in routing_biases(model)] == [torch.float32] * 3
    state = model.state_dict()
    assert state["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert torch.equal(state["model.layers.1.mlp.gate.e_score_correction_bias"], torch.full((4,), 0.125))


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-llama"])
def test_a_model_without_a_routing_bias_is_refused(preset):
    with pytest.raises(ConfigError, match="this model's routers have none: unset model.router_bias_update"):
        check_routing_bias(tiny(preset), 0.001)
    check_routing_bias(tiny(preset), 0.0)
    check_routing_bias(tiny(), 0.001)


def test_only_cross_entropy_training_moves_the_bias():
    with pytest.raises(ConfigError, match="not of finetune.method=dpo: unset model.router_bias_update"):
        load_config(None, ["model.router_bias_update=0.001", "finetune.method=dpo", "data.format=preference"])
    load_config(None, ["model.router_bias_update=0.001"])
