"""Training FLOPs, TFLOPs per device, MFU and HFU: pure functions of the model's shape.

Written by hand: frameworks have shipped wrong counts here (GFLOPs logged as TFLOPs, GQA terms lost
to integer division, logits left out), so every term is spelled out and pinned by tests.

Per real token, a training step (forward + backward = 3 x forward) costs
    6 x (non-embedding matmul parameters)       the layers' weight matmuls
  + 12 x layers x hidden x T                    attention scores and values over the token's sequence of length T
  + 6 x hidden x vocab                          the logits (the output projection, tied or not)
which is PaLM's 6N + 12*L*H*Q*T when N counts the output projection. Activation checkpointing re-runs
the layers' forward: hardware FLOPs add 2 x matmul parameters + 4 x layers x hidden x T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Dense (non-sparse) BF16/FP16 tensor-core peaks in TFLOP/s, by the name torch reports. Longer names
# first, so "A100" is not taken for "A10" nor "H100 PCIe" for "H100".
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10", 125.0),
    ("V100", 125.0),  # fp16 only: V100 has no bf16 tensor cores
]


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool  # SwiGLU/GLU: three matrices (gate, up, down) instead of two


def model_shape(config: Any) -> ModelShape:
    """The shape of an HF GPT-2 or Llama-family config (other families map their names the same way)."""
    if config.model_type == "gpt2":
        hidden = config.n_embd
        return ModelShape(
            layers=config.n_layer,
            hidden=hidden,
            heads=config.n_head,
            kv_heads=config.n_head,
            head_dim=hidden // config.n_head,
            intermediate=config.n_inner or 4 * hidden,
            vocab=config.vocab_size,
            gated_mlp=False,
        )
    heads = config.num_attention_heads
    # Mixture of experts: a token runs through its num_experts_per_tok experts only (Mixtral's experts are
    # intermediate_size wide, Qwen-MoE's moe_intermediate_size), so that is the MLP width its FLOPs see.
    expert_width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return ModelShape(
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate=expert_width * (getattr(config, "num_experts_per_tok", None) or 1),
        vocab=config.vocab_size,
        gated_mlp=getattr(config, "hidden_act", "silu") in ("silu", "swiglu", "gelu_pytorch_tanh", "geglu"),
    )


def matmul_parameters(shape: ModelShape) -> int:
    """Weights of the layers' matmuls: Q and O full width, K and V per key/value head (GQA/MQA), the MLP."""
    q_and_o = 2 * shape.hidden * shape.heads * shape.head_dim
    k_and_v = 2 * shape.hidden * shape.kv_heads * shape.head_dim
    mlp = (3 if shape.gated_mlp else 2) * shape.hidden * shape.intermediate
    return shape.layers * (q_and_o + k_and_v + mlp)


def attention_flops_per_token(shape: ModelShape, seq_len: float) -> float:
    """Scores (QK^T) and values (AV), forward and backward, for one token in a sequence of seq_len."""
    return 12 * shape.layers * shape.heads * shape.head_dim * seq_len


def model_flops_per_token(shape: ModelShape, seq_len: float) -> float:
    """Training FLOPs per token (for MFU)."""
    logits = 6 * shape.hidden * shape.vocab
    return 6 * matmul_parameters(shape) + attention_flops_per_token(shape, seq_len) + logits


def hardware_flops_per_token(shape: ModelShape, seq_len: float, activation_checkpointing: bool) -> float:
    """FLOPs the device actually runs per token (for HFU): plus the layers' re-run forward when checkpointing."""
    recompute = 2 * matmul_parameters(shape) + attention_flops_per_token(shape, seq_len) / 3
    return model_flops_per_token(shape, seq_len) + (recompute if activation_checkpointing else 0.0)


def window_flops(
    shape: ModelShape, tokens: int, sum_sq_len: int, activation_checkpointing: bool
) -> tuple[float, float]:
    """(model, hardware) FLOPs of `tokens` real tokens whose sequences' squared lengths sum to `sum_sq_len`.

    A sequence of length T costs attention FLOPs proportional to T for each of its T tokens, so with
    variable lengths the attention term follows the sum of squared lengths, not a fixed max_seq_len.
    """
    per_token_length_free = model_flops_per_token(shape, 0.0)
    attention = attention_flops_per_token(shape, 1.0) * sum_sq_len
    model = per_token_length_free * tokens + attention
    recompute = (2 * matmul_parameters(shape) * tokens + attention / 3) if activation_checkpointing else 0.0
    return model, model + recompute


def peak_tflops(device_name: str | None, override: float | None = None) -> float | None:
    """Dense BF16/FP16 peak of a device by name; `override` wins; None when unknown (e.g. a CPU)."""
    if override:
        return override
    if not device_name:
        return None
    for name, peak in PEAK_TFLOPS:
        if name.lower() in device_name.lower():
            return peak
    return None


def utilization(flops: float, seconds: float, devices: int, peak: float | None) -> tuple[float, float | None]:
    """(TFLOP/s per device, fraction of peak) for `flops` run over `seconds` on `devices` devices."""
    tflops_per_device = flops / max(seconds, 1e-9) / devices / 1e12
    return tflops_per_device, (tflops_per_device / peak if peak else None)


@dataclass(frozen=True)
class ThroughputModel:
    """What turns a logging window's token counts into TFLOP/s, MFU and HFU."""

    shape: ModelShape
    activation_checkpointing: bool
    peak_tflops: float | None  # per device; None = unknown (no MFU/HFU logged)

    def figures(self, tokens: int, sum_sq_len: int, seconds: float, devices: int) -> dict[str, float]:
        model, hardware = window_flops(self.shape, tokens, sum_sq_len, self.activation_checkpointing)
        tflops, mfu = utilization(model, seconds, devices, self.peak_tflops)
        figures = {"tflops_per_device": tflops}
        if mfu is not None:
            figures["mfu"] = mfu
            figures["hfu"] = utilization(hardware, seconds, devices, self.peak_tflops)[1]
        return figures
