"""The rows a generation becomes: prompt + completion with only the completion as targets, sorted by length
into the step's micro-batches, with their advantages; truncated completions masked when asked; the rows a
rank saves for a resume come back identical."""

import json

import pytest
import torch
from datasets import Dataset
from helpers import word_level_tokenizer

from lmscale.config import GrpoConfig
from lmscale.data.batches import IGNORE_INDEX
from lmscale.rollouts.generation import Completions, cut_at_end, left_padded
from lmscale.rollouts.scoring import RewardSet
from lmscale.rollouts.stream import Prompts, Rollout, RolloutSettings, RolloutStream, saved_batch


def stream(loss_type="dapo", mask_truncated=False, accum=2, iterations=1) -> RolloutStream:
    tokenizer = word_level_tokenizer(["one", "two", "three", "four"])
    records = Dataset.from_dict(
        {"prompt": ["one two"], "answer": ["x"], "input_ids": [[3, 4]], "length": [2]}
    )
    grpo = GrpoConfig(
        rewards=["lmscale.rewards:exact_answer"],
        group_size=4,
        loss_type=loss_type,
        mask_truncated_completions=mask_truncated,
        num_iterations=iterations,
        prompts_per_step=1,
    )
    settings = RolloutSettings(grpo, seed=0, grad_accum_steps=accum, data_rank=0, data_ranks=1, synced=False)
    return RolloutStream(None, Prompts(records, tokenizer), settings, RewardSet([], []), {0})


COMPLETIONS = Completions(
    ids=[[5, 6, 0], [5], [6, 6, 6, 6], [0]], truncated=[False, True, True, False], seconds=0.1
)
ADVANTAGES = torch.tensor([0.5, -0.5, 1.5, -1.5])


def test_rows_are_sorted_into_micro_batches_with_the_completion_as_targets():
    batches = stream().micro_batches([[3, 4]] * 4, COMPLETIONS, ADVANTAGES)
    assert [b.sequences for b in batches] == [2, 2]
    short, long = batches
    # the shortest rows together: [3 4 5] and [3 4 0], then [3 4 5 6 0] and [3 4 6 6 6 6]
    assert short["input_ids"].tolist() == [[3, 4, 5], [3, 4, 0]]
    assert short["advantages"].tolist() == [-0.5, -1.5]
    assert long["labels"].tolist() == [
        [IGNORE_INDEX] * 2 + [5, 6, 0, IGNORE_INDEX],
        [IGNORE_INDEX] * 2 + [6] * 4,
    ]
    assert long["advantages"].tolist() == [0.5, 1.5]
    assert (short.local_targets, long.local_targets) == (2, 7)  # dapo: completion tokens
    assert short.real_tokens == 6 and long.padded_tokens == 12


def test_grpo_counts_completions_and_masked_truncations_keep_their_rows_without_targets():
    batches = stream("grpo", mask_truncated=True, accum=1).micro_batches(
        [[3, 4]] * 4, COMPLETIONS, ADVANTAGES
    )
    (batch,) = batches
    assert batch.local_targets == 4  # every completion, as TRL's grpo mean counts them
    targets = (batch["labels"] != IGNORE_INDEX).sum(dim=1).tolist()
    assert targets == [0, 1, 3, 0]  # [3 4 5] and [3 4 6 6 6 6] were cut at max_new_tokens: no targets


def test_saved_rows_come_back_bit_for_bit():
    rollout_stream = stream()
    batches = rollout_stream.micro_batches([[3, 4]] * 4, COMPLETIONS, ADVANTAGES)
    for batch in batches:
        batch.tensors["old_logps"] = torch.randn(batch["labels"].shape[0], batch["labels"].shape[1] - 1)
    rollout_stream.rollout = Rollout(3, batches)
    rollout_stream.settings = RolloutSettings(
        rollout_stream.settings.grpo.model_copy(update={"num_iterations": 2}), 0, 2, 0, 1, False
    )
    rollout_stream.served = 2 * 7  # 7 steps done: the 8th is generation 3's second update
    saved = json.loads(json.dumps(rollout_stream.rank_state_dict()))
    assert saved["generation"] == 3
    for original, restored in zip(batches, (saved_batch(b) for b in saved["batches"]), strict=True):
        assert set(original.tensors) == set(restored.tensors)
        for name, tensor in original.tensors.items():
            assert torch.equal(tensor, restored[name]), name
        assert (
            original.local_targets == restored.local_targets and original.real_tokens == restored.real_tokens
        )
    rollout_stream.served = 2 * 8  # at a generation's start nothing needs saving: it is sampled again
    assert rollout_stream.rank_state_dict() is None


def test_prompts_are_padded_on_the_left_and_completions_cut_after_their_end_token():
    ids, mask = left_padded([[3, 4, 5], [6]], pad_id=1, device="cpu")
    assert ids.tolist() == [[3, 4, 5], [1, 1, 6]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_end([5, 0, 1, 1], {0}) == ([5, 0], False)
    assert cut_at_end([5, 6], {0}) == ([5, 6], True)


@pytest.mark.parametrize("messages", [True, False])
def test_reward_functions_see_text_or_assistant_messages(messages):
    tokenizer = word_level_tokenizer(["one", "two"])
    column = {"messages": [[{"role": "user", "content": "one"}]]} if messages else {"prompt": ["one"]}
    prompts = Prompts(
        Dataset.from_dict({**column, "input_ids": [[3]], "length": [1], "answer": ["two"]}), tokenizer
    )
    ids, shown, fields = prompts.take([0])
    assert ids == [[3]] and fields == {"answer": ["two"]}
    completions = prompts.as_completions([[4, 0]])
    assert completions == ([[{"role": "assistant", "content": "two"}]] if messages else ["two"])
