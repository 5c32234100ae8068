"""model.*: which model, its dropout, attention kernel and memory-saving options."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmscale.config.section import Section


class ModelConfig(Section):
    preset: str = Field(
        "tiny-gpt2", description="Model shape from lmscale.model.build.PRESETS, used when `path` is unset."
    )
    path: str | None = Field(
        None,
        description="Pretrained model to start from: a save_pretrained directory or a Hub id (org/name).",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run Python code shipped in model.path / its tokenizer (custom architectures); "
        "off, so a model directory can never execute code unless you say so.",
    )
    embedding_dropout: float | None = Field(
        None, ge=0, lt=1, description="Dropout on embeddings; unset = the family's default."
    )
    attention_dropout: float | None = Field(
        None, ge=0, lt=1, description="Dropout on attention probabilities; unset = the family's default."
    )
    residual_dropout: float | None = Field(
        None, ge=0, lt=1, description="Dropout on residual branches; unset = the family's default."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each block's activations in backward: less memory, ~1/3 more compute."
    )
    activation_offload: bool = Field(
        False,
        description="With activation_checkpointing: keep the activations saved for the recompute in pinned host "
        "memory instead of on the GPU (transformers' offload, torch's save_on_cpu); copies each way per step.",
    )
    tiled_mlp: bool = Field(
        False,
        description="Compute each block's MLP a slice of the sequence at a time (DeepSpeed's TiledMLP; recomputed "
        "in backward): long contexts, where the MLP's activations dominate. Dense MLPs without dropout.",
    )
    tiled_mlp_tokens: int | None = Field(
        None,
        ge=1,
        description="model.tiled_mlp: about this many tokens per slice; unset = the hidden size (DeepSpeed's choice).",
    )
    router_bias_update: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="DeepSeek-V3's auxiliary-loss-free load balancing: after each optimizer step, each MoE "
        "layer's routing bias (e_score_correction_bias) moves by this much up for every expert that got fewer "
        "tokens than the layer's mean over all ranks, and down for every one that got more (DeepSeek-V3 "
        "trained with 0.001); 0 keeps the bias as loaded. Routers with such a bias only.",
    )
    fused_kernels: bool = Field(
        True,
        description="Swap HF's Python-composed tanh-GELU (GPT-2 family) for torch's fused kernel of the same "
        "function; false keeps HF's modules (bitwise as HF computes).",
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel: eager, sdpa (torch), or flash_attention_2 (GPU, flash-attn)."
    )
    sliding_window: int | None = Field(
        None, ge=1, description="Local attention window in tokens, for families that support it (mistral)."
    )
    compile: bool = Field(
        False,
        description="torch.compile the model under DeepSpeed (engine.compile, dynamic shapes): a one-time "
        "compile (logged as compile_s, apart from throughput), then faster steps where it pays.",
    )

    @model_validator(mode="after")
    def _check_offload(self) -> ModelConfig:
        if self.activation_offload and not self.activation_checkpointing:
            raise ValueError(
                "model.activation_offload=true keeps what activation checkpointing saves in host memory: set "
                "model.activation_checkpointing=true"
            )
        if self.tiled_mlp and self.compile:
            raise ValueError("model.tiled_mlp is not tested with model.compile: unset one of them")
        if self.activation_offload and self.compile:
            raise ValueError("model.activation_offload is not tested with model.compile: unset one of them")
        return self
