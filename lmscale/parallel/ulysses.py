"""Ulysses sequence parallelism for HF attention: the ranks of a sequence group each hold a contiguous
slice of every row (lmscale.data.batches.sequence_slice); around attention, an all-to-all turns
"all heads of my tokens" into "my heads of all tokens", so each rank attends over the whole sequence
for a share of the heads, and a second all-to-all turns it back.

DeepSpeed's `UlyssesSPAttentionHF` does the exchanges. Its `register_with_transformers` fixes the
micro-batch's row count at registration, while lmscale's bucketed batches vary in rows from one
micro-batch to the next (a token budget, not a row count), so the registration is done here, with an
attention function that sets the row count of each call first.
"""

from __future__ import annotations

from typing import Any

import torch

from lmscale.parallel.layout import Layout

# The attributes of UlyssesSPAttentionHF (deepspeed 0.19) whose second dimension is the row count.
ROW_SHAPES = ("required_query_shape", "required_key_value_shape", "required_context_shape")


def set_rows(attention: Any, rows: int) -> None:
    """Make a Ulysses attention module expect `rows` rows (the sequence length it updates itself)."""
    if attention.batch_size == rows:
        return
    attention.batch_size = rows
    for name in ROW_SHAPES:
        shape = list(getattr(attention, name))
        shape[1] = rows
        setattr(attention, name, torch.Size(shape))


def register_ulysses(model: torch.nn.Module, layout: Layout) -> Any:
    """Route the model's attention through Ulysses over the layout's sequence groups; returns the groups
    object (`mpu`) that `deepspeed.initialize` needs, or None with tensor parallelism too. Call once per
    process, after the process group exists."""
    # imported here: deepspeed must not load before the accelerator is chosen
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    implementation = model.config._attn_implementation
    mpu, process_group = ulysses_groups(layout)
    shape = model.config.get_text_config()
    heads = shape.num_attention_heads
    kv_heads = getattr(shape, "num_key_value_heads", None) or heads
    attention = UlyssesSPAttentionHF(
        attn=ALL_ATTENTION_FUNCTIONS[implementation],
        batch_size=1,
        attn_head_count=heads // layout.tensor,  # a tensor slice's heads: AutoTP splits q/k/v by heads
        attn_head_size=getattr(shape, "head_dim", None) or shape.hidden_size // heads,
        kv_head_count=kv_heads // layout.tensor,
        num_hidden_layers=shape.num_hidden_layers,
        process_group=process_group,
        seq_length_is_variable=True,
    )
    attention.core_attn_implementation = implementation

    def sequence_parallel_attention(module, query, key, value, attention_mask, *args, **kwargs):
        # The mask HF built is for this rank's slice only; Ulysses attends causally by the gathered
        # position ids instead (right padding never precedes a real token, so no mask is needed).
        set_rows(attention, query.shape[0])
        return attention(module, query, key, value, None, *args, **kwargs)

    # Under the implementation's own name, so every branch transformers takes for it still applies.
    ALL_ATTENTION_FUNCTIONS[implementation] = sequence_parallel_attention
    global _SEQUENCE_GROUP
    _SEQUENCE_GROUP = process_group
    return mpu


# This process's sequence group once register_ulysses has run (like the attention function it installs, one
# per process): what the load-balancing loss of a mixture-of-experts router reduces over.
_SEQUENCE_GROUP: Any = None


def sequence_group() -> Any:
    """This process's sequence-parallel group, or None without sequence parallelism."""
    return _SEQUENCE_GROUP


def ulysses_groups(layout: Layout) -> tuple[Any, Any]:
    """(mpu for `deepspeed.initialize`, this rank's sequence group).

    Alone, DeepSpeed's own groups (consecutive ranks) are passed to the engine, which then reduces
    gradients over the sequence-data-parallel ranks. With AutoTP, DeepSpeed 0.19's engine replaces any
    mpu it is given with its own tensor/data mesh, whose "data" dimension (the ranks holding the same
    tensor slice) is every sequence and data-parallel rank: ZeRO reduces over exactly those, and is told
    nothing of the sequence groups (lmscale.training.loop.gradient_divisor counts what it divides by). The
    sequence groups are then made here, `tensor` ranks apart (lmscale.parallel.layout.Layout).
    """
    if layout.tensor == 1:
        import deepspeed.runtime.sequence_parallel.parallel_state_sp as groups

        groups.initialize_sequence_parallel(sequence_parallel_size=layout.sequence)
        return groups, groups.get_sequence_parallel_group()
    rank, own = torch.distributed.get_rank(), None
    for ranks in layout.sequence_groups():
        group = torch.distributed.new_group(ranks)  # every rank creates every group, in the same order
        if rank in ranks:
            own = group
    return None, own
