"""finetune.*: the task, the method (SFT, DPO, ORPO, SimPO, reward, KTO or GRPO), LoRA adapters and gradual unfreezing."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmscale.config.section import Section


class LoraConfig(Section):
    r: int = Field(8, ge=1, description="Rank of the low-rank update matrices.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | None = Field(
        None,
        description="Module names to adapt (e.g. [q_proj, v_proj]); unset = peft's default for the family.",
    )


class UnfreezeConfig(Section):
    every_steps: int = Field(..., ge=1, description="Steps between one layer joining training and the next.")
    start_from: Literal["top", "bottom"] = Field(
        "top",
        description="top: the head and top block train first and lower layers join; bottom: the reverse.",
    )


class DpoConfig(Section):
    beta: float = Field(
        0.1, gt=0, description="Strength of the pull towards the reference model (DPO's beta; IPO's tau)."
    )
    loss: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid",
        description="sigmoid: DPO's logistic loss; ipo: squared, on per-token log-ratios; hinge: SLiC's hinge.",
    )


class OrpoConfig(Section):
    beta: float = Field(
        0.1,
        gt=0,
        description="ORPO's lambda (TRL calls it beta): the weight of the odds-ratio term beside the chosen "
        "reply's cross-entropy.",
    )


class SimpoConfig(Section):
    beta: float = Field(
        2.0, gt=0, description="Scale of the length-normalised reward (mean log-probability per token)."
    )
    gamma: float = Field(
        1.0, ge=0, description="Target reward margin: the chosen reply should win by at least this much."
    )


class RewardConfig(Section):
    center_coefficient: float | None = Field(
        None,
        ge=0,
        description="Reward centering (TRL's center_rewards_coefficient): adds this x mean((r_chosen + r_rejected)^2), "
        "keeping rewards near zero; unset = off.",
    )


class KtoConfig(Section):
    beta: float = Field(
        0.1, gt=0, description="Scale of the reward (beta x log-ratio to the reference), as in DPO."
    )
    desirable_weight: float = Field(
        1.0, gt=0, description="Weight of a desirable example's loss (raise it when they are the fewer)."
    )
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of an undesirable example's loss.")


class GrpoConfig(Section):
    """GRPO (online RL with reward functions): how completions are sampled, scored and learned from."""

    rewards: list[str] = Field(
        [],
        description="Reward functions f(prompts, completions, **fields) -> list[float | None] (TRL's "
        "signature), as path/to/file.py:function or package.module:function; built-ins: "
        "lmscale.rewards:exact_answer, lmscale.rewards:format_regex, lmscale.rewards:length_penalty.",
    )
    reward_weights: list[float] | None = Field(
        None, description="One weight per reward function (the reward is their weighted sum); unset = all 1."
    )
    prompts_per_step: int = Field(
        8, ge=1, description="Prompts per optimizer step over all data-parallel ranks (a multiple of them)."
    )
    group_size: int = Field(8, ge=2, description="Completions sampled per prompt (a group).")
    max_new_tokens: int = Field(64, ge=1, description="Longest completion in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(
        1.0, gt=0, le=1, description="Nucleus sampling: the smallest set of tokens with this mass."
    )
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens; 0 = all.")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="Advantages: reward less the group's mean, divided by the group's std (group), the whole "
        "step's std (batch) or nothing (none, as Dr. GRPO).",
    )
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = Field(
        "dapo",
        description="dapo: mean over the step's completion tokens (TRL's default); grpo: mean over completions "
        "of each one's token mean; dr_grpo: token sums over max_new_tokens, mean over completions.",
    )
    epsilon: float = Field(
        0.2, gt=0, lt=1, description="The ratio to the sampling policy is clipped below at 1 - epsilon."
    )
    epsilon_high: float | None = Field(
        None, gt=0, description="... and above at 1 + epsilon_high; unset = epsilon (DAPO: 0.28)."
    )
    beta: float = Field(
        0.0,
        ge=0,
        description="Weight of the KL term to the starting model; 0 = none (no reference needed). With LoRA the "
        "reference is the base model with the adapters off.",
    )
    num_iterations: int = Field(
        1, ge=1, description="Optimizer steps on each batch of completions (the ratio then departs from 1)."
    )
    mask_truncated_completions: bool = Field(
        False, description="Completions cut at max_new_tokens (no end token) contribute no loss."
    )
    eval_prompts: int = Field(
        64, ge=1, description="Held-out prompts answered greedily at each evaluation (eval_reward)."
    )
    samples: int = Field(
        2,
        ge=0,
        description="Prompts (with their completions and rewards) written to samples.jsonl per log step.",
    )

    @model_validator(mode="after")
    def weights_match(self) -> GrpoConfig:
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(
                f"finetune.grpo.reward_weights has {len(self.reward_weights)} weights for "
                f"{len(self.rewards)} reward functions: give one per function, or unset it"
            )
        return self


class FinetuneConfig(Section):
    method: Literal["sft", "dpo", "orpo", "simpo", "reward", "kto", "grpo"] = Field(
        "sft",
        description="sft: the cross-entropy of the targets; on data.format=preference pairs: dpo (direct "
        "preference optimisation against the starting model), orpo (odds-ratio preference optimisation) or "
        "simpo (length-normalised rewards with a margin); orpo and simpo need no reference model; reward: a "
        "reward model (a scalar head) trained on the pairs with the Bradley-Terry loss; on data.format=unpaired "
        "records: kto (Kahneman-Tversky optimisation against the starting model); on data.format=prompt: grpo "
        "(online RL: sampled completions scored by reward functions, finetune.grpo).",
    )
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    orpo: OrpoConfig = Field(default_factory=OrpoConfig)
    simpo: SimpoConfig = Field(default_factory=SimpoConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    kto: KtoConfig = Field(default_factory=KtoConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)
    task: Literal["causal_lm", "classification"] = Field(
        "causal_lm",
        description="causal_lm: next-token loss; classification: a sequence-classification head on data.label_field.",
    )
    num_labels: int | None = Field(
        None, ge=2, description="classification: number of classes; unset = the distinct labels in the data."
    )
    lora: LoraConfig | None = Field(
        None,
        description="LoRA adapters via peft ({r, alpha, dropout, target_modules}); unset = full fine-tuning.",
    )
    unfreeze: UnfreezeConfig | None = Field(
        None,
        description="Gradual unfreezing ({every_steps, start_from}); unset = every layer trains from step 0.",
    )
