"""finetune.*: the task, the method (SFT, DPO, ORPO, SimPO, reward or KTO), LoRA adapters and gradual unfreezing."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

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


class FinetuneConfig(Section):
    method: Literal["sft", "dpo", "orpo", "simpo", "reward", "kto"] = Field(
        "sft",
        description="sft: the cross-entropy of the targets; on data.format=preference pairs: dpo (direct "
        "preference optimisation against the starting model), orpo (odds-ratio preference optimisation) or "
        "simpo (length-normalised rewards with a margin); orpo and simpo need no reference model; reward: a "
        "reward model (a scalar head) trained on the pairs with the Bradley-Terry loss; on data.format=unpaired "
        "records: kto (Kahneman-Tversky optimisation against the starting model).",
    )
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    orpo: OrpoConfig = Field(default_factory=OrpoConfig)
    simpo: SimpoConfig = Field(default_factory=SimpoConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    kto: KtoConfig = Field(default_factory=KtoConfig)
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
