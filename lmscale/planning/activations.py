"""Activation memory of one training token: what each block keeps for backward, the working set of one
block's backward at the step's peak, and what lives outside the blocks (final norm, logits).

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

# One block's backward at the step's peak holds, besides what the blocks keep, the gradients it is computing:
# a few hidden-wide ones (the residual stream's, the norm's) and one of the MLP's intermediates' (or eager
# attention's scores'). Measured on CPU with lmscale.planning.live_bytes (Llama, GPT-2, Qwen3-MoE, Mixtral
# shapes, fp32 and bf16): 3.5-12 units of h, the larger with wider MLPs and in bf16.
BACKWARD_HIDDEN = 2


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
    """The working set of one block's backward at its peak: a few hidden-wide gradients and one intermediate's
    (a tiled MLP's slice is recomputed with its four kept intermediates and two gradients) or eager attention's
    scores' gradient (fp32 in 16-bit training), whichever is larger."""
    h, tensor = facts.hidden, setup.tensor
    if setup.checkpointing:  # the recomputed block frees each intermediate as its gradient is made (measured)
        return BACKWARD_HIDDEN * h
    if setup.tiled_mlp:
        mlp = 6 * facts.mlp_width * min(1.0, (setup.tiled_tokens or h) / setup.seq_len)
    else:
        mlp = facts.mlp_width
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
    """The final norm and the loss: the fused chunked loss keeps one fp32 block about the hidden size; else
    the logits and what the loss makes of them (the blockwise loss makes no fp32 copy)."""
    h, vocab = facts.hidden, facts.vocab
    final_norm = norm_units(facts, setup) * h
    if setup.chunked_loss and facts.fusable_head:
        return final_norm + 4 * h / setup.width
    if setup.chunked_loss:  # the logits in blocks: 16-bit and no fp32 copy (or fp32 alone)
        logit_bytes = 2 * vocab * (2 if setup.precision == "fp32" else 1)
    else:  # the logits, the loss's fp32 copy (16-bit) and log-probabilities, a gradient: ~10 bytes measured
        logit_bytes = 10 * vocab
    return final_norm + logit_bytes / setup.width


def activation_bytes(facts: ModelFacts, setup: ActivationSetup) -> float:
    """Peak activation bytes per token on one rank: the blocks' kept activations (with checkpointing, their
    inputs: every block's, or about two blocks' when offloaded to host memory, plus the one recomputed), the
    working set of one block's backward, and what lives outside the blocks."""
    h, layers = facts.hidden, facts.layers
    layer = layer_units(facts, setup)
    if setup.checkpointing:
        inputs = min(2, layers) if setup.offload else layers
        blocks = inputs * h + layer
        masks = dropout_mask_bytes(facts, setup)
    else:
        blocks = layers * layer
        masks = layers * dropout_mask_bytes(facts, setup)
    units = blocks + backward_units(facts, setup) + outside_units(facts, setup)
    return units * setup.width + masks


def head_gradient_bytes(facts: ModelFacts, setup: ActivationSetup) -> int:
    """Once per step, not per token: the fused loss's backward makes the output layer's whole weight gradient
    (DeepSpeed's `vocab_parallel_linear_cross_entropy`), while every block's activations are still kept."""
    if not (setup.chunked_loss and facts.fusable_head):
        return 0
    return facts.vocab * facts.hidden * setup.width


def embedding_gradient_bytes(facts: ModelFacts, setup: ActivationSetup) -> int:
    """At the end of backward, once the blocks' activations are gone: the embedding's dense weight gradient,
    and for a tied output layer also the output layer's gradient, which autograd holds until it adds the two
    (three vocabulary x hidden matrices at once: on Llama 3.2 1B in bf16, 1.5 GiB)."""
    return (3 if facts.tied_embeddings else 1) * facts.vocab * facts.hidden * setup.width


def step_activation_bytes(facts: ModelFacts, setup: ActivationSetup, tokens: float) -> int:
    """A step's activation peak for `tokens` per micro-batch: every kept activation and the output layer's
    gradient as backward starts, or the embedding's gradients as it ends (what decides with activation
    checkpointing and a large vocabulary), whichever is larger."""
    starts = activation_bytes(facts, setup) * tokens + head_gradient_bytes(facts, setup)
    return int(max(starts, embedding_gradient_bytes(facts, setup)))
