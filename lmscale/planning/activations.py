"""Activation memory of a training step: what each block keeps for backward per token, and the step's peak,
the largest of three moments of backward: the loss's (the final norm and the loss's tensors), a block's (its
working set, and the block recomputed under checkpointing), and the end (the embedding's gradients).

Korthikanti et al. (2022) count 34·h bytes per token and layer for GPT-3's blocks (LayerNorm, a 4·h GELU MLP,
dropout). Today's families keep other things: a gated MLP keeps four of its intermediates (gate, activation,
up, their product), an RMSNorm keeps its input, the normalized input and (for the next linear) its output, and
in 16-bit it upcasts its input to fp32 first (HF's Llama-style norms), grouped-query attention keeps narrower
keys and values, Qwen3 normalizes queries and keys per head, DeepSeek's latent attention keeps its latents and
every head's full-width queries and keys, and an MoE layer keeps every routed copy of a token. The counts below
are those tensors, read off the families' modeling code and checked, tensor by tensor, against the live tensors
of a real step (lmscale.planning.live_bytes; tests/planning/test_activation_memory.py measures Llama, GPT-2,
Qwen3-MoE, Mixtral and DeepSeek-V3 shapes in fp32 and bf16, sdpa and eager, with each activation option, and
holds the planner within 10% of the measured peak).

A "unit" is one element in the training dtype (4 bytes in fp32, 2 in 16-bit). Dropout masks are bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmscale.planning.plan import ModelFacts

# One block's backward at its peak holds, besides what the blocks keep, the gradients it is computing: a few
# hidden-wide ones (the residual stream's, the norm's, attention's) and the MLP's: a gated MLP's product
# gives two intermediates' gradients at once. Measured on CPU with lmscale.planning.live_bytes (Llama, GPT-2,
# Qwen3-MoE, Mixtral, DeepSeek-V3 shapes, fp32 and bf16, with and without checkpointing): 3-7 units of h
# besides the MLP's, the recomputed block of checkpointing alike.
BACKWARD_HIDDEN = 3


def element_bytes(precision: str) -> int:
    """Bytes of one element in the training dtype: fp32's 4, bf16's and fp16's 2."""
    return 4 if precision == "fp32" else 2


@dataclass(frozen=True)
class ActivationSetup:
    """What decides a token's activations besides the model: the row length and the step's options."""

    seq_len: int
    precision: str = "bf16"
    attention: str = "sdpa"
    checkpointing: bool = False
    tensor: int = 1
    chunked_loss: bool = False
    tiled_mlp: bool = False
    tiled_tokens: int | None = None  # tokens per tiled-MLP slice; None: the hidden size (DeepSpeed's choice)
    offload: bool = False
    fused_kernels: bool = True

    @property
    def width(self) -> int:
        return element_bytes(self.precision)

    @property
    def upcast(self) -> int:
        """Units of an RMSNorm's fp32 copy of its input: 1 in fp32 (no copy, the input itself), 2 in 16-bit."""
        return 1 if self.precision == "fp32" else 2


def norm_units(facts: ModelFacts, setup: ActivationSetup, output_kept: bool = True) -> float:
    """Units per hidden element one norm keeps: LayerNorm its input and output; RMSNorm its (fp32) input, the
    normalized input (the weight's gradient) and the output the next linear keeps."""
    if not facts.rms_norm:
        return 2
    return setup.upcast + 1 + output_kept


def scores_units(facts: ModelFacts, setup: ActivationSetup) -> float:
    """Eager attention's s x s probabilities per token (fp32 softmax, and its 16-bit copy in 16-bit training);
    fused kernels (sdpa, flash) keep none."""
    if setup.attention != "eager":
        return 0
    return facts.heads * setup.seq_len * (1 if setup.precision == "fp32" else 3)


def mlp_units(facts: ModelFacts, setup: ActivationSetup) -> float:
    """The MLP's kept intermediates per token: a gated MLP's four, a plain one's two (the fused GELU keeps its
    input; HF's composed tanh-GELU keeps three more), an MoE layer's for each routed copy plus the copy's input
    and weighted output. A tiled MLP keeps none (each slice is recomputed in backward)."""
    if setup.tiled_mlp:
        return 0
    if facts.gated_mlp:
        kept = 4 * facts.mlp_width
    else:
        kept = (2 if setup.fused_kernels else 5) * facts.mlp_width
    # DeepSeek's router keeps an fp32 copy of its input in 16-bit training.
    router = 2 * facts.hidden if facts.fp32_router and setup.upcast == 2 else 0
    return kept + 2 * facts.hidden * facts.top_k + router


def layer_units(facts: ModelFacts, setup: ActivationSetup) -> float:
    """Units one block keeps per token without checkpointing; tensor parallelism divides what lives inside the
    split linears (queries, keys, values, the MLP, the scores), not the norms."""
    h = facts.hidden
    q, kv = facts.query_width, facts.key_value_width
    if facts.key_value_latent:
        attention = latent_attention_units(facts, setup)
    else:
        attention = 2 * q + 2 * kv
    if facts.qk_norm:  # per-head norms of queries and keys: their input and normalized output
        attention += norm_units(facts, setup, output_kept=False) * (q + kv)
    inside = attention + mlp_units(facts, setup) + scores_units(facts, setup)
    return 2 * norm_units(facts, setup) * h + inside / setup.tensor


def latent_attention_units(facts: ModelFacts, setup: ActivationSetup) -> float:
    """DeepSeek's multi-head latent attention (HF's DeepseekV2/V3Attention): the queries three times (the
    up-projection's output, kept by the rotary slice's product; the joined query; the keys built to its width),
    the plain keys of every head out of the key-value up-projection (its values are left out, as the plain
    form's are: measured alike), the rotary parts' products, the down-projection's output, and the two latents'
    RMSNorms (the key-value one's input is a slice of that output, already counted, unless 16-bit upcasts it)."""
    heads, rope = facts.heads, facts.rope_head_dim
    query, plain = facts.query_width, facts.head_dim - rope
    key_value_up = heads * plain
    down = facts.key_value_latent + rope
    norms = norm_units(facts, setup) * facts.query_latent
    norms += (norm_units(facts, setup) - (setup.upcast == 1)) * facts.key_value_latent
    return 3 * query + key_value_up + 2 * heads * rope + down + norms


def backward_units(facts: ModelFacts, setup: ActivationSetup) -> float:
    """The working set of one block's backward at its peak: a few hidden-wide gradients and the MLP's
    intermediates' (two at once behind a gated MLP's product; a tiled MLP's slice is recomputed with its four
    kept intermediates and two gradients) or eager attention's scores' gradient (fp32 in 16-bit training),
    whichever is larger."""
    h, tensor = facts.hidden, setup.tensor
    if setup.tiled_mlp:
        mlp = 6 * facts.mlp_width * min(1.0, (setup.tiled_tokens or h) / setup.seq_len)
    else:
        mlp = (2 if facts.gated_mlp else 1) * facts.mlp_width
    scores = 0
    if setup.attention == "eager":
        scores = facts.heads * setup.seq_len * (1 if setup.precision == "fp32" else 2)
    return BACKWARD_HIDDEN * h + max(mlp, scores) / tensor


def dropout_mask_bytes(facts: ModelFacts, setup: ActivationSetup) -> float:
    """Per token and block: the residual dropouts' masks (a byte per element), and eager attention's dropped
    probabilities with their mask (fused kernels regenerate the mask from the RNG state)."""
    if not facts.dropout:
        return 0
    scores = facts.heads * setup.seq_len / setup.tensor if setup.attention == "eager" else 0
    return 2 * facts.hidden + scores * (1 + setup.width)


def outside_units(facts: ModelFacts, setup: ActivationSetup) -> float:
    """The final norm and the loss's backward, when it holds most: the fused loss keeps no logits, only its
    working set (an fp32 block of logits about the hidden size, the hidden states' fp32 gradient it sums into,
    and in 16-bit the block's gradient cast back); the plain loss holds its fp32 log-probabilities, their
    gradient and the logits' gradient (12 bytes per vocabulary entry, measured in fp32 and bf16), the blockwise
    loss the 16-bit logits and their gradient (no fp32 copy)."""
    h, vocab = facts.hidden, facts.vocab
    final_norm = norm_units(facts, setup) * h
    if setup.chunked_loss and facts.fusable_head:
        cast_back = 2 * h if setup.width == 2 else 0  # fp32 training multiplies the fp32 block as it is
        return final_norm + (4 * h + 4 * h + cast_back) / setup.width
    if setup.chunked_loss:
        logit_bytes = 2 * vocab * setup.width
    else:
        logit_bytes = 12 * vocab
    return final_norm + logit_bytes / setup.width


def kept_units(facts: ModelFacts, setup: ActivationSetup) -> float:
    """What the blocks keep on the device for backward per token: every block's activations, with checkpointing
    every block's input, and with checkpoints offloaded to host memory none (a block's input comes back when
    its recompute starts: `recomputed_units`)."""
    if setup.checkpointing:
        return 0 if setup.offload else facts.layers * facts.hidden
    return facts.layers * layer_units(facts, setup)


def recomputed_units(facts: ModelFacts, setup: ActivationSetup) -> float:
    """The block recomputed under checkpointing during its backward, and its input copied back from host
    memory when offloaded (measured with the host copies apart: lmscale.planning.live_bytes.offload_as_on_a_gpu)."""
    if not setup.checkpointing:
        return 0
    return layer_units(facts, setup) + (facts.hidden if setup.offload else 0)


def kept_mask_bytes(facts: ModelFacts, setup: ActivationSetup) -> float:
    """Dropout masks kept per token: every block's, or the recomputed block's alone with checkpointing."""
    return dropout_mask_bytes(facts, setup) * (1 if setup.checkpointing else facts.layers)


def loss_backward_bytes(facts: ModelFacts, setup: ActivationSetup) -> float:
    """Bytes per token while the loss's backward runs: what the blocks keep, and the loss's own."""
    return (kept_units(facts, setup) + outside_units(facts, setup)) * setup.width + kept_mask_bytes(
        facts, setup
    )


def block_backward_bytes(facts: ModelFacts, setup: ActivationSetup) -> float:
    """Bytes per token while a block's backward runs (the loss's tensors are gone by then): what the blocks
    keep, the block recomputed under checkpointing, and the working set of its backward."""
    units = kept_units(facts, setup) + recomputed_units(facts, setup) + backward_units(facts, setup)
    return units * setup.width + kept_mask_bytes(facts, setup)


def held_head_gradient_bytes(facts: ModelFacts, setup: ActivationSetup) -> int:
    """A tied output layer's gradient, which autograd holds through every block's backward until it adds the
    embedding's (an untied one is added to the kept gradient at once)."""
    return facts.vocab * facts.hidden * setup.width if facts.tied_embeddings else 0


def head_gradient_bytes(facts: ModelFacts, setup: ActivationSetup) -> int:
    """Once per step, not per token: the fused loss's backward makes the output layer's whole weight gradient
    (DeepSpeed's `vocab_parallel_linear_cross_entropy`), while every block's activations are still kept. Once
    it is added to the gradient kept across steps it is gone before any block's backward."""
    if not (setup.chunked_loss and facts.fusable_head):
        return 0
    return facts.vocab * facts.hidden * setup.width


def embedding_gradient_bytes(facts: ModelFacts, setup: ActivationSetup) -> int:
    """At the end of backward, once the blocks' activations are gone: the embedding's dense weight gradient,
    and for a tied output layer also the output layer's gradient, which autograd holds until it adds the two
    (three vocabulary x hidden matrices at once: on Llama 3.2 1B in bf16, 1.5 GiB)."""
    return (3 if facts.tied_embeddings else 1) * facts.vocab * facts.hidden * setup.width


def step_activation_bytes(facts: ModelFacts, setup: ActivationSetup, tokens: float) -> int:
    """A step's activation peak for `tokens` per micro-batch, phase by phase: the loss's backward (with the
    output layer's gradient the fused loss makes), a block's backward, or the end of backward with the
    embedding's gradients (what decides with activation checkpointing and a large vocabulary)."""
    loss = loss_backward_bytes(facts, setup) * tokens + head_gradient_bytes(facts, setup)
    block = block_backward_bytes(facts, setup) * tokens + held_head_gradient_bytes(facts, setup)
    return int(max(loss, block, embedding_gradient_bytes(facts, setup)))
