"""`lmscale plan`: will this job fit? Per-GPU memory for ZeRO 0-3, with and without CPU offload, for the
configured tensor/sequence layout, and (when that does not fit) for tensor- and sequence-parallel ones.

Model states follow the ZeRO paper's accounting (Rajbhandari et al., 2020) for Adam in mixed precision:
2Ψ bytes of 16-bit weights, 2Ψ of 16-bit gradients and 12Ψ of optimizer states (fp32 master weights,
momentum, variance); stage 1 partitions the 12Ψ over the data-parallel ranks, stage 2 the gradients too,
stage 3 the weights too; CPU offload moves the optimizer states (and with stage 3 the weights) to host
memory. In fp32 the weights and gradients take 4Ψ each and the states 8Ψ. Frozen parameters (LoRA's
base model) have weights but neither gradients nor optimizer states. DeepSpeed's own estimators
(`estimate_zero2/3_model_states_mem_needs`, which assume every parameter trains) are shown beside
stages 2 and 3 as a cross-check when every parameter trains.

Activations (lmscale.planning.activations): what each family's blocks keep for backward (a gated MLP's four
intermediates, RMSNorm's fp32 input, grouped-query keys and values, MoE's routed copies, eager attention's
scores), the working set of one block's backward, and the logits (6·V bytes per token in 16-bit: the logits
and their fp32 copy; 2·V with the blockwise chunked loss; about 4·h with the loss fused into the output
layer, lmscale.objectives.fused_head). With activation checkpointing a block keeps only its input and one
block is recomputed at a time. Checked against the live tensors of real steps to 10%.

Tensor parallelism (degree t) splits the attention and MLP weights (the block's linear layers) over t
ranks, and the activations inside those layers (queries, keys, values, the MLP's, the scores); ZeRO then
partitions over the data-parallel ranks (ranks / t). Sequence parallelism (degree s) gives each rank
1/s of every micro-batch's tokens, so all activations per rank divide by s; ZeRO partitions over every
rank (DeepSpeed's sequence-data-parallel group). The arithmetic is written here by hand: no library computes it
for a config; the planner is pure functions over numbers, tested against hand-worked figures.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lmscale.atomic import write_atomically
from lmscale.config import Config
from lmscale.methods import method_for
from lmscale.parallel.autoep import expert_count
from lmscale.parallel.layout import ulysses_split_problems
from lmscale.planning.activations import (
    ActivationSetup,
    block_backward_bytes,
    element_bytes,
    embedding_gradient_bytes,
    head_gradient_bytes,
    held_head_gradient_bytes,
    loss_backward_bytes,
    step_activation_bytes,
)

GIB = 1024**3
CUDA_CONTEXT_BYTES = GIB  # CUDA context, kernels and allocator slack, per GPU
HEADROOM = 0.9  # plan to use at most 90% of a GPU


@dataclass(frozen=True)
class ModelFacts:
    params: int
    largest_layer_params: int
    layers: int
    hidden: int
    heads: int
    vocab: int
    frozen_params: int = 0  # weights only: no gradients, no optimizer states (LoRA's base model)
    split_params: int = 0  # weights of the blocks' linear layers: what tensor parallelism divides
    kv_heads: int = 0  # 0: as many as heads
    fusable_head: bool = False  # the chunked loss fuses the output layer (lmscale.objectives.fused_head)
    expert_params: int = 0  # mixture-of-experts layers' expert weights: what parallel.expert divides
    experts: int = 0  # experts per MoE layer
    top_k: int = 0  # experts each token goes to
    tileable_mlp: bool = True  # model.tiled_mlp applies (a dense MLP without dropout)
    # The blocks' shape, for their activations (lmscale.planning.activations): 0 means GPT-2's.
    head_dim: int = 0  # 0: hidden / heads
    mlp_intermediate: float = (
        0  # a token's MLP width, per layer on average (MoE: its experts'); 0: 4 x hidden
    )
    gated_mlp: bool = False  # SwiGLU-style: gate and up projections
    rms_norm: bool = False  # Llama-style RMSNorm (upcast to fp32) instead of LayerNorm
    qk_norm: bool = False  # Qwen3: queries and keys normalized per head
    dropout: bool = False  # the blocks' residual dropout is on (GPT-2's default)
    # DeepSeek's multi-head latent attention (0: none): the query and key-value latents' widths, and each
    # head's rotary width (head_dim is then the query/key head's: its plain and rotary parts).
    query_latent: int = 0
    key_value_latent: int = 0
    rope_head_dim: int = 0
    fp32_router: bool = False  # the router runs in fp32 on an fp32 copy of its input (DeepSeek's)
    tied_embeddings: bool = False  # the output layer is the input embedding: one weight, two gradients

    @property
    def query_width(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def key_value_width(self) -> int:
        """Per token and layer, the width of its keys (or values) in the KV cache: latent attention caches its
        key-value latent and the shared rotary key instead (counted here as half each)."""
        if self.key_value_latent:
            return (self.key_value_latent + self.rope_head_dim) // 2
        return (self.kv_heads or self.heads) * (self.head_dim or self.hidden // self.heads)

    @property
    def mlp_width(self) -> float:
        return self.mlp_intermediate or 4 * self.hidden

    @property
    def trainable_params(self) -> int:
        return self.params - self.frozen_params

    def params_per_rank(self, tensor: int) -> int:
        """Weights one rank holds before ZeRO: the split linears' share and every other weight whole."""
        return self.params - self.split_params + self.split_params // tensor

    def expert_degrees(self, ranks: int, gpus_per_node: int) -> list[int]:
        """The expert-parallel degrees this model allows on `ranks` GPUs, within a node (AutoEP's all-to-all
        runs every MoE layer, forward and backward), from the smallest up."""
        return [
            d
            for d in range(2, gpus_per_node + 1)
            if self.experts and self.experts % d == 0 and ranks % d == 0 and gpus_per_node % d == 0
        ]


def model_facts(config: Config, vocab_size: int | None = None) -> ModelFacts:
    """The configured model's sizes (with its LoRA adapters): worked out from its config for the common
    families (lmscale.planning.config_count), else counted on the meta device (no memory) or read from the cache of
    an earlier count of the same model (see `facts_cache_path`)."""
    from lmscale.planning.config_count import facts_from_config

    vocab = vocab_size or config.data.vocab_size
    facts = facts_from_config(config, vocab)
    if facts is not None:
        return facts
    cache = facts_cache_path(config, vocab)
    if cache is not None and cache.is_file():
        try:
            return ModelFacts(**json.loads(cache.read_text()))
        except (ValueError, TypeError):  # unreadable or from another ModelFacts: count again
            pass
    facts = count_model_facts(config, vocab)
    if cache is not None:
        write_facts_cache(cache, facts)
    return facts


def count_model_facts(config: Config, vocab: int) -> ModelFacts:
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmscale.model.build import apply_model_options, preset_config
    from lmscale.model.finetune import apply_lora
    from lmscale.reporting.sink import quiet_transformers

    quiet_transformers()
    if config.model.path:
        hf_config = AutoConfig.from_pretrained(
            config.model.path, trust_remote_code=config.model.trust_remote_code
        )
    else:
        hf_config = preset_config(config.model.preset, vocab, config.data.max_seq_len, 0, 0)
    apply_model_options(hf_config, config.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
        if config.finetune.lora is not None:
            model = apply_lora(model, config.finetune.lora)
    return facts_of(model)


def facts_cache_path(config: Config, vocab: int) -> Path | None:
    """Where the facts of this model are cached: a file named by a hash of everything that decides them
    (the preset's shape or the model's config.json, the vocabulary, length, model options, LoRA, and the
    versions of lmscale, transformers and peft). Counting builds the model on the meta device, which
    imports its HF modeling code: about half of `lmscale plan`'s time. None when the model is not local,
    runs code of its own (trust_remote_code), or the cache is off (LMSCALE_CACHE=off)."""
    from importlib.metadata import PackageNotFoundError, version

    from lmscale import __version__
    from lmscale.model.presets import PRESETS

    if os.environ.get("LMSCALE_CACHE") == "off" or config.model.trust_remote_code:  # code may change
        return None
    if config.model.path:
        config_json = Path(config.model.path).expanduser() / "config.json"
        if not config_json.is_file():
            return None
        source = config_json.read_text()
    else:
        source = json.dumps(PRESETS.get(config.model.preset), sort_keys=True)
    versions = []
    for package in ("transformers", "peft"):
        try:
            versions.append(version(package))
        except PackageNotFoundError:
            versions.append(None)
    lora = config.finetune.lora.model_dump() if config.finetune.lora is not None else None
    key = [source, vocab, config.data.max_seq_len, config.model.model_dump(), lora, __version__, versions]
    key.append(FACTS_FIELDS)  # a cache written before a field was added would fill it with its default
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return home / "lmscale" / "model-facts" / f"{digest}.json"


FACTS_FIELDS = "params frozen split kv fusable experts top_k tileable head_dim mlp gated rms qk dropout latent router tied"


def write_facts_cache(path: Path, facts: ModelFacts) -> None:
    """Best effort (a read-only home only costs the next plan its speed), and atomic: written aside, renamed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(asdict(facts)))
    except OSError:
        pass


def is_tied(model: torch.nn.Module) -> bool:
    """Whether the output layer's weight is the input embedding's (GPT-2's, Llama 3.2 1B's)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embedding is not None and head.weight is embedding.weight


def facts_of(model: torch.nn.Module) -> ModelFacts:
    from lmscale.model.build import count_parameters
    from lmscale.objectives.fused_head import fused_head_problem

    params = count_parameters(model)
    largest = max(
        sum(p.numel() for p in module.parameters(recurse=False))
        for module in model.modules()
        if any(True for _ in module.parameters(recurse=False))
    )
    c = model.config
    # The blocks' linear layers (not the output layer, which lmscale keeps whole): AutoTP's split.
    split = sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith(("lm_head", "score"))
    )
    expert_params = sum(
        p.numel() for name, p in model.named_parameters() if "experts" in name.split(".")[:-1]
    )
    experts = (expert_count(c) or 0) if expert_params else 0
    mlp_dropout = c.model_type == "gpt2" and bool(getattr(c, "resid_pdrop", 0))
    return ModelFacts(
        params=params,
        frozen_params=params - count_parameters(model, trainable_only=True),
        largest_layer_params=largest,
        layers=c.num_hidden_layers,
        hidden=c.hidden_size,
        heads=c.num_attention_heads,
        vocab=c.vocab_size,
        split_params=split,
        kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        fusable_head=fused_head_problem(model) is None,
        expert_params=expert_params,
        experts=experts,
        top_k=c.num_experts_per_tok if experts else 0,
        tileable_mlp=not experts and not mlp_dropout,
        tied_embeddings=is_tied(model),
        **block_shape(model, experts),
    )


def block_shape(model: torch.nn.Module, experts: int) -> dict:
    """The ModelFacts fields of the blocks' shape (for their activations), read off a built model: its config's
    widths and the kinds of modules it has."""
    c = model.config
    names = [name for name, _ in model.named_modules()]
    kinds = {type(module).__name__ for module in model.modules()}
    dense = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * c.hidden_size
    parameters = [name for name, _ in model.named_parameters()]
    intermediate = dense
    if experts:  # the average over the blocks: some MoE families keep dense MLPs in a few (mlp_only_layers)
        expert_width = getattr(c, "moe_intermediate_size", None) or dense
        # DeepSeek's shared experts run for every token beside the routed ones.
        routed = (c.num_experts_per_tok + (getattr(c, "n_shared_experts", None) or 0)) * expert_width
        expert_blocks = len({n.split(".experts")[0] for n in parameters if ".experts" in n})
        layers = c.num_hidden_layers
        intermediate = (expert_blocks * routed + (layers - expert_blocks) * dense) / layers
    dropout = getattr(c, "resid_pdrop", None) or getattr(c, "hidden_dropout", None) or 0
    return {
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        "mlp_intermediate": intermediate,
        "gated_mlp": any(n.endswith(("gate_proj", "w3")) for n in names)
        or any("gate_up_proj" in n for n in parameters),
        "rms_norm": any("RMSNorm" in kind for kind in kinds),
        "qk_norm": any(n.endswith("q_norm") for n in names),
        "dropout": bool(dropout),
        "fp32_router": bool(experts)
        and "gate.weight" in (getattr(model, "_keep_in_fp32_modules_strict", None) or []),
        **latent_attention_shape(c),
    }


def latent_attention_shape(c: Any) -> dict:
    """DeepSeek's multi-head latent attention's widths (HF's `head_dim` there is the rotary part's)."""
    if not getattr(c, "kv_lora_rank", None):
        return {}
    return {
        "head_dim": c.qk_nope_head_dim + c.qk_rope_head_dim,
        "query_latent": c.q_lora_rank or 0,
        "key_value_latent": c.kv_lora_rank,
        "rope_head_dim": c.qk_rope_head_dim,
    }


# Optimizer moments kept per parameter: Adam's two, one for Lion and SGD's momentum; Adafactor's factored
# second moment is a row and a column per matrix (about nothing per parameter), without a first moment.
# Muon's own share keeps one momentum, the rest Adam's two (state_widths).
MOMENTS = {"adamw": 2.0, "lamb": 2.0, "lion": 1.0, "sgd": 1.0, "adafactor": 0.0}


@dataclass(frozen=True)
class StateWidths:
    """Bytes per parameter of the weight, its gradient and the optimizer's side (master copy and moments)."""

    weight: float
    grad: float
    states: float


ADAM_WIDTHS = {"fp32": StateWidths(4, 4, 8), "bf16": StateWidths(2, 2, 12), "fp16": StateWidths(2, 2, 12)}


def state_widths(
    precision: str, optimizer: str, state_dtype: str, muon_fraction: float, stage: int = 1
) -> StateWidths:
    """The widths for an optimizer: its moments, 2 bytes each with `optim.state_dtype: bf16`, else 4; under
    16-bit training a master copy too (bf16 with bf16 states, else fp32).

    Muon keeps one momentum for the `muon_fraction` of the parameters it takes (Adam's two for the rest).
    DeepSpeed 0.19.8's ZeRO keeps it in the 16-bit dtype in 16-bit training: stage 1-2 in the gradients' dtype
    (`_muon_momentum_buffer` in stage_1_and_2.py: `lerp_` needs grad and momentum alike), stage 3 in the
    communication dtype (`_create_momentum_buffer`); without ZeRO it is fp32 like the master weights (read
    in the checkpoints of each stage; bench/zero_memory.py measures ZeRO-1's).
    """
    moment = 2 if state_dtype == "bf16" else 4
    if optimizer == "muon":
        muon_moment = 2 if precision != "fp32" and stage > 0 else moment
        side = moment * MOMENTS["adamw"] * (1 - muon_fraction) + muon_moment * muon_fraction
    else:
        side = moment * MOMENTS[optimizer]
    if precision == "fp32":
        return StateWidths(4, 4, side)
    master = 2 if state_dtype == "bf16" else 4
    return StateWidths(2, 2, master + side)


def model_state_bytes(
    params: int,
    stage: int,
    ranks: int,
    offload: bool,
    precision: str,
    trainable: int | None = None,
    widths: StateWidths | None = None,
) -> tuple[int, int]:
    """(GPU bytes, CPU bytes) of weights, gradients and optimizer states on one rank (`widths`: AdamW's
    unless given).

    Every parameter has a weight; only the `trainable` ones (default: all) have gradients and states.
    """
    trainable = params if trainable is None else trainable
    w = widths or ADAM_WIDTHS[precision]
    weight, grad, states = w.weight, w.grad, w.states
    weights = weight * params / (ranks if stage == 3 else 1)
    grads = grad * trainable / (ranks if stage >= 2 else 1)
    optimizer = states * trainable / (ranks if stage >= 1 else 1)
    if not offload:
        return int(weights + grads + optimizer), 0
    # Offload (stages 2 and 3): optimizer states and their fp32 gradients live on the host;
    # with stage 3 the weights' partitions too (only the layer being computed is on the GPU).
    host_weights = weights if stage == 3 else 0
    return int(weights + grads - host_weights), int(optimizer + host_weights)


def buffer_bytes(params: int, stage: int, trainable: int | None = None) -> int:
    """DeepSpeed's 16-bit communication buckets (each at most what it carries), plus the CUDA context.

    The reduce bucket carries gradients (trainable parameters only); the all-gather bucket carries the
    updated trainable partitions under stages 1-2, and every weight, frozen ones too, under stage 3.
    """
    if stage == 0:
        return CUDA_CONTEXT_BYTES
    trainable = params if trainable is None else trainable
    bucket_elements = 5 * 10**8  # reduce/all-gather bucket size (elements), DeepSpeed's default
    gathered = params if stage == 3 else trainable
    return 2 * (min(trainable, bucket_elements) + min(gathered, bucket_elements)) + CUDA_CONTEXT_BYTES


def all_to_all_bytes(facts: ModelFacts, tokens: int, expert: int, precision: str) -> int:
    """AutoEP's token exchange of one MoE layer at a time: each token's hidden state once per chosen expert,
    sent and received (the combine reuses the space)."""
    if expert == 1:
        return 0
    width = element_bytes(precision)
    return 2 * tokens * facts.top_k * facts.hidden * width


@dataclass
class PlanRow:
    stage: int
    offload: bool
    model_state_bytes: int
    activation_bytes: int
    buffer_bytes: int
    total_bytes: int
    cpu_bytes: int
    fits: bool
    deepspeed_estimate_bytes: int | None  # DeepSpeed's own model-state estimate (stages 2 and 3)
    tensor: int = 1
    sequence: int = 1
    generation_bytes: int = 0  # an online method's KV cache while it samples (not at once with activations)
    expert: int = 1
    options: tuple[
        str, ...
    ] = ()  # memory options the row assumes beyond the config (lmscale.planning.options)

    def keys(self) -> str:
        """The config keys that select this row, as overrides."""
        keys = [f"zero.stage={self.stage}"] + (["zero.offload=cpu"] if self.offload else [])
        if self.tensor > 1:
            keys.insert(0, f"parallel.tensor={self.tensor}")
        if self.sequence > 1:
            keys.insert(0, f"parallel.sequence={self.sequence}")
        if self.expert > 1:
            keys.insert(0, f"parallel.expert={self.expert}")
        return " ".join([*self.options, *keys])

    def as_dict(self) -> dict:
        return asdict(self)


def deepspeed_estimate(facts: ModelFacts, stage: int, offload: bool, gpus: int, nodes: int) -> int | None:
    if facts.frozen_params:  # DeepSpeed's estimators count states for every parameter: not comparable
        return None
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(facts.params, gpus, nodes, cpu_offload=offload)[1]
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        return estimate_zero3_model_states_mem_needs(
            facts.params,
            facts.largest_layer_params,
            gpus,
            nodes,
            cpu_offload=offload,
            cpu_offload_params=offload,
        )[1]
    return None


@dataclass(frozen=True)
class Hardware:
    gpus_per_node: int
    nodes: int = 1
    gpu_mem_bytes: float = 80 * GIB
    cpu_mem_bytes: float = 512 * GIB  # per node


def activation_setup(config: Config, tensor: int = 1) -> ActivationSetup:
    """What decides a token's activations in this config (sequence length, checkpointing, attention,
    precision, loss), on a rank of a `tensor`-way split (lmscale.planning.activations)."""
    model = config.model
    return ActivationSetup(
        seq_len=config.data.max_seq_len,
        precision=config.precision,
        attention=model.attn_implementation,
        checkpointing=model.activation_checkpointing,
        tensor=tensor,
        chunked_loss=config.train.chunked_loss,
        tiled_mlp=model.tiled_mlp,
        tiled_tokens=model.tiled_mlp_tokens,
        offload=model.activation_offload,
        fused_kernels=model.fused_kernels,
    )


def rollout_rows(config: Config, data_ranks: int) -> int:
    """The completions one rank samples at once in an online method (GRPO): its prompts x the group."""
    grpo = config.finetune.grpo
    return max(1, grpo.prompts_per_step // data_ranks) * grpo.group_size


def generation_bytes(facts: ModelFacts, config: Config, data_ranks: int) -> int:
    """An online method's memory while it samples, beyond the weights: the KV cache of every completion a rank
    samples at once (each up to data.max_seq_len tokens: prompt and answer), keys and values of every layer,
    and one step's fp32 logits per completion. Sampling and the training step never overlap, so the larger
    of this and the step's activations is what a plan counts."""
    rows = rollout_rows(config, data_ranks)
    width = element_bytes(config.precision)
    per_token = 2 * facts.layers * facts.key_value_width * width
    return int(rows * config.data.max_seq_len * per_token + rows * facts.vocab * 4)


def reference_copy_bytes(config: Config, params: int, stage: int, ranks: int) -> int:
    """GRPO's frozen reference for the KL term of a full fine-tune (beta > 0): the starting model's weights
    once more, partitioned like the policy's under ZeRO-3 (with LoRA the base is the reference: no copy)."""
    grpo = config.finetune.grpo
    if not method_for(config.finetune).online or not grpo.beta or config.finetune.lora is not None:
        return 0
    width = element_bytes(config.precision)
    return int(width * params / (ranks if stage == 3 else 1))


# The set-ups a layout offers, fastest first: less partitioning, then no offload.
SETUPS = ((0, False), (1, False), (2, False), (2, True), (3, False), (3, True))


def plan_rows(
    facts: ModelFacts,
    config: Config,
    hardware: Hardware,
    tokens: int,
    tensor: int | None = None,
    sequence: int | None = None,
) -> list[PlanRow]:
    """Every ZeRO set-up of one layout (default: the configured one) for `tokens` per micro-batch of a
    data-parallel replica; tensor parallelism runs with ZeRO 1-2 only, as lmscale does."""
    tensor = config.parallel.tensor if tensor is None else tensor
    sequence = config.parallel.sequence if sequence is None else sequence
    ranks = hardware.gpus_per_node * hardware.nodes
    zero_ranks = ranks // tensor  # ZeRO partitions over the data-parallel ranks (sequence ranks included)
    params = facts.params_per_rank(tensor)
    trainable = params - facts.frozen_params
    setup = activation_setup(config, tensor)
    online = method_for(config.finetune).online
    sampling = generation_bytes(facts, config, ranks // (tensor * sequence)) if online else 0
    setups = [
        (stage, offload)
        for stage, offload in SETUPS
        if (tensor == 1 or (stage in (1, 2) and not offload)) and setup_allowed(config, stage, offload)
    ]
    optim = config.optim
    expert = config.parallel.expert
    rows = []
    for stage, offload in setups:
        widths = state_widths(config.precision, optim.name, optim.state_dtype, muon_fraction(facts), stage)
        gpu_states, cpu_states = sharded_state_bytes(
            facts, params, trainable, stage, (zero_ranks, expert), offload, config.precision, widths, tensor
        )
        gpu_states += reference_copy_bytes(config, params, stage, zero_ranks)
        activations = step_activation_bytes(facts, setup, tokens / sequence)
        buffers = buffer_bytes(params - facts.expert_params + facts.expert_params // expert, stage, trainable)
        buffers += all_to_all_bytes(facts, tokens // sequence, expert, config.precision)
        total = gpu_states + max(activations, sampling) + buffers
        cpu_total = cpu_states * hardware.gpus_per_node  # every rank of a node offloads to that node's RAM
        fits = total <= HEADROOM * hardware.gpu_mem_bytes and cpu_total <= HEADROOM * hardware.cpu_mem_bytes
        # DeepSpeed's estimators count AdamW's mixed-precision states for plain data parallelism only
        plain = tensor == 1 and sequence == 1 and expert == 1 and widths == ADAM_WIDTHS.get(config.precision)
        estimate = (
            deepspeed_estimate(facts, stage, offload, hardware.gpus_per_node, hardware.nodes)
            if plain
            else None
        )
        rows.append(
            PlanRow(
                stage,
                offload,
                gpu_states,
                activations,
                buffers,
                total,
                cpu_total,
                fits,
                estimate,
                tensor,
                sequence,
                sampling,
                expert,
            )
        )
    return rows


def muon_fraction(facts: ModelFacts) -> float:
    """Muon's share of the parameters: the blocks' linear weights (facts.split_params; GPT-2's Conv1D ones are not
    counted there, so its Muon saving is left out: an overestimate, never an underestimate)."""
    return min(1.0, facts.split_params / max(1, facts.params))


def setup_allowed(config: Config, stage: int, offload: bool) -> bool:
    """Whether lmscale runs the config at this ZeRO stage and offload (bf16 states are ZeRO's; Muon and expert
    parallelism are not offloaded)."""
    if config.optim.state_dtype == "bf16" and stage == 0:
        return False
    return not offload or (config.optim.name != "muon" and config.parallel.expert == 1)


def sharded_state_bytes(
    facts: ModelFacts,
    params: int,
    trainable: int,
    stage: int,
    ranks: tuple[int, int],
    offload: bool,
    precision: str,
    widths: StateWidths,
    tensor: int = 1,
) -> tuple[int, int]:
    """`model_state_bytes` of a rank, with a mixture-of-experts model's experts split `expert` ways: each rank
    holds 1/`expert` of them, partitioned by ZeRO over the `zero_ranks x tensor / expert` ranks that hold the
    same experts (AutoEP's expert groups span the tensor groups when folded into AutoTP); the other weights
    are partitioned over all `zero_ranks` (`ranks` = (zero_ranks, expert))."""
    zero_ranks, expert = ranks
    if expert == 1:
        return model_state_bytes(params, stage, zero_ranks, offload, precision, trainable, widths)
    shared = params - facts.expert_params
    own_experts = facts.expert_params // expert
    gpu, cpu = model_state_bytes(
        shared, stage, zero_ranks, offload, precision, trainable - facts.expert_params, widths
    )
    expert_gpu, expert_cpu = model_state_bytes(
        own_experts, stage, max(1, zero_ranks * tensor // expert), offload, precision, own_experts, widths
    )
    return gpu + expert_gpu, cpu + expert_cpu


def other_layouts(facts: ModelFacts, config: Config, hardware: Hardware) -> list[tuple[int, int]]:
    """(tensor, sequence) layouts within a node that this model's heads allow, to try when the configured
    one does not fit: sequence parallelism first (it also divides the activations of one long row), then
    tensor parallelism (it divides the weights too), each from the smallest degree up, then both."""
    if config.parallel.tensor > 1 or config.parallel.sequence > 1:
        return []
    method = method_for(config.finetune)  # only the layouts the method trains in
    degrees = [d for d in (2, 4, 8, 16) if d <= hardware.gpus_per_node and hardware.gpus_per_node % d == 0]
    kv = facts.kv_heads or facts.heads
    # A mixture-of-experts model's attention is split only with its experts (AutoEP + AutoTP folding), and its
    # rows only with every expert on every rank (Ulysses is not folded into AutoEP's groups).
    split_experts = bool(facts.experts) and config.parallel.expert > 1
    splits = facts.split_params and method.tensor_parallel and (split_experts or not facts.experts)
    tensors = [d for d in degrees if facts.heads % d == 0 and kv % d == 0 and splits]

    def sequence_fits(tensor: int, d: int) -> bool:  # Ulysses deals out each tensor slice's heads
        return method.sequence_parallel and not ulysses_split_problems(facts.heads // tensor, kv // tensor, d)

    sequences = [(1, d) for d in degrees if sequence_fits(1, d) and not split_experts]
    both = [
        (t, s)
        for t in tensors
        for s in degrees
        if t * s <= hardware.gpus_per_node and sequence_fits(t, s) and not facts.experts
    ]
    return sequences + [(t, 1) for t in tensors] + sorted(both, key=lambda layout: layout[0] * layout[1])


def largest_token_budget(facts: ModelFacts, config: Config, hardware: Hardware, row: PlanRow) -> int:
    """The most tokens per micro-batch that keep `row`'s set-up within the GPU (a multiple of max_seq_len):
    `step_activation_bytes` solved for the tokens, phase by phase (each a per-token part and a per-step one)."""
    setup = activation_setup(config, row.tensor)
    free = HEADROOM * hardware.gpu_mem_bytes - row.model_state_bytes - row.buffer_bytes
    if embedding_gradient_bytes(facts, setup) > free:  # the end of backward alone would not fit
        return 0
    phases = [
        (loss_backward_bytes(facts, setup), head_gradient_bytes(facts, setup)),
        (block_backward_bytes(facts, setup), held_head_gradient_bytes(facts, setup)),
    ]
    row_bytes = config.data.max_seq_len / row.sequence
    sequences = min(int((free - once) // (per_token * row_bytes)) for per_token, once in phases)
    return max(0, sequences) * config.data.max_seq_len
