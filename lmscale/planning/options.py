"""What `lmscale plan` tries when the configured set-up fits in no ZeRO stage or layout: lmscale's memory
options, each a few config overrides, cheapest first.

Cheapest means least change to what the run computes and how fast: expert parallelism (the same model and
numbers, the experts held once per group; a mixture-of-experts model only), the tiled MLP (the same numbers,
the MLP recomputed in backward), activation offload (the same numbers, the checkpoints over PCIe), bf16
optimizer states (half the states' bytes, a little precision: lmscale's README gives the cost on the
embedded default), then Muon (another optimizer). Each alone first, then together from the cheapest up.
"""

from __future__ import annotations

from lmscale.config import Config, apply_overrides, build_config
from lmscale.errors import ConfigError
from lmscale.planning.plan import Hardware, ModelFacts

Overrides = tuple[str, ...]


def memory_options(facts: ModelFacts, config: Config, hardware: Hardware) -> list[Overrides]:
    """The override sets to try, in order: each option alone (every expert degree, smallest first), then the
    growing combinations of the largest expert degree with the others, cheapest first."""
    degrees, others = expert_options(facts, config, hardware), other_options(facts, config)
    combined: list[Overrides] = []
    base = degrees[-1] if degrees else ()
    for count in range(1, len(others) + 1):
        if base or count > 1:  # one option alone is tried already
            combined.append(base + tuple(key for option in others[:count] for key in option))
    return degrees + others + combined


def expert_options(facts: ModelFacts, config: Config, hardware: Hardware) -> list[Overrides]:
    """Expert parallelism for a mixture-of-experts model, within a node, from the smallest degree up."""
    if config.parallel.expert > 1 or config.parallel.tensor * config.parallel.sequence > 1:
        return []
    ranks = hardware.gpus_per_node * hardware.nodes
    return [(f"parallel.expert={d}",) for d in facts.expert_degrees(ranks, hardware.gpus_per_node)]


def other_options(facts: ModelFacts, config: Config) -> list[Overrides]:
    model, optim = config.model, config.optim
    options: list[Overrides] = []
    if facts.tileable_mlp and not model.tiled_mlp and not model.compile:
        options.append(("model.tiled_mlp=true",))
    if not model.activation_offload and not model.compile:
        options.append(("model.activation_checkpointing=true", "model.activation_offload=true"))
    if config.precision == "bf16" and optim.state_dtype == "fp32" and optim.name in ("adamw", "muon"):
        options.append(("optim.state_dtype=bf16",))
    if optim.name == "adamw" and config.finetune.lora is None and config.parallel.tensor == 1:
        options.append(("optim.name=muon",))
    return options


def with_options(config: Config, overrides: Overrides) -> Config | None:
    """The config with the option's overrides, or None where they do not combine with it (its own rules). The
    ZeRO stage is the planner's to choose: an option that needs ZeRO (bf16 states) is checked at stage 1."""
    for stage in ((), ("zero.stage=1",)):
        try:
            return build_config(apply_overrides(config.model_dump(), [*overrides, *stage]))
        except ConfigError:
            continue
    return None
