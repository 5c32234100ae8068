"""`lmscale plan`: the memory table of a config on given hardware, and what it recommends.

A recommendation is the fastest set-up that fits at the configured token budget, shown with its per-GPU
total and the tokens an optimizer step then holds. It never changes the step size silently: more tokens per
micro-batch are offered only with the gradient accumulation that keeps the step the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from lmscale.config import Config
from lmscale.methods import method_for
from lmscale.planning.options import expert_options, memory_options, with_options
from lmscale.planning.plan import (
    GIB,
    Hardware,
    ModelFacts,
    PlanRow,
    largest_token_budget,
    model_facts,
    other_layouts,
    plan_rows,
    rollout_rows,
)

# Data-parallel ZeRO stages by speed. Stage 1 moves what stage 0 does (a reduce-scatter and an all-gather
# per step are one all-reduce's volume) and holds less; stage 2 reduce-scatters gradients after every
# micro-batch, so with gradient accumulation it moves more than stage 1 (the same without); stage 3 also
# gathers the weights in every forward and backward; offload moves states over PCIe on every step.
SPEED_ORDER_WITH_ACCUMULATION = (1, 2, 0, 3)
SPEED_ORDER_WITHOUT = (2, 1, 0, 3)


def speed_rank(row: PlanRow, grad_accum_steps: int = 1) -> tuple[bool, int]:
    """Smaller is faster: no offload first, then the stage order above."""
    order = SPEED_ORDER_WITH_ACCUMULATION if grad_accum_steps > 1 else SPEED_ORDER_WITHOUT
    return row.offload, order.index(row.stage)


def recommend(rows: list[PlanRow], grad_accum_steps: int = 1) -> PlanRow | None:
    """The fastest row that fits (rows of one layout)."""
    fitting = [row for row in rows if row.fits]
    return min(fitting, key=lambda row: speed_rank(row, grad_accum_steps)) if fitting else None


@dataclass
class Recommendation:
    keys: str  # the overrides that select the set-up
    tokens_per_micro_batch: int  # per data-parallel replica: the configured budget
    total_bytes: int  # per GPU at that budget
    step_tokens: int  # tokens an optimizer step holds: budget x replicas x grad_accum_steps
    largest_tokens_per_micro_batch: int  # the most that fits in this set-up
    # The same step in fewer, larger micro-batches, when the budget's headroom allows it (else None).
    larger_tokens_per_micro_batch: int | None = None
    larger_grad_accum_steps: int | None = None
    larger_total_bytes: int | None = None


def recommendation(
    facts: ModelFacts, config: Config, hardware: Hardware, best: PlanRow, tokens: int
) -> Recommendation:
    replicas = hardware.gpus_per_node * hardware.nodes // (best.tensor * best.sequence)
    accumulation = config.train.grad_accum_steps
    largest = largest_token_budget(facts, config, hardware, best)
    result = Recommendation(best.keys(), tokens, best.total_bytes, tokens * replicas * accumulation, largest)
    # Fewer micro-batches of k times the tokens keep the step: k must divide the accumulation.
    factor = max(
        (k for k in range(2, accumulation + 1) if accumulation % k == 0 and k * tokens <= largest), default=1
    )
    if factor > 1:
        larger = tokens * factor
        row = _same_setup(plan_rows(facts, config, hardware, larger, best.tensor, best.sequence), best)
        result.larger_tokens_per_micro_batch, result.larger_grad_accum_steps = larger, accumulation // factor
        result.larger_total_bytes = row.total_bytes
    return result


def _same_setup(rows: list[PlanRow], like: PlanRow) -> PlanRow:
    return next(row for row in rows if (row.stage, row.offload) == (like.stage, like.offload))


def recommendation_lines(advice: Recommendation, online: bool = False) -> list[str]:
    """The recommendation in words; an online method's micro-batches are its completions, not a token budget,
    so no budget advice follows."""
    lines = [
        f"recommended: {advice.keys} ({advice.total_bytes / GIB:.1f} GiB per GPU at "
        f"{advice.tokens_per_micro_batch:,} tokens per micro-batch; {advice.step_tokens:,} tokens per optimizer step)"
    ]
    if online:
        return lines
    if advice.larger_tokens_per_micro_batch:
        lines.append(
            f"the same step in fewer, larger micro-batches: data.max_tokens_per_batch="
            f"{advice.larger_tokens_per_micro_batch} train.grad_accum_steps={advice.larger_grad_accum_steps} "
            f"({advice.larger_total_bytes / GIB:.1f} GiB per GPU)"
        )
    elif advice.largest_tokens_per_micro_batch > advice.tokens_per_micro_batch:
        lines.append(
            f"room for up to data.max_tokens_per_batch={advice.largest_tokens_per_micro_batch} per micro-batch, "
            "which makes each step larger: raise it together with the LR and step count you mean"
        )
    return lines


def plan_command(
    config: Config, hardware: Hardware, as_json: bool
) -> tuple[list[PlanRow], PlanRow | None, Recommendation | None]:
    """The table's rows (the configured layout, and when nothing fits there the first other layout that
    does), the recommended row and the recommendation; printed as a table or as JSON."""
    facts = model_facts(config)
    tokens = micro_batch_tokens(config, hardware)
    accumulation = config.train.grad_accum_steps
    rows = plan_rows(facts, config, hardware, tokens)
    best = recommend(rows, accumulation)
    extra: list[PlanRow] = []
    for tensor, sequence in [] if best else other_layouts(facts, config, hardware):
        extra = plan_rows(facts, config, hardware, tokens, tensor, sequence)
        best = recommend(extra, accumulation)
        if best:
            break
    chosen = config
    if not best or best.offload or best.stage == 3:  # lmscale's memory options, cheapest first (options.py)
        # Nothing fits, or only with CPU offload: any option; only with ZeRO-3: expert parallelism, which
        # holds a mixture-of-experts model's experts once per group instead of gathering them every micro-batch.
        tried = expert_options(facts, config, hardware) if best and not best.offload else None
        with_option, option_rows, option_best = with_memory_options(
            facts, config, hardware, tokens, best, tried
        )
        if option_best:
            chosen, extra, best = with_option, option_rows, option_best
    shown = rows + (extra if best in extra else [])
    advice = recommendation(facts, chosen, hardware, best, tokens) if best else None
    if as_json:
        print(plan_json(shown, best, advice))
    else:
        print_plan(facts, config, hardware, shown, best, tokens)
        online = method_for(config.finetune).online
        for line in (
            recommendation_lines(advice, online)
            if advice
            else [ONLINE_NOTHING_FITS if online else NOTHING_FITS]
        ):
            print(line)
    return shown, best, advice


def with_memory_options(
    facts: ModelFacts,
    config: Config,
    hardware: Hardware,
    tokens: int,
    found: PlanRow | None,
    tried: list[tuple[str, ...]] | None = None,
) -> tuple[Config, list[PlanRow], PlanRow | None]:
    """(the config with the first memory option that fits, its rows, the recommended row), or the config and
    no rows when none does; when a set-up fits already (`found`: ZeRO-3 or CPU offload), only an option whose
    set-up is faster (ZeRO 1-2 without offload: no weights gathered every micro-batch, nothing over PCIe).
    `tried`: these options only (default: all, lmscale.planning.options.memory_options)."""
    accumulation = config.train.grad_accum_steps
    for overrides in memory_options(facts, config, hardware) if tried is None else tried:
        candidate = with_options(config, overrides)
        if candidate is None:
            continue
        keys = tuple(key for key in overrides if not key.startswith("parallel.expert="))  # the row says it
        rows = [replace(row, options=keys) for row in plan_rows(facts, candidate, hardware, tokens)]
        best = recommend(rows, accumulation)
        if best and (found is None or speed_rank(best, accumulation) < speed_rank(found, accumulation)):
            return candidate, rows, best
    return config, [], None


def reference_line(config: Config) -> str:
    if not config.finetune.grpo.beta:
        return "no reference model (beta=0)"
    if config.finetune.lora is not None:
        return "the KL term's reference is the base with the adapters off (no copy)"
    return "states include the KL term's frozen reference copy (partitioned under ZeRO-3)"


def micro_batch_tokens(config: Config, hardware: Hardware) -> int:
    """Tokens per micro-batch of a data-parallel replica: the token budget, or an online method's share of its
    completions (each up to data.max_seq_len tokens) per micro-batch."""
    if method_for(config.finetune).online:
        ranks = hardware.gpus_per_node * hardware.nodes
        return rollout_rows(config, ranks) // config.train.grad_accum_steps * config.data.max_seq_len
    tokens = config.data.max_tokens_per_batch
    return tokens if isinstance(tokens, int) else config.data.max_seq_len


NOTHING_FITS = (
    "nothing fits: add GPUs, turn on model.activation_checkpointing and train.chunked_loss, or lower "
    "data.max_tokens_per_batch"
)
ONLINE_NOTHING_FITS = (
    "nothing fits: raise train.grad_accum_steps (fewer completions per micro-batch), turn on "
    "model.activation_checkpointing, or lower finetune.grpo.prompts_per_step, group_size or data.max_seq_len"
)


def plan_json(rows: list[PlanRow], best: PlanRow | None, advice: Recommendation | None) -> str:
    import json

    document: dict[str, Any] = {
        "rows": [{**row.as_dict(), "recommended": row is best} for row in rows],
        "recommendation": asdict(advice) if advice else None,
    }
    return json.dumps(document)


def print_plan(
    facts: ModelFacts, config: Config, hardware: Hardware, rows: list[PlanRow], best, tokens: int
) -> None:
    from rich.console import Console
    from rich.table import Table

    trainable = f" ({facts.trainable_params / 1e6:,.2f}M trainable)" if facts.frozen_params else ""
    table = Table(
        title=f"{facts.params / 1e6:,.1f}M parameters{trainable}, {hardware.nodes} x {hardware.gpus_per_node} "
        f"GPUs of {hardware.gpu_mem_bytes / GIB:.0f} GiB, {tokens} tokens per micro-batch, {config.precision}",
        caption="GiB per GPU (host: per node); * = recommended; + = with the memory options the recommendation "
        "names; DS est.: DeepSpeed's own estimate of the model states, for ZeRO 2-3 of plain data parallelism "
        "with every weight trained (- elsewhere)",
    )
    for column in ("layout", "ZeRO", "offload", "states", "activations", "buffers", "GPU total", "host"):
        table.add_column(column, justify="right")
    table.add_column("DS est.", justify="right")
    table.add_column("fits", justify="right")
    for row in rows:
        sizes = (
            row.model_state_bytes,
            row.activation_bytes,
            row.buffer_bytes,
            row.total_bytes,
            row.cpu_bytes,
        )
        estimate = row.deepspeed_estimate_bytes
        parts = (("sp", row.sequence), ("tp", row.tensor), ("ep", row.expert))
        layout = "".join(f"{k}{n}" for k, n in parts if n > 1) or "dp"
        layout += "+" if row.options else ""
        table.add_row(
            layout,
            str(row.stage),
            "cpu" if row.offload else "-",
            *(f"{value / GIB:.2f}" for value in sizes),
            "-" if estimate is None else f"{estimate / GIB:.2f}",
            ("yes *" if row is best else "yes") if row.fits else "no",
        )
    Console(width=110).print(table)
    if rows and rows[0].generation_bytes:
        grpo = config.finetune.grpo
        ranks = hardware.gpus_per_node * hardware.nodes
        print(
            f"sampling: the KV cache of {rollout_rows(config, ranks)} completions per GPU ({grpo.prompts_per_step} "
            f"prompts x {grpo.group_size} over {ranks} GPUs, up to {config.data.max_seq_len} tokens each) takes "
            f"{rows[0].generation_bytes / GIB:.2f} GiB; it and the step's activations never coexist, so "
            f"GPU total counts the larger; {reference_line(config)}"
        )
