"""GRPO's objective without processes (issue 30, in progress): the group-normalised advantages and the loss
of each aggregation, with and without the KL term, against TRL's GRPOTrainer on the same model and batch;
a 1% change of a parameter shows."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from datasets import Dataset
from test_dpo import tiny_model

from lmscale.objectives.grpo import GrpoLoss, group_advantages, grpo_parts

PROMPT, COMPLETION, ROWS = 5, 7, 6


def completion_batch():
    """6 completions of 7 tokens (some shorter: masked tails) after prompts of 5 tokens, left-padded as TRL's."""
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, 48, (ROWS, PROMPT), generator=generator)
    completion_ids = torch.randint(3, 48, (ROWS, COMPLETION), generator=generator)
    completion_mask = torch.ones(ROWS, COMPLETION, dtype=torch.long)
    for row, length in enumerate([7, 4, 7, 2, 6, 7]):
        completion_mask[row, length:] = 0
    return prompt_ids, torch.ones_like(prompt_ids), completion_ids, completion_mask


def completion_logps(model, prompt_ids, completion_ids) -> torch.Tensor:
    """[rows, completion tokens] log-probabilities of the completion tokens."""
    logits = model(input_ids=torch.cat([prompt_ids, completion_ids], dim=1)).logits
    predicting = logits[:, PROMPT - 1 : -1].float().log_softmax(-1)
    return predicting.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


def trl_loss(settings: GrpoLoss, inputs: dict, tokenizer, tmp_path) -> float:
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=ROWS,
        num_generations=3,
        max_completion_length=settings.max_completion_length,
        loss_type=settings.loss_type,
        epsilon=settings.epsilon,
        epsilon_high=settings.epsilon_high,
        use_bias_correction_kl=settings.bias_correction_kl,
    )
    records = Dataset.from_list([{"prompt": "w1 w2"}] * ROWS)
    trainer = GRPOTrainer(
        model=tiny_model(), reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
        train_dataset=records, processing_class=tokenizer,
    )  # fmt: skip
    # beta set after construction: with beta > 0 TRL would load a reference model by name (the batch carries
    # the reference's log-probabilities, which is all _compute_loss reads)
    trainer.beta = settings.beta
    trainer.model.eval()  # eval mode: no gradient-accumulation normaliser on TRL's side
    with torch.no_grad():
        return float(trainer._compute_loss(trainer.model, inputs))


CASES = {
    "dapo": GrpoLoss(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, max_completion_length=COMPLETION),
    "grpo-kl": GrpoLoss(loss_type="grpo", epsilon=0.2, beta=0.05, max_completion_length=COMPLETION),
    "dr_grpo-kl": GrpoLoss(
        loss_type="dr_grpo", epsilon=0.15, epsilon_high=0.3, beta=0.04, max_completion_length=COMPLETION
    ),
    "grpo-kl-uncorrected": GrpoLoss(
        loss_type="grpo", beta=0.05, bias_correction_kl=False, max_completion_length=COMPLETION
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_the_loss_equals_trl_grpo_trainer_on_the_same_model_and_batch(case, tokenizer, tmp_path):
    from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: F401  (a test extra: TRL is the oracle)

    settings = CASES[case]
    prompt_ids, prompt_mask, completion_ids, completion_mask = completion_batch()
    model = tiny_model()
    with torch.no_grad():
        logps = completion_logps(model, prompt_ids, completion_ids)
    generator = torch.Generator().manual_seed(1)
    # sampled by an older policy, and a reference unlike both: ratios on both sides of the clip range
    old_logps = logps + 0.3 * torch.randn(logps.shape, generator=generator)
    reference = logps + 0.5 * torch.randn(logps.shape, generator=generator)
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, -1.0]), group_size=3)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": old_logps,
        "ref_per_token_logps": reference,
        "num_items_in_batch": completion_mask.sum(),
    }
    theirs = trl_loss(settings, inputs, tokenizer, tmp_path)

    def ours(settings: GrpoLoss) -> float:
        with torch.no_grad():
            logps = completion_logps(model, prompt_ids, completion_ids)
        parts = grpo_parts(logps, old_logps, advantages, completion_mask, settings, reference)
        return float(parts.summed) / parts.targets

    assert ours(settings) == pytest.approx(theirs, abs=1e-5)
    for field in ("epsilon", "epsilon_high", "beta"):
        value = getattr(settings, field)
        if value:
            moved = dataclasses.replace(settings, **{field: value * 1.01})
            assert abs(ours(moved) - theirs) > 1e-5, field


def test_group_advantages_scale_by_the_group_the_batch_or_not_at_all():
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0])
    group = group_advantages(rewards, 3, "group")
    assert group[:3].tolist() == pytest.approx([0.5 / 0.5001, -0.5 / 0.5001, 0.0], abs=1e-4)  # std 0.5
    assert group[3:].tolist() == [0.0, 0.0, 0.0]  # a group that scored alike teaches nothing
    assert group_advantages(rewards, 3, "none").tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0, 0.0, 0.0])
    batch = group_advantages(rewards, 3, "batch")
    assert batch[0].item() == pytest.approx(0.5 / (rewards.std().item() + 1e-4))
