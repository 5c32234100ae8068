"""Causal LMs from HF `transformers`: named shape presets, or a local pretrained directory."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from lmscale.errors import ConfigError


def _gpt2(layers: int, hidden: int, heads: int) -> dict:
    return {"family": "gpt2", "n_layer": layers, "n_embd": hidden, "n_head": heads}


def _llama(layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int) -> dict:
    return {
        "family": "llama",
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
    }


# Shapes: the tiny ones train in minutes on a CPU; the others are the usual GPU reference shapes
# (GPT-2 small/medium, and TinyLlama's 1.1B with grouped-query attention).
PRESETS: dict[str, dict] = {
    "tiny-gpt2": _gpt2(layers=4, hidden=256, heads=4),
    "tiny-llama": _llama(layers=4, hidden=256, heads=4, kv_heads=2, intermediate=688),
    "gpt2-124m": _gpt2(layers=12, hidden=768, heads=12),
    "gpt2-350m": _gpt2(layers=24, hidden=1024, heads=16),
    "llama-1b": _llama(layers=22, hidden=2048, heads=32, kv_heads=4, intermediate=5632),
}


def preset_config(
    preset: str, vocab_size: int, max_seq_len: int, eos_id: int, pad_id: int
) -> PretrainedConfig:
    """An HF config for a named preset, sized to the tokenizer's vocabulary and the sequence length."""
    if preset not in PRESETS:
        raise ConfigError(f"model.preset={preset!r} is unknown: choose one of {', '.join(PRESETS)}")
    shape = dict(PRESETS[preset])
    family = shape.pop("family")
    # HF's defaults point at GPT-2's own token ids (50256), which do not exist in a trained vocabulary.
    shape.update(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=max_seq_len, **shape)
    return LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=max_seq_len, tie_word_embeddings=True, **shape
    )


def check_model_path(path: str) -> None:
    """Fail early, with the fix, when `model.path` is not a loadable HF model directory."""
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(
            f"model.path={path} has no config.json: point it at a directory written by save_pretrained"
        )


def build_model(
    preset: str, path: str | None, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, seed: int
) -> torch.nn.Module:
    """Build the causal LM (fresh weights from the preset, or pretrained from `path`)."""
    torch.manual_seed(seed)
    vocab_size = len(tokenizer)
    if path:
        check_model_path(path)
        config = AutoConfig.from_pretrained(path)
        if config.vocab_size < vocab_size:
            raise ConfigError(
                f"model.path={path} has vocab_size {config.vocab_size} but the tokenizer has {vocab_size}: "
                "use the model's own tokenizer (data.tokenizer=<model dir>)"
            )
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        config = preset_config(
            preset, vocab_size, max_seq_len, tokenizer.eos_token_id, tokenizer.pad_token_id
        )
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Training never decodes: no KV cache (it costs memory, and HF ignores packed position ids when one exists).
    model.config.use_cache = False
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
