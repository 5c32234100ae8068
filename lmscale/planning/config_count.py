"""The planner's model facts worked out from the HF config alone, for the common families (GPT-2, Llama,
Mistral, Mixtral, Qwen2, Qwen3, Qwen3-MoE), with or without LoRA adapters.

Counting by building the model on the meta device imports the family's HF modeling code (with
`torch._dynamo`): most of a first `lmscale plan`'s time. transformers has no count without building the
model, so these few formulas are written here; tests check each against the built model (`plan.facts_of`)
and each default and key alias below against the family's config class. Other families and remote code
are still built on the meta device (and the count cached: lmscale.planning.plan).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from lmscale.objectives.fused_head import FUSABLE_FAMILIES

if TYPE_CHECKING:
    from lmscale.config import Config
    from lmscale.planning.plan import ModelFacts

# What each family's config class sets when config.json leaves a key out (saved configs keep only the
# keys that differ from these). None: worked out from other keys, as the config class does.
FAMILY_DEFAULTS: dict[str, dict] = {
    "gpt2": {
        "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
        "tie_word_embeddings": True, "add_cross_attention": False, "resid_pdrop": 0.1,
    },
    "llama": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False,
    },
    "mistral": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "tie_word_embeddings": False,
    },
    "mixtral": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "tie_word_embeddings": False,
        "num_local_experts": 8, "num_experts_per_tok": 2,
    },
    "qwen3_moe": {
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
        "num_attention_heads": 32, "num_key_value_heads": 4, "tie_word_embeddings": False,
        "attention_bias": False, "num_local_experts": 128, "moe_intermediate_size": 768, "decoder_sparse_step": 1,
        "mlp_only_layers": None, "num_experts_per_tok": 8,
    },
    "qwen2": {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": False,
    },
    "qwen3": {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "tie_word_embeddings": False,
        "attention_bias": False,
    },
}  # fmt: skip

# Other names a config.json may use for a key (the config classes' attribute_map; a test keeps them equal).
ALIASES: dict[str, dict[str, str]] = {
    "gpt2": {
        "hidden_size": "n_embd", "max_position_embeddings": "n_positions", "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    },
    "mixtral": {"num_experts": "num_local_experts"},
    "qwen3_moe": {"num_experts": "num_local_experts"},
}  # fmt: skip


# peft's default LoRA targets for these families (peft.utils.constants; a test keeps them equal).
# peft has none for Qwen3-MoE (get_peft_model then asks for target_modules: building the model says so).
PEFT_DEFAULT_TARGETS = {"gpt2": ["c_attn"]}
PEFT_DEFAULT_TARGETS.update(
    {f: ["q_proj", "v_proj"] for f in FAMILY_DEFAULTS if f not in ("gpt2", "qwen3_moe")}
)


def facts_from_config(config: Config, vocab: int) -> ModelFacts | None:
    """The configured model's facts without building it, or None where they must be counted on a built
    model: another family, remote code, LoRA targets named other than by a projection's own name, or a
    model option the family may not have (building the model checks it)."""
    options = config.model
    knobs = (
        options.embedding_dropout,
        options.attention_dropout,
        options.residual_dropout,
        options.sliding_window,
    )
    if options.trust_remote_code or any(k is not None for k in knobs):
        return None
    if options.path:
        family, keys = read_config_json(Path(options.path).expanduser() / "config.json")
    else:
        from lmscale.model.presets import PRESETS, preset_shape

        if options.preset not in PRESETS:
            return None  # building the model names the problem
        family, keys = preset_shape(options.preset, vocab, config.data.max_seq_len)
    if family not in FAMILY_DEFAULTS or keys is None:
        return None
    keys = {ALIASES.get(family, {}).get(key, key): value for key, value in keys.items()}
    shape = {**FAMILY_DEFAULTS[family], **keys}
    facts = gpt2_facts(shape) if family == "gpt2" else decoder_facts(family, shape)
    if facts is None or config.finetune.lora is None:
        return facts
    return with_lora(facts, family, shape, config.finetune.lora.r, config.finetune.lora.target_modules)


def block_projections(family: str, c: dict) -> list[tuple[str, int, int]]:
    """Each block's projections LoRA can adapt: (name, inputs, outputs)."""
    if family == "gpt2":
        h = c["n_embd"]
        inner = c["n_inner"] or 4 * h
        return [("c_attn", h, 3 * h), ("c_proj", h, h), ("c_fc", h, inner), ("c_proj", inner, h)]
    h, inner = c["hidden_size"], c["intermediate_size"]
    heads, kv_heads, head_dim = attention_heads(c)
    attention = [
        ("q_proj", h, heads * head_dim),
        ("k_proj", h, kv_heads * head_dim),
        ("v_proj", h, kv_heads * head_dim),
        ("o_proj", heads * head_dim, h),
    ]
    if family in ("mixtral", "qwen3_moe"):  # experts are parameters of one module, not projections
        return attention
    return attention + [("gate_proj", h, inner), ("up_proj", h, inner), ("down_proj", inner, h)]


def attention_heads(c: dict) -> tuple[int, int, int]:
    """(query heads, key-value heads, head width) of a Llama-style config, as its attention module reads them."""
    heads = c["num_attention_heads"]
    return heads, c["num_key_value_heads"] or heads, c.get("head_dim") or c["hidden_size"] // heads


def with_lora(
    facts: ModelFacts, family: str, c: dict, rank: int, targets: list[str] | None
) -> ModelFacts | None:
    """The facts once peft wraps the targeted projections of every block in rank-`rank` adapters (A: in x r,
    B: r x out, both nn.Linear, so AutoTP's count includes them); the base model is frozen. None when a
    target is not a projection's own name (peft decides what it matches; building the model asks it)."""
    from dataclasses import replace

    targets = PEFT_DEFAULT_TARGETS.get(family) if targets is None else targets
    projections = block_projections(family, c)
    if not targets or any(t not in {name for name, _, _ in projections} for t in targets):
        return None
    targeted = [(inputs, outputs) for name, inputs, outputs in projections if name in targets]
    added = facts.layers * sum(rank * (inputs + outputs) for inputs, outputs in targeted)
    largest_adapter = max(rank * max(inputs, outputs) for inputs, outputs in targeted)
    return replace(
        facts,
        params=facts.params + added,
        frozen_params=facts.params,
        split_params=facts.split_params + added,
        largest_layer_params=max(facts.largest_layer_params, largest_adapter),
    )


def read_config_json(path: Path) -> tuple[str | None, dict | None]:
    """model_type and keys of a local config.json; (None, None) for what only transformers should read."""
    try:
        keys = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, None  # loading it names the problem
    if not isinstance(keys, dict) or "auto_map" in keys or "quantization_config" in keys:
        return None, None
    return keys.get("model_type"), keys


def gpt2_facts(c: dict) -> ModelFacts | None:
    from lmscale.planning.plan import ModelFacts

    if c["add_cross_attention"]:
        return None
    h, layers, vocab = c["n_embd"], c["n_layer"], c["vocab_size"]
    # Conv1D layers (weight and bias): qkv, attention output, MLP in and out; two LayerNorms (weight and bias)
    modules = [inputs * outputs + outputs for _, inputs, outputs in block_projections("gpt2", c)]
    per_layer = sum(modules) + 2 * 2 * h
    head = 0 if c["tie_word_embeddings"] else vocab * h
    embeddings = vocab * h + c["n_positions"] * h
    return ModelFacts(
        params=layers * per_layer + embeddings + 2 * h + head,
        largest_layer_params=max(*modules, vocab * h, c["n_positions"] * h),
        layers=layers,
        hidden=h,
        heads=c["n_head"],
        vocab=vocab,
        split_params=0,  # Conv1D, not nn.Linear: AutoTP does not split GPT-2 (lmscale.parallel.layout)
        kv_heads=c["n_head"],
        fusable_head="gpt2" in FUSABLE_FAMILIES,
        tileable_mlp=not c["resid_pdrop"],  # the MLP's dropout would draw another mask in the recompute
        head_dim=h // c["n_head"],
        mlp_intermediate=c["n_inner"] or 4 * h,
        dropout=bool(c["resid_pdrop"]),
        tied_embeddings=bool(c["tie_word_embeddings"]),
    )


def decoder_facts(family: str, c: dict) -> ModelFacts:
    """Llama-style decoders: attention with grouped key-value heads, gated MLP or experts, RMSNorms, no
    position weights."""
    from lmscale.planning.plan import ModelFacts

    h, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    heads, kv_heads, head_dim = attention_heads(c)
    qkv_bias = family == "qwen2" or c.get("attention_bias", False)
    out_bias = family != "qwen2" and c.get("attention_bias", False)
    projections = block_projections(family, c)[:4]  # q, k, v, o: (name, inputs, outputs)
    biases = (qkv_bias, qkv_bias, qkv_bias, out_bias)
    attention = [i * o + bias * o for (_, i, o), bias in zip(projections, biases, strict=True)]
    attention_weights = sum(i * o for _, i, o in projections)
    norms = 2 * h + (2 * head_dim if family in ("qwen3", "qwen3_moe") else 0)  # Qwen3 norms q and k per head
    mlps = [mlp_modules(family, c, layer) for layer in range(layers)]
    head = 0 if c["tie_word_embeddings"] else vocab * h
    blocks = sum(sum(attention) + sum(mlp) + norms for mlp, _ in mlps)
    expert_layers = [layer for layer in range(layers) if is_expert_layer(family, c, layer)]
    experts = c["num_local_experts"] if expert_layers else 0
    return ModelFacts(
        params=blocks + vocab * h + h + head,
        largest_layer_params=max(*attention, *(m for mlp, _ in mlps for m in mlp), vocab * h),
        layers=layers,
        hidden=h,
        heads=heads,
        vocab=vocab,
        split_params=sum(attention_weights + linear for _, linear in mlps),
        kv_heads=kv_heads,
        fusable_head=family in FUSABLE_FAMILIES,
        expert_params=sum(mlps[layer][0][0] for layer in expert_layers),  # the fused experts, not the router
        experts=experts,
        top_k=c["num_experts_per_tok"] if experts else 0,
        tileable_mlp=not experts,
        head_dim=head_dim,
        mlp_intermediate=sum(token_mlp_width(family, c, layer) for layer in range(layers)) / layers,
        gated_mlp=True,
        rms_norm=True,
        qk_norm=family in ("qwen3", "qwen3_moe"),
        tied_embeddings=bool(c["tie_word_embeddings"]),
    )


def token_mlp_width(family: str, c: dict, layer: int) -> int:
    """How wide one token's MLP is in a block: the dense intermediate, or its experts' together."""
    if not is_expert_layer(family, c, layer):
        return c["intermediate_size"]
    width = c["intermediate_size"] if family == "mixtral" else c["moe_intermediate_size"]
    return c["num_experts_per_tok"] * width


def mlp_modules(family: str, c: dict, layer: int) -> tuple[list[int], int]:
    """One block's MLP: each of its modules' parameter count, and the weights of those that are nn.Linear."""
    h, inner = c["hidden_size"], c["intermediate_size"]
    if is_expert_layer(family, c, layer):  # experts' gate/up and down weights in one module; a router
        experts = c["num_local_experts"]
        width = inner if family == "mixtral" else c["moe_intermediate_size"]
        return [3 * experts * h * width, experts * h], 0
    bias = c.get("mlp_bias", False)  # gate, up and down projections
    return [h * inner + bias * inner, h * inner + bias * inner, inner * h + bias * h], 3 * h * inner


def is_expert_layer(family: str, c: dict, layer: int) -> bool:
    if family == "mixtral":
        return True
    if family != "qwen3_moe":
        return False
    # Qwen3-MoE's rule: dense where listed in mlp_only_layers, else experts every decoder_sparse_step layers
    listed = layer in (c["mlp_only_layers"] or [])
    return not listed and c["num_local_experts"] > 0 and (layer + 1) % c["decoder_sparse_step"] == 0
