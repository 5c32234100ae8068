"""parallel.*: how the ranks of a job divide the model beyond ZeRO's data parallelism."""

from __future__ import annotations

from pydantic import Field

from lmscale.config.section import Section


class ParallelConfig(Section):
    tensor: int = Field(
        1,
        ge=1,
        description="Tensor-parallel degree: ranks that split every attention and MLP weight (DeepSpeed "
        "AutoTP) and see the same batches; data-parallel ranks = ranks / (tensor x sequence).",
    )
    sequence: int = Field(
        1,
        ge=1,
        description="Sequence-parallel degree (DeepSpeed Ulysses): ranks that share each batch, every one "
        "holding a contiguous slice of every row, for contexts too long for one device's activations; "
        "combines with tensor.",
    )
    expert: int = Field(
        1,
        ge=1,
        description="Expert-parallel degree (DeepSpeed AutoEP), for mixture-of-experts models: each MoE layer's "
        "experts are split among this many data-parallel ranks, and tokens travel to their experts' rank and "
        "back (all-to-all); must divide the data-parallel ranks and the expert count.",
    )
