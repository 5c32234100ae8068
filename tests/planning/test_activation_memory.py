"""The planner's activation figures against the live tensors of a real step (lmscale.planning.live_bytes).

Each case builds a tiny model of a family on CPU, takes one step (gradients already allocated, as DeepSpeed's
are), and measures the peak bytes of the tensors the step creates; the planner's figure for the same model,
row and options must be within 10%. Activation offload is measured as a GPU runs it (its host copies apart:
`offload_as_on_a_gpu`). Not measured here: dropout (a CPU keeps dropout masks in the input's dtype, a GPU's
fused kernel in one byte: the planner counts the GPU's).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmscale.config import ModelConfig
from lmscale.model.build import prepare_for_training, preset_config
from lmscale.objectives.fused_head import install_fused_head
from lmscale.planning.activations import ActivationSetup, step_activation_bytes
from lmscale.planning.live_bytes import LiveBytes, offload_as_on_a_gpu, step_peak
from lmscale.planning.plan import facts_of

VOCAB = 2048
TOKENS = 512
LLAMA_WIDER = {
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
}
UNTIED_32K = {"vocab_size": 32000, "tie_word_embeddings": False}


def tiny_model(preset: str, shape: dict, options: ModelConfig, precision: str, attention: str):
    config = preset_config(preset, VOCAB, TOKENS, 0, 0)
    for key, value in {**shape, "num_hidden_layers": 4}.items():
        setattr(config, "n_layer" if key == "num_hidden_layers" and preset == "tiny-gpt2" else key, value)
    for dropout in ("attn_pdrop", "resid_pdrop", "embd_pdrop"):
        if hasattr(config, dropout):
            setattr(config, dropout, 0.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    prepare_for_training(model, options)
    return model.train()


def measured_peak(model: torch.nn.Module, loss: str) -> int:
    """The step's peak bytes of new tensors, after a first step has allocated the gradients."""
    ids = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(1)).tolist()
    return step_peak(model, ids, fused_loss=loss == "fused")


CASES = [  # preset, shape changes, model options, precision, attention, loss
    ("tiny-llama", {}, {}, "fp32", "sdpa", "fused"),
    ("tiny-llama", {}, {}, "bf16", "sdpa", "fused"),
    ("tiny-llama", LLAMA_WIDER, {}, "bf16", "sdpa", "plain"),
    ("tiny-llama", {}, {}, "fp32", "eager", "fused"),
    ("tiny-llama", {}, {}, "bf16", "eager", "plain"),
    ("tiny-llama", {}, {"activation_checkpointing": True}, "fp32", "sdpa", "fused"),
    ("tiny-llama", LLAMA_WIDER, {"activation_checkpointing": True}, "bf16", "sdpa", "fused"),
    ("tiny-llama", {}, {"tiled_mlp": True}, "fp32", "sdpa", "fused"),
    # offloaded checkpoints: no block input on the device but the recomputed block's, copied back
    (
        "tiny-llama",
        {},
        {"activation_checkpointing": True, "activation_offload": True},
        "fp32",
        "sdpa",
        "fused",
    ),
    (
        "tiny-llama",
        LLAMA_WIDER,
        {"activation_checkpointing": True, "activation_offload": True},
        "bf16",
        "sdpa",
        "fused",
    ),
    ("tiny-llama", LLAMA_WIDER, {"tiled_mlp": True, "tiled_mlp_tokens": 128}, "bf16", "sdpa", "fused"),
    ("tiny-gpt2", {}, {}, "fp32", "sdpa", "fused"),
    ("tiny-gpt2", {}, {"fused_kernels": False}, "bf16", "sdpa", "plain"),
    ("tiny-gpt2", {}, {"activation_checkpointing": True}, "bf16", "sdpa", "fused"),
    ("tiny-qwen3-moe", {}, {}, "fp32", "sdpa", "fused"),
    ("tiny-qwen3-moe", {}, {}, "bf16", "sdpa", "fused"),
    (
        "tiny-qwen3-moe",
        {},
        {"activation_checkpointing": True, "activation_offload": True},
        "bf16",
        "sdpa",
        "fused",
    ),
    ("tiny-mixtral", {}, {}, "bf16", "sdpa", "plain"),
    ("tiny-deepseek-v3", {}, {}, "fp32", "sdpa", "fused"),
    ("tiny-deepseek-v3", {}, {}, "bf16", "eager", "plain"),
    ("tiny-deepseek-v3", {}, {"activation_checkpointing": True}, "bf16", "sdpa", "fused"),
    # a tied output layer and a real vocabulary: with checkpointing the peak is the embedding's gradients at
    # the end of backward (three vocabulary x hidden matrices), not the kept activations
    ("tiny-llama", {"vocab_size": 32000}, {"activation_checkpointing": True}, "bf16", "sdpa", "fused"),
    ("tiny-gpt2", {"vocab_size": 32000}, {"activation_checkpointing": True}, "fp32", "sdpa", "fused"),
    # untied: the peak is the loss's backward (the fused loss's output-layer gradient, gone before any block's
    # backward; the plain loss's fp32 log-probabilities and two gradients), not the sum of both phases
    ("tiny-llama", UNTIED_32K, {"activation_checkpointing": True}, "bf16", "sdpa", "fused"),
    ("tiny-llama", UNTIED_32K, {"activation_checkpointing": True}, "bf16", "sdpa", "plain"),
]


@pytest.mark.parametrize(("preset", "shape", "options", "precision", "attention", "loss"), CASES)
def test_planner_within_ten_percent_of_a_real_step(preset, shape, options, precision, attention, loss):
    options = ModelConfig(**options, attn_implementation=attention)
    model = tiny_model(preset, shape, options, precision, attention)
    facts = facts_of(model)
    if loss == "fused":
        install_fused_head(model)
    setup = ActivationSetup(
        seq_len=TOKENS, precision=precision, attention=attention, checkpointing=options.activation_checkpointing,
        chunked_loss=loss == "fused", tiled_mlp=options.tiled_mlp, tiled_tokens=options.tiled_mlp_tokens,
        offload=options.activation_offload, fused_kernels=options.fused_kernels,
    )  # fmt: skip
    planned = step_activation_bytes(facts, setup, TOKENS)
    measured = measured_peak(model, loss)
    assert planned == pytest.approx(measured, rel=0.1), (
        f"planned {planned / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"
    )


def test_live_bytes_counts_what_a_step_keeps_and_its_peak():
    weight = torch.randn(1000, 250, requires_grad=True)  # 1 MB: from before the step, not counted
    with LiveBytes() as live:
        doubled = weight * 2  # 1 MB, released once relu has its output
        kept = doubled.relu()  # 1 MB, which relu's backward keeps
        assert live.live == live.peak == 2_000_000
        del doubled
        total = kept.sum()
        del kept
        assert live.live == 1_000_000 + 4  # relu's output and the sum
        total.backward()
    # the backward's peak: relu's output and its gradient, the sum and its seed gradient
    assert live.peak == 2_000_000 + 8
    assert live.live == 1_000_000 + 4  # the weight's new gradient and the sum are all that remain


def test_offload_as_on_a_gpu_leaves_the_host_copies_out_and_counts_the_copies_back():
    weight = torch.randn(1000, 250, requires_grad=True)
    save_on_cpu = torch.autograd.graph.save_on_cpu
    with LiveBytes() as live, offload_as_on_a_gpu(live):
        with torch.autograd.graph.save_on_cpu():
            kept = (weight * 2).relu()  # relu saves its 1 MB output: a host copy, not the device's
        assert live.live == 1_000_000  # the output itself, still referenced here
        total = kept.sum()
        del kept
        assert live.live == 4
        total.backward()
    # backward: relu's output copied back (1 MB) and its gradient (1 MB), the seed and the weight's gradient
    assert live.peak == 2 * 1_000_000 + 8
    assert torch.autograd.graph.save_on_cpu is save_on_cpu  # torch's own again


def test_offload_saves_on_the_device_at_least_what_the_planner_counts_on():
    peaks, planned = {}, {}
    for offload in (False, True):
        options = ModelConfig(activation_checkpointing=True, activation_offload=offload)
        model = tiny_model("tiny-llama", LLAMA_WIDER, options, "bf16", "sdpa")
        setup = ActivationSetup(seq_len=TOKENS, precision="bf16", checkpointing=True, offload=offload)
        planned[offload] = step_activation_bytes(facts_of(model), setup, TOKENS)
        peaks[offload] = measured_peak(model, "plain")
    planned_saving = planned[False] - planned[True]  # the blocks' inputs, all but one at a block's backward
    assert 0 < planned_saving <= peaks[False] - peaks[True]
