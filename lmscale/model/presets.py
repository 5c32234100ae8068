"""Named model shapes (`model.preset`): plain dicts, so that checking or planning a config needs no
`transformers` import (lmscale.model.build turns them into HF configs)."""

from __future__ import annotations


def _gpt2(layers: int, hidden: int, heads: int) -> dict:
    return {"family": "gpt2", "n_layer": layers, "n_embd": hidden, "n_head": heads}


def _llama(
    layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int, family: str = "llama", **extra
) -> dict:
    return {
        "family": family,
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        **extra,
    }


def _moe(family: str, **shape) -> dict:
    """A mixture-of-experts shape: 4 layers of 4 heads (2 key-value), 4 experts of which each token uses 2,
    and the router's load-balancing loss in the outputs (lmscale.objectives.loss adds it, as HF does)."""
    common = {
        "num_hidden_layers": 4,
        "hidden_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts_per_tok": 2,
        "output_router_logits": True,
    }
    return {"family": family, **common, **shape}


# Shapes: the tiny ones train in minutes on a CPU; the others are the usual GPU reference shapes
# (GPT-2 small/medium, and TinyLlama's 1.1B with grouped-query attention).
PRESETS: dict[str, dict] = {
    "tiny-gpt2": _gpt2(layers=4, hidden=256, heads=4),
    "tiny-llama": _llama(layers=4, hidden=256, heads=4, kv_heads=2, intermediate=688),
    "tiny-mistral": _llama(layers=4, hidden=256, heads=4, kv_heads=2, intermediate=688, family="mistral"),
    "tiny-mixtral": _moe("mixtral", num_local_experts=4, intermediate_size=344),
    # Expert widths are multiples of 8: torch's grouped matmul needs 16-byte strides in 16-bit precision.
    "tiny-qwen3-moe": _moe(
        "qwen3_moe", num_experts=4, moe_intermediate_size=176, intermediate_size=688, head_dim=64
    ),
    # DeepSeek-V3's block: multi-head latent attention (queries and keys/values through low-rank projections,
    # RoPE on a slice of each head), a dense first layer, then sigmoid routing limited to the best expert groups
    # (2 groups of 2 experts, 1 group per token) beside an always-on shared expert.
    "tiny-deepseek-v3": _moe(
        "deepseek_v3",
        num_key_value_heads=4,
        n_routed_experts=4,
        n_group=2,
        topk_group=1,
        n_shared_experts=1,
        first_k_dense_replace=1,
        intermediate_size=688,
        moe_intermediate_size=176,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=48,
        qk_rope_head_dim=16,
        v_head_dim=64,
        head_dim=16,
    ),
    "gpt2-124m": _gpt2(layers=12, hidden=768, heads=12),
    "gpt2-350m": _gpt2(layers=24, hidden=1024, heads=16),
    "llama-1b": _llama(layers=22, hidden=2048, heads=32, kv_heads=4, intermediate=5632),
    # Llama 3 8B's shape: untied output layer, RoPE base 500,000 (for long contexts).
    "llama-8b": _llama(
        layers=32,
        hidden=4096,
        heads=32,
        kv_heads=8,
        intermediate=14336,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    ),  # fmt: skip
    # Qwen3-30B-A3B's shape: 48 layers of 128 experts, 8 active per token (3.3B of 30.5B parameters); the router's
    # logits and load-balancing loss in the outputs, as lmscale trains them (configs/qwen3-30b-a3b.yaml).
    "qwen3-30b-a3b": _llama(
        layers=48,
        hidden=2048,
        heads=32,
        kv_heads=4,
        intermediate=6144,
        family="qwen3_moe",
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=True,
        output_router_logits=True,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
    ),  # fmt: skip
}


def preset_shape(preset: str, vocab_size: int, max_seq_len: int) -> tuple[str, dict]:
    """A preset's family and HF config keys, sized to the vocabulary and the sequence length (the output
    layer of the non-GPT-2 presets is tied to the embeddings unless the preset says otherwise)."""
    shape = dict(PRESETS[preset])
    family = shape.pop("family")
    if family == "gpt2":
        return family, {**shape, "vocab_size": vocab_size, "n_positions": max_seq_len}
    shape.setdefault("tie_word_embeddings", True)
    return family, {**shape, "vocab_size": vocab_size, "max_position_embeddings": max_seq_len}
