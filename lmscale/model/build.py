"""Causal LMs from HF `transformers`: named shape presets, or a local pretrained directory."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DeepseekV3Config,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Qwen3MoeConfig,
)

from lmscale.config import FinetuneConfig, ModelConfig
from lmscale.errors import ConfigError
from lmscale.methods import method_for
from lmscale.model.finetune import apply_lora
from lmscale.model.presets import PRESETS, preset_shape


def preset_config(
    preset: str, vocab_size: int, max_seq_len: int, eos_id: int, pad_id: int
) -> PretrainedConfig:
    """An HF config for a named preset, sized to the tokenizer's vocabulary and the sequence length."""
    if preset not in PRESETS:
        raise ConfigError(f"model.preset={preset!r} is unknown: choose one of {', '.join(PRESETS)}")
    family, shape = preset_shape(preset, vocab_size, max_seq_len)
    # HF's defaults point at GPT-2's own token ids (50256), which do not exist in a trained vocabulary.
    shape.update(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    if family == "gpt2":
        return GPT2Config(**shape)
    config_class = {
        "mistral": MistralConfig,
        "mixtral": MixtralConfig,
        "qwen3_moe": Qwen3MoeConfig,
        "deepseek_v3": DeepseekV3Config,
    }.get(family, LlamaConfig)
    return config_class(**shape)


# Each dropout knob and the config attributes that hold it, by family (first one present wins).
DROPOUT_ATTRIBUTES = {
    "embedding_dropout": ("embd_pdrop", "embedding_dropout", "emb_dropout"),
    "attention_dropout": ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob"),
    "residual_dropout": ("resid_pdrop", "hidden_dropout", "resid_dropout", "hidden_dropout_prob"),
}


def apply_model_options(config: PretrainedConfig, options: ModelConfig, dropout_off: bool = False) -> None:
    """Dropout and sliding-window settings onto an HF config; a knob the family lacks is an error.
    `dropout_off` sets every dropout left unset to 0 (DPO: see build_model)."""
    for knob, attributes in DROPOUT_ATTRIBUTES.items():
        value = getattr(options, knob)
        present = [a for a in attributes if hasattr(config, a)]
        if value is None and dropout_off and present:
            value = 0.0
        if value is None:
            continue
        if not present:
            raise ConfigError(
                f"model.{knob}={value}: {config.model_type} models have no such dropout; unset it"
            )
        setattr(config, present[0], value)
    if options.sliding_window is not None:
        if not hasattr(config, "sliding_window"):
            raise ConfigError(
                f"model.sliding_window={options.sliding_window}: {config.model_type} models have no local "
                "attention; use a family that does (e.g. model.preset=tiny-mistral) or unset it"
            )
        config.sliding_window = options.sliding_window


def check_attention(implementation: str) -> None:
    """flash_attention_2 needs a GPU and the flash-attn package; say so before building anything."""
    if implementation != "flash_attention_2":
        return
    from transformers.utils import is_flash_attn_2_available

    if not torch.cuda.is_available() or not is_flash_attn_2_available():
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 is not available here (it needs a CUDA GPU and the "
            "flash-attn package): install flash-attn on a GPU machine, or use sdpa"
        )


def check_model_path(path: str) -> None:
    """Fail early, with the fix, when `model.path` is not a loadable HF model directory."""
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(
            f"model.path={path} has no config.json: point it at a directory written by save_pretrained"
        )


def set_labels(config: PretrainedConfig, labels: list[str], pad_id: int) -> None:
    """A classification head's size and class names; the pad id tells HF where each row's last token is."""
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    config.pad_token_id = pad_id


def build_model(
    options: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    seed: int,
    finetune: FinetuneConfig | None = None,
    labels: list[str] | None = None,
) -> torch.nn.Module:
    """Build the model (fresh weights from the preset, or pretrained from `options.path`): a causal LM,
    or a sequence classifier over `labels`; with LoRA adapters when `finetune.lora` is set."""
    finetune = finetune or FinetuneConfig()
    method = method_for(finetune)
    torch.manual_seed(seed)
    check_attention(options.attn_implementation)
    auto_class = AutoModelForSequenceClassification if method.class_head else AutoModelForCausalLM
    config = model_config(options, tokenizer, max_seq_len)
    apply_model_options(config, options, method.dropout_off)  # dropout: unless model.*_dropout says otherwise
    if method.class_head:
        set_labels(config, labels or list(method.class_names), tokenizer.pad_token_id)
    if options.path:
        model = auto_class.from_pretrained(
            local_model_path(options),
            config=config,
            dtype=torch.float32,
            attn_implementation=options.attn_implementation,
            trust_remote_code=options.trust_remote_code,
        )
    else:
        model = auto_class.from_config(
            config, dtype=torch.float32, attn_implementation=options.attn_implementation
        )
    prepare_for_training(model, options)
    if finetune.lora is not None:
        model = apply_lora(model, finetune.lora, method.class_head)
    return model


def local_model_path(options: ModelConfig) -> str:
    """model.path, absolute, because exports record it (a LoRA adapter names its base model by this path)."""
    return str(Path(options.path).expanduser().resolve())


def model_config(
    options: ModelConfig, tokenizer: PreTrainedTokenizerBase, max_seq_len: int
) -> PretrainedConfig:
    """The HF config to build: model.path's (checked against the tokenizer), or the preset's."""
    vocab_size = len(tokenizer)
    if not options.path:
        return preset_config(
            options.preset, vocab_size, max_seq_len, tokenizer.eos_token_id, tokenizer.pad_token_id
        )
    path = local_model_path(options)
    check_model_path(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=options.trust_remote_code)
    if config.vocab_size < vocab_size:
        raise ConfigError(
            f"model.path={path} has vocab_size {config.vocab_size} but the tokenizer has {vocab_size}: "
            "use the model's own tokenizer (data.tokenizer=<model dir>)"
        )
    return config


def prepare_for_training(model: torch.nn.Module, options: ModelConfig) -> None:
    """No KV cache, fused activations, tiled MLPs and activation checkpointing as model.* asks."""
    # Training never decodes: no KV cache (it costs memory, and HF ignores packed position ids when one exists).
    model.config.use_cache = False
    if options.fused_kernels:
        from lmscale.model.kernels import fuse_activations  # here: transformers.activations takes ~0.6 s

        fuse_activations(model)
    if options.tiled_mlp:
        from lmscale.model.tiled_mlp import tile_mlps

        tile_mlps(model, options.tiled_mlp_tokens or model.config.hidden_size)
    if options.activation_checkpointing:
        # Non-reentrant checkpointing works with ZeRO-3's parameter gathering and needs no input grads.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if options.activation_offload:
            # The same checkpoint function under torch's save_on_cpu. transformers 5 has this as
            # activation_checkpointing_enable(offload=True), but it asks for pinned memory even where there is no
            # accelerator, which torch refuses ("pin_memory=True requires a CUDA or other accelerator backend").
            model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=offloaded_checkpoint)


def offloaded_checkpoint(function, *args, **kwargs):
    """torch's non-reentrant checkpoint whose saved tensors (what the recompute starts from) are kept in host
    memory, pinned where there is a GPU, and copied back for the backward pass."""
    from torch.utils.checkpoint import checkpoint

    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


def context_length(config: PretrainedConfig) -> int | None:
    """Positions the model has embeddings for (None when the family does not say)."""
    for attribute in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attribute, None)
        if isinstance(value, int):
            return value
    return None


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Distinct parameters (tied embeddings counted once); with `trainable_only`, those that train."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad or not trainable_only)


def describe_parameters(model: torch.nn.Module) -> str:
    trainable, total = count_parameters(model, trainable_only=True), count_parameters(model)
    return (
        f"{trainable / 1e6:.3f}M trainable of {total / 1e6:.2f}M parameters ({100 * trainable / total:.2f}%)"
    )
