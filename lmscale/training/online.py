"""Wiring an online method (GRPO) into a rank's training: its rollout stream in place of planned batches, its
held-out evaluation (greedy answers' reward) in place of a held-out loss, and the generation figures each log
step adds."""

from __future__ import annotations

from typing import Any

from lmscale.data.pipeline import PreparedData
from lmscale.model.build import build_model
from lmscale.parallel.engine import build_frozen_engine
from lmscale.reporting.sink import log
from lmscale.rollouts.evaluation import held_out_reward
from lmscale.rollouts.generation import end_token_ids
from lmscale.rollouts.scoring import RewardSet, reward_set, score
from lmscale.rollouts.stream import Prompts, RolloutSettings, RolloutStream
from lmscale.runs.run import Run
from lmscale.training.loop import Streams


def rollout_settings(run: Run, engine: Any) -> RolloutSettings:
    config = run.config
    return RolloutSettings(
        grpo=config.finetune.grpo,
        seed=config.seed,
        grad_accum_steps=config.train.grad_accum_steps,
        data_rank=run.data_rank,
        data_ranks=run.layout.data,
        synced=engine.zero_optimization_stage() == 3 and run.world_size > 1,
        log_every=config.train.log_every,
    )


def try_rewards(rewards: RewardSet, prompts: Prompts) -> None:
    """Call every reward function once on the first prompt with an empty completion (one a policy can
    sample): a function that cannot take the records' fields, or fails outright, stops the run now, before
    its directory is written, not at the first step."""
    _, shown, fields = prompts.take([0])
    score(rewards, shown, prompts.as_completions([[]]), fields, [[]])


def frozen_reference(run: Run, data: PreparedData) -> Any:
    """The KL term's reference for a full fine-tune: the starting model built again (model.path, or the preset
    at the run's seed), frozen, partitioned over the ranks under ZeRO-3 as the policy is. A resumed run builds
    it the same way, so the reference never moves."""
    config = run.config
    model = build_model(config.model, data.tokenizer, config.data.max_seq_len, config.seed, config.finetune)
    engine = build_frozen_engine(model, run.ds_config)
    log.info(
        "grpo: KL reference: a frozen copy of the starting model (%s)",
        f"partitioned over {run.world_size} ranks" if config.zero.stage == 3 else "whole on every rank",
    )
    return engine


class OnlineTraining:
    """An online method's stream, evaluation and figures for the loop."""

    def __init__(self, run: Run, data: PreparedData, engine: Any) -> None:
        grpo = run.config.finetune.grpo
        self.rewards = reward_set(grpo)
        self.engine, self.settings = engine, rollout_settings(run, engine)
        self.end_ids = end_token_ids(data.tokenizer, engine.module)
        self.held_out = Prompts(data.eval, data.tokenizer)
        samples = run.dir.samples if run.is_rank_zero else None
        prompts = Prompts(data.train, data.tokenizer)
        try_rewards(self.rewards, prompts)
        reference = frozen_reference(run, data) if grpo.beta and run.config.finetune.lora is None else None
        self.stream = RolloutStream(
            engine, prompts, self.settings, self.rewards, self.end_ids, samples, reference
        )
        log.info(
            "grpo: %d prompts x %d completions per step (%d per rank), up to %d new tokens; rewards %s",
            grpo.prompts_per_step,
            grpo.group_size,
            self.settings.prompts_per_rank * grpo.group_size,
            grpo.max_new_tokens,
            ", ".join(self.rewards.names()),
        )

    def streams(self) -> Streams:
        """The loop's streams: the rollouts; no held-out batches (the evaluation answers held-out prompts)."""
        return Streams(self.stream, None)

    def evaluate(self) -> tuple[float, dict[str, float]]:
        return held_out_reward(
            self.engine.module, self.engine.device, self.held_out, self.settings, self.rewards, self.end_ids
        )
