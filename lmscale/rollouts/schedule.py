"""Which prompts each data-parallel rank answers in each generation: a pure function of the seed, so a
resumed run (even on another rank count) continues the same sequence of prompts without any saved state
but the generation's number."""

from __future__ import annotations

import numpy as np


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The prompts of one pass over the data, shuffled by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(count)


def generation_prompts(count: int, per_generation: int, seed: int, generation: int) -> np.ndarray:
    """The `per_generation` prompts (indices) of one generation over all ranks: the next ones in a sequence
    of shuffled passes over the `count` prompts (a generation may span two passes)."""
    start = generation * per_generation
    first_epoch, last_epoch = start // count, (start + per_generation - 1) // count
    order = np.concatenate([epoch_order(count, seed, e) for e in range(first_epoch, last_epoch + 1)])
    offset = start - first_epoch * count
    return order[offset : offset + per_generation]


def rank_prompts(
    count: int, per_generation: int, seed: int, generation: int, rank: int, ranks: int
) -> np.ndarray:
    """This data-parallel rank's share of a generation's prompts (per_generation is a multiple of ranks)."""
    share = per_generation // ranks
    return generation_prompts(count, per_generation, seed, generation)[rank * share : (rank + 1) * share]


def sampling_seed(seed: int, generation: int, rank: int) -> int:
    """The seed of one rank's sampling in one generation: resumed runs draw the same completions."""
    return int(np.random.SeedSequence([seed, generation, rank]).generate_state(1)[0])
