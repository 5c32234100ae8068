"""Which prompts each rank answers: every prompt once per pass, ranks disjoint, the same for the same seed."""

import numpy as np

from lmscale.rollouts.schedule import generation_prompts, rank_prompts, sampling_seed


def test_each_pass_answers_every_prompt_once_and_generations_span_passes():
    count, per_generation = 10, 4
    seen = np.concatenate(
        [generation_prompts(count, per_generation, 7, g) for g in range(5)]
    )  # 20 = 2 passes
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])  # each pass is shuffled anew
    assert np.array_equal(generation_prompts(count, per_generation, 7, 3), seen[12:16])


def test_ranks_share_a_generation_without_overlap_and_the_seed_decides_it():
    whole = generation_prompts(100, 8, 1, 2)
    shares = [rank_prompts(100, 8, 1, 2, rank, 4) for rank in range(4)]
    assert np.array_equal(np.concatenate(shares), whole)
    assert not np.array_equal(generation_prompts(100, 8, 2, 2), whole)
    assert sampling_seed(1, 2, 0) == sampling_seed(1, 2, 0)
    assert len({sampling_seed(1, g, r) for g in range(3) for r in range(3)}) == 9
