"""GRPO: online RL with reward functions. Each step the policy answers its prompts `group_size` times inside
the training engine, reward functions score the answers, and the clipped surrogate on group-normalised
advantages trains it (lmscale.rollouts samples and scores, lmscale.objectives.grpo is the loss)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmscale.methods.base import Method, MethodFigures

if TYPE_CHECKING:
    from lmscale.config import Config


def grpo_objective(config: Config) -> Any:
    from lmscale.objectives.grpo import grpo_objective as objective  # torch: imported where training starts

    return objective(config.finetune.grpo)


def grpo_rules(config: Config) -> list[str]:
    """What GRPO needs of the config (the rank count's share of the prompts is checked with the layout)."""
    grpo, train, key = config.finetune.grpo, config.train, "finetune.method=grpo"
    problems = []
    if not grpo.rewards:
        problems.append(
            f"{key} needs finetune.grpo.rewards: name at least one reward function, e.g. "
            "[lmscale.rewards:exact_answer] or [my_rewards.py:my_function]"
        )
    if config.finetune.task != "causal_lm":
        problems.append(f"{key} needs finetune.task=causal_lm")
    if train.max_steps is None:
        problems.append(
            f"{key} samples its own data, so train.max_tokens and train.epochs do not measure it: set "
            "train.max_steps (and the others null)"
        )
    if train.chunked_loss:
        problems.append(
            f"train.chunked_loss does not apply to {key} (its loss needs every token's log-probability): set "
            "train.chunked_loss=false"
        )
    if train.label_smoothing:
        problems.append(f"train.label_smoothing applies to cross-entropy, not {key}: set it to 0")
    if config.model.compile:
        problems.append(f"model.compile is not tested with {key}'s generation: set model.compile=false")
    if grpo.max_new_tokens >= config.data.max_seq_len:
        problems.append(
            f"finetune.grpo.max_new_tokens={grpo.max_new_tokens} leaves no room for a prompt within "
            f"data.max_seq_len={config.data.max_seq_len}: raise max_seq_len or lower max_new_tokens"
        )
    return problems


def rollout_shape_problems(config: Config, data_ranks: int) -> list[str]:
    """Whether each data-parallel rank gets a whole share of the prompts, and its completions split evenly
    into the step's micro-batches."""
    grpo, accum = config.finetune.grpo, config.train.grad_accum_steps
    if grpo.prompts_per_step % data_ranks:
        return [
            f"finetune.grpo.prompts_per_step={grpo.prompts_per_step} does not split over {data_ranks} "
            f"data-parallel ranks: use a multiple of {data_ranks}"
        ]
    rows = grpo.prompts_per_step // data_ranks * grpo.group_size
    if rows % accum:
        return [
            f"each rank's {rows} completions (prompts_per_step / ranks x group_size) do not split into "
            f"train.grad_accum_steps={accum} micro-batches: make them a multiple of {accum}"
        ]
    return []


GRPO = Method(
    name="grpo",
    key="finetune.method=grpo",
    data_formats=("prompt",),
    figures=MethodFigures(
        loss_name="loss (minus the reward)",
        loss_label="clipped surrogate (per completion token)",
        panels=(
            (
                "Reward",
                "mean reward of sampled (train) and greedy held-out (eval) answers",
                ("reward", "eval_reward"),
                False,
            ),
            ("Reward spread", "std of rewards; advantages", ("reward_std", "advantage_std"), True),
            ("Completions", "tokens", ("completion_length", "completion_length_max"), True),
            (
                "Clipping and KL",
                "share of tokens clipped; KL to the reference",
                ("clip_low", "clip_high", "kl", "truncated_frac", "zero_spread_groups"),
                True,
            ),
            ("Generation", "tokens/s (all ranks)", ("generation_tokens_per_s",), True),
        ),  # fmt: skip
        summary_keys=("eval_loss", "eval_reward", "eval_completion_length"),
        console=(
            ("reward", "reward", "{:.3f}"),
            ("completion_length", "len", "{:.1f}"),
            ("generation_share", "gen", "{:.0%}"),
        ),
        evaluation=(("completion_length", "answer length", "{:.1f}"),),
        held_out_loss=False,  # eval_loss is minus the greedy reward, which the Reward panel draws
    ),
    objective=grpo_objective,
    rules=grpo_rules,
    rank_rules=rollout_shape_problems,
    accuracy_metric="reward",
    accuracy_label="reward (greedy)",
    perplexity=False,
    target_unit="completion tokens",
    dropout_off=True,  # the ratio to the sampling policy is 1 at the first update only without dropout noise
    whole_records=True,
    online=True,
    tensor_parallel=False,  # not tried with generation yet
    sequence_parallel=False,  # completions are scored whole, on one rank
)
