"""FLOPs and MFU arithmetic, pinned against hand-worked counts."""

import pytest
from transformers import GPT2Config, LlamaConfig

from lmscale.reporting.throughput import (
    ModelShape,
    hardware_flops_per_token,
    matmul_parameters,
    model_flops_per_token,
    model_shape,
    peak_tflops,
    utilization,
    window_flops,
)

GPT2_124M = model_shape(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257))
LLAMA_1B = model_shape(
    LlamaConfig(
        num_hidden_layers=22,
        hidden_size=2048,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
        vocab_size=32000,
    )
)


def test_gpt2_124m_by_hand():
    # per layer: attention 4h^2 (qkv + proj) + MLP 2 x h x 4h = 12h^2 = 7,077,888; x 12 layers
    assert matmul_parameters(GPT2_124M) == 84_934_656
    # 6N = 509,607,936; attention 12 x 12 x 768 x 1024 = 113,246,208; logits 6 x 768 x 50257 = 231,584,256
    assert model_flops_per_token(GPT2_124M, 1024) == 854_438_400


def test_gpt2_124m_equals_palm_form():
    # PaLM: 6N + 12 L H Q T, with N = non-embedding matmul parameters + the output projection (h x V)
    n = 84_934_656 + 768 * 50257
    assert model_flops_per_token(GPT2_124M, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024


def test_llama_gqa_swiglu_by_hand():
    assert LLAMA_1B.kv_heads == 4 and LLAMA_1B.head_dim == 64 and LLAMA_1B.gated_mlp
    # per layer: q, o 2 x 2048 x 2048 = 8,388,608; k, v 2 x 2048 x (4 x 64) = 1,048,576 (GQA: not h^2);
    # SwiGLU 3 x 2048 x 5632 = 34,603,008; total 44,040,192 x 22 layers
    assert matmul_parameters(LLAMA_1B) == 968_884_224
    # 6N = 5,813,305,344; attention 12 x 22 x 2048 x 2048 = 1,107,296,256; logits 6 x 2048 x 32000 = 393,216,000
    assert model_flops_per_token(LLAMA_1B, 2048) == 7_313_817_600


def test_gqa_heads_do_not_vanish_in_integer_division():
    mqa = ModelShape(
        layers=1, hidden=4096, heads=32, kv_heads=1, head_dim=128, intermediate=1, vocab=1, gated_mlp=False
    )
    assert matmul_parameters(mqa) == 2 * 4096 * 4096 + 2 * 4096 * 128 + 2 * 4096


def test_checkpointing_adds_the_recomputed_forward():
    seq = 1024
    extra = hardware_flops_per_token(GPT2_124M, seq, True) - model_flops_per_token(GPT2_124M, seq)
    assert extra == 2 * 84_934_656 + 4 * 12 * 768 * seq
    assert hardware_flops_per_token(GPT2_124M, seq, False) == model_flops_per_token(GPT2_124M, seq)


def test_window_flops_follow_each_sequences_own_length():
    # two sequences of 512 and 1536 tokens: attention per token follows each one's length
    model, hardware = window_flops(
        GPT2_124M, tokens=2048, sum_sq_len=512**2 + 1536**2, activation_checkpointing=False
    )
    expected = 512 * model_flops_per_token(GPT2_124M, 512) + 1536 * model_flops_per_token(GPT2_124M, 1536)
    assert model == pytest.approx(expected) and hardware == model
    _, with_recompute = window_flops(GPT2_124M, 2048, 512**2 + 1536**2, True)
    expected_hw = 512 * hardware_flops_per_token(GPT2_124M, 512, True) + 1536 * hardware_flops_per_token(
        GPT2_124M, 1536, True
    )
    assert with_recompute == pytest.approx(expected_hw)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA L40S", 362.0),
        ("Tesla V100-SXM2-32GB", 125.0),
        ("cpu", None),
        (None, None),
    ],
)
def test_peak_table(name, peak):
    assert peak_tflops(name) == peak


def test_utilization_is_in_tflops_not_gflops():
    # 8 devices, 1e15 FLOPs each per second -> 1000 TFLOP/s per device; against a 989 peak
    tflops, mfu = utilization(flops=8e15 * 2, seconds=2.0, devices=8, peak=989.0)
    assert tflops == pytest.approx(1000.0)
    assert mfu == pytest.approx(1000.0 / 989.0)
    assert peak_tflops("cpu", override=2.5) == 2.5
    assert utilization(1e12, 1.0, 1, None) == (1.0, None)


def test_wandb_names_are_grouped_and_progress_lines_are_plain():
    from lmscale.reporting.sink import ProgressLines, format_duration, wandb_name, wandb_summary

    assert [wandb_name(k) for k in ("loss", "eval_loss", "tokens_per_s", "mfu", "memory_rss_gb", "lr")] == [
        "train/loss",
        "eval/loss",
        "perf/tokens_per_s",
        "perf/mfu",
        "memory/rss_gb",
        "train/lr",
    ]
    assert wandb_summary({"eval_loss": 2.0, "best_eval_loss": 1.5, "steps": 3}) == {
        "eval/loss": 2.0,
        "eval/best_loss": 1.5,
        "steps": 3,
    }
    line = ProgressLines(total_steps=100, initial_step=0).line(
        10, {"loss": 3.21, "lr": 1e-3, "tokens_per_s": 1234.5}
    )
    assert (
        line.startswith("step 10/100: loss 3.2100, lr 1.000e-03, 1,234 tokens/s, ETA ") and "\r" not in line
    )
    dpo = {"loss": 0.6, "lr": 1e-5, "tokens_per_s": 10.0, "pref_accuracy": 0.75, "rewards_margin": 0.123}
    dpo_line = ProgressLines(total_steps=100, initial_step=0).line(10, dpo)
    assert "10 tokens/s, pref_acc 0.750, margin +0.123, ETA" in dpo_line
    assert (
        format_duration(3725) == "1h02m" and format_duration(65) == "1m05s" and format_duration(None) == "?"
    )


def test_mixture_of_experts_flops_count_the_active_experts_only():
    from transformers import MixtralConfig, Qwen3MoeConfig

    mixtral = model_shape(MixtralConfig(intermediate_size=344, num_local_experts=8, num_experts_per_tok=2))
    assert mixtral.intermediate == 2 * 344
    qwen = model_shape(Qwen3MoeConfig(moe_intermediate_size=172, intermediate_size=688, num_experts=8,
                                      num_experts_per_tok=2, num_attention_heads=4, hidden_size=256))  # fmt: skip
    assert qwen.intermediate == 2 * 172
