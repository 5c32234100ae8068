"""Tokens per expert from each MoE router's own choices (lmscale.model.expert_routing), on real HF models."""

import torch
from transformers import AutoModelForCausalLM

from lmscale.config.model import ModelConfig
from lmscale.model.build import prepare_for_training, preset_config
from lmscale.model.expert_routing import routed_tokens, watch_routing

TOKENS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def top_2_counts(router_logits) -> torch.Tensor:
    """Tokens per expert if each went to the top 2 of its router's logits, per layer."""
    return torch.stack(
        [torch.bincount(x.topk(2).indices.flatten(), minlength=4) for x in router_logits]
    ).double()


def tiny(preset):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config(preset, 256, 32, 0, 0))
    watch_routing(model)
    return model


def test_group_limited_routing_is_counted_as_the_router_chose_not_as_its_logits_rank():
    """DeepSeek-V3's router keeps one of its 2 groups of 2 experts per token and takes top-2 there: each
    token goes to both experts of one group, which the top-2 of its logits would not give."""
    model = tiny("tiny-deepseek-v3")
    with torch.no_grad():
        logits = model(TOKENS, output_router_logits=True).router_logits
    counts = routed_tokens(model)
    assert counts.shape == (3, 4)  # the first layer is dense
    assert counts.sum(dim=1).tolist() == [2 * TOKENS.numel()] * 3
    assert torch.equal(counts[:, 0], counts[:, 1]) and torch.equal(counts[:, 2], counts[:, 3])
    assert not torch.equal(counts, top_2_counts(logits))
    assert routed_tokens(model) is None  # taken: the next forward counts afresh


def test_softmax_top_k_routing_counts_once_per_step_with_checkpointed_blocks():
    """Mixtral routes to the top-2 of its logits; the blocks' recompute in backward runs the routers again
    and is not counted."""
    model = tiny("tiny-mixtral")
    outputs = model(TOKENS, output_router_logits=True)
    expected = top_2_counts(outputs.router_logits)
    assert torch.equal(routed_tokens(model), expected)

    prepare_for_training(model, ModelConfig(activation_checkpointing=True))
    model(TOKENS).logits.sum().backward()  # the routers ran twice per layer
    model.zero_grad()
    model(TOKENS)
    assert torch.equal(routed_tokens(model), expected)


def test_a_dense_model_has_no_routing_to_count():
    model = tiny("tiny-llama")
    model(TOKENS)
    assert routed_tokens(model) is None
